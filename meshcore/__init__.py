"""The shared kernel of ambient-mesh: identity, model, wire codecs, helpers every component uses.

Nothing in here imports a component (ztunnel, cni, controller, meshctl); `meshcore.wire` and
`meshcore.model` are sans-I/O and import no asyncio, sockets or gRPC.
"""
