"""ztunnel's composition root: builds every part in order and runs them until told to stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys

import prometheus_client

from meshcore import log
from meshcore.aio import endpoints, http, runtime
from meshcore.identity import ca_client
from meshcore.xds import client as xds_client
from meshcore.xds import types
from ztunnel import config as config_mod
from ztunnel import telemetry
from ztunnel.admin import server as admin
from ztunnel.identity import manager as cert_manager
from ztunnel.inpod import manager as inpod_manager
from ztunnel.inpod import pod_network, zds_client
from ztunnel.proxy import connection_manager
from ztunnel.proxy.inputs import ProxyInputs
from ztunnel.state import proxy_state

logger = logging.getLogger("ztunnel")


def check_capabilities() -> None:
    """ztunnel marks every pod socket; without CAP_NET_ADMIN the rules would loop traffic."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, pod_network.SO_MARK, pod_network.INPOD_MARK)
    except PermissionError:
        raise SystemExit("ztunnel: cannot set SO_MARK: CAP_NET_ADMIN is required") from None
    finally:
        probe.close()


async def run(cfg: config_mod.Config) -> None:
    loop = asyncio.get_running_loop()

    # Everything the proxies read: workloads, services and policies from xDS.
    state = proxy_state.ProxyState()

    # Authorized inbound connections, decided again whenever an xDS update changes a policy
    # (spec section 6, item 6). The watcher subscribes to ProxyState here, before xDS runs, and
    # wakes when an update is applied: no timer is involved.
    connections = connection_manager.ConnectionManager()
    policy_watcher = connection_manager.PolicyWatcher(state, connections)

    # Telemetry in its own registry, served on the metrics port.
    registry = prometheus_client.CollectorRegistry()
    metrics = telemetry.Metrics(registry)
    tel = telemetry.Telemetry(metrics)

    # Workload certificates from the controller's CA, one per local identity.
    ca = ca_client.GrpcCaClient(cfg.ca_address, cfg.token_file, cfg.cluster_id)
    certs = cert_manager.CertManager(
        ca, trust_domain=cfg.trust_domain, ttl=cfg.secret_ttl, clock=cert_manager.SystemClock()
    )

    # Delta xDS: Address (workloads, services) and Authorization resources.
    xds = xds_client.DeltaXdsClient(
        cfg.xds_address,
        node_id=cfg.node_id,
        node_metadata={
            "NAME": cfg.pod_name,
            "NAMESPACE": cfg.pod_namespace,
            "INSTANCE_IPS": cfg.instance_ip,
            "NODE_NAME": cfg.node_name,
        },
        token_file=cfg.token_file,
        cluster_id=cfg.cluster_id,
        type_urls=[types.ADDRESS, types.AUTHORIZATION],
        handler=state,
    )

    # In-pod proxies, started and stopped by the node agent over ZDS.
    inputs = ProxyInputs(
        config=cfg, state=state, certs=certs, telemetry=tel, connections=connections
    )
    workloads = inpod_manager.WorkloadManager(inputs)
    zds = zds_client.ZdsClient(cfg.zds_socket, workloads)

    # Readiness, metrics and admin endpoints in the node's namespace.
    stop = asyncio.Event()

    def not_ready_reason() -> str | None:
        if not xds.is_synced:
            return "waiting for the first xDS update"
        if not zds.is_ready:
            return "waiting for the node agent's workload snapshot"
        return None

    servers = [
        await http.start_server(endpoints.metrics_handler(registry), *cfg.metrics_addr),
        await http.start_server(endpoints.readiness_handler(not_ready_reason), *cfg.readiness_addr),
        await http.start_server(
            admin.admin_handler(
                cfg,
                state,
                lambda: {"certificates": certs.states(), "workloadState": workloads.dump()},
                stop.set,
            ),
            *cfg.admin_addr,
        ),
    ]
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    logger.info(
        "ztunnel started",
        extra=log.fields(node=cfg.node_name, xds=cfg.xds_address, zds=cfg.zds_socket),
    )

    try:
        async with asyncio.TaskGroup() as group:
            background = [
                group.create_task(policy_watcher.run(), name="policy-watcher"),
                group.create_task(certs.run(), name="certificates"),
                group.create_task(xds.run(), name="xds"),
                group.create_task(_serve_pods_once_synced(xds, zds), name="zds"),
            ]
            await stop.wait()
            logger.info("ztunnel draining", extra=log.fields(deadline=cfg.drain_deadline))
            await _drain(workloads, cfg.drain_deadline)
            for task in background:
                task.cancel()
    finally:
        for server in servers:
            server.close()
        workloads.stop_all("ztunnel shutting down")
        await certs.close()
        await ca.close()
        logger.info("ztunnel stopped")


async def _serve_pods_once_synced(
    xds: xds_client.DeltaXdsClient, zds: zds_client.ZdsClient
) -> None:
    """Take pods from the node agent only once workloads *and* policies have arrived: a pod
    proxied before its AuthorizationPolicies would admit what they deny (fail closed)."""
    await xds.wait_synced()
    await zds.run()


async def _drain(workloads: inpod_manager.WorkloadManager, deadline: float) -> None:
    """Stop accepting, then give live connections until the deadline to finish."""
    for proxy in workloads.proxies.values():
        proxy.stop_accepting()
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while loop.time() < end and any(p.pod.relays for p in workloads.proxies.values()):
        waiters = [r.done for p in workloads.proxies.values() for r in p.pod.relays]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(end - loop.time()):
                await asyncio.wait(waiters, return_when=asyncio.ALL_COMPLETED)


def main() -> None:
    try:
        cfg = config_mod.Config.from_env(os.environ)
    except config_mod.ConfigError as exc:
        print(f"ztunnel: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    log.configure(cfg.log_level)
    check_capabilities()
    runtime.run(run(cfg), collector_tuned=True)
