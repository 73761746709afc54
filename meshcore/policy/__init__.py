"""Istio security objects (AuthorizationPolicy, PeerAuthentication) -> the L4 policies ztunnel
enforces (istio.security.Authorization), as istiod converts them for ambient. Pure: no I/O.
"""
