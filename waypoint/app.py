"""The waypoint's composition root: builds every part in order and runs them until told to stop.

It takes tunnels only once it holds a certificate and xDS has delivered its first full state
(services, workloads, routes and policies): a request served before its AuthorizationPolicies
arrived would be let through what they deny (fail closed).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import threading

import prometheus_client

from meshcore import log
from meshcore.aio import endpoints, http, runtime
from meshcore.identity import ca_client
from meshcore.xds import client as xds_client
from meshcore.xds import types
from waypoint import config as config_mod
from waypoint import engine, identity, origin, telemetry, tracing, tunnel, upstream
from waypoint import state as state_mod

logger = logging.getLogger("waypoint")


async def run(cfg: config_mod.Config, stop: asyncio.Event | None = None) -> None:
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()

    # What the waypoint serves from: services, workloads and traffic objects, from xDS.
    state = state_mod.WaypointState(namespace=cfg.namespace, name=cfg.name)

    # Its one certificate, from the controller's CA, renewed at half-life.
    ca = ca_client.GrpcCaClient(cfg.ca_address, cfg.token_file, cfg.cluster_id)
    me = identity.WaypointIdentity(ca, cfg.identity, cfg.secret_ttl)

    # Telemetry: request metrics in their own registry, spans to a collector if configured.
    registry = prometheus_client.CollectorRegistry()
    tel = telemetry.Telemetry(telemetry.Metrics(registry))
    tracer = tracing.Tracer(cfg.otlp_endpoint, sample_percent=state.tracing_sample_percent())

    # Endpoints in the mesh are reached over HBONE with the waypoint's identity, and must prove
    # theirs; the others (uncaptured pods, external ServiceEntry endpoints) over plain TCP.
    connector = origin.HboneConnector(
        me.client_context, state.expected_identities, timeout=cfg.connect_timeout
    )
    mesh = origin.MeshConnector(connector, origin.TcpConnector(), state.is_in_mesh)
    pool = upstream.UpstreamPool(cfg.connect_timeout, mesh)
    served = engine.Engine(
        state,
        state,
        pool,
        rules=state,
        policies=state,
        workloads=state,
        telemetry=tel,
        tracer=tracer,
    )
    listener = tunnel.HboneListener(
        served,
        context=me.server_context,
        trust_domain=cfg.trust_domain,
        resolve=state.resolve,
        handshake_timeout=cfg.connect_timeout,
    )

    # Delta xDS: Address (services, workloads) and the traffic objects.
    xds = xds_client.DeltaXdsClient(
        cfg.xds_address,
        node_id=cfg.node_id,
        node_metadata={"NAME": cfg.name, "NAMESPACE": cfg.namespace, "NODE_NAME": cfg.node_name},
        token_file=cfg.token_file,
        cluster_id=cfg.cluster_id,
        type_urls=[types.ADDRESS, types.TRAFFIC],
        handler=state,
    )

    # Metrics and readiness: ready once tunnels are taken (certificate, xDS synced, bound).
    listening = asyncio.Event()

    def not_ready_reason() -> str | None:
        if not me.ready.is_set():
            return "waiting for a certificate"
        if not xds.is_synced:
            return "waiting for the first xDS update"
        if not listening.is_set():
            return "binding the HBONE listener"
        return None

    servers = [
        await http.start_server(endpoints.metrics_handler(registry), *cfg.metrics_addr),
        await http.start_server(endpoints.readiness_handler(not_ready_reason), *cfg.readiness_addr),
    ]
    if threading.current_thread() is threading.main_thread():  # tests run it on other loops
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    logger.info(
        "waypoint started",
        extra=log.fields(name=f"{cfg.namespace}/{cfg.name}", identity=cfg.identity.uri),
    )
    try:
        async with asyncio.TaskGroup() as group:
            background = [
                group.create_task(me.run(), name="certificate"),
                group.create_task(xds.run(), name="xds"),
                group.create_task(
                    _serve_once_ready(cfg, me, xds, listener, listening), name="hbone"
                ),
                group.create_task(_trace_loop(cfg, state, tracer), name="tracing"),
            ]
            await stop.wait()
            for task in background:
                task.cancel()
    finally:
        for server in servers:
            server.close()
        pool.close()
        connector.close()
        await tracer.flush()
        await ca.close()
        logger.info("waypoint stopped")


async def _serve_once_ready(
    cfg: config_mod.Config,
    me: identity.WaypointIdentity,
    xds: xds_client.DeltaXdsClient,
    listener: tunnel.HboneListener,
    listening: asyncio.Event,
) -> None:
    await me.ready.wait()
    await xds.wait_synced()
    sock = socket.create_server(cfg.hbone_addr, reuse_port=False)
    sock.setblocking(False)
    listening.set()
    logger.info("waypoint accepting tunnels", extra=log.fields(address=f"{cfg.hbone_addr}"))
    try:
        await listener.serve(sock)
    finally:
        sock.close()


async def _trace_loop(
    cfg: config_mod.Config, state: state_mod.WaypointState, tracer: tracing.Tracer
) -> None:
    while True:
        await asyncio.sleep(cfg.trace_flush_interval)
        tracer.sample_percent = state.tracing_sample_percent()  # Telemetry changes apply
        await tracer.flush()


def main() -> None:
    try:
        cfg = config_mod.Config.from_env(os.environ)
    except config_mod.ConfigError as exc:
        print(f"waypoint: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    log.configure(cfg.log_level)
    runtime.run(run(cfg), collector_tuned=True)
