"""The node agent's composition root: builds every part in order and runs until told to stop.

Start-up order matters: the captures are restored from the netns cache BEFORE the ZDS server
listens, so the first ztunnel to connect gets a snapshot listing every pod it must keep serving
(an empty one would make it drop them while their traffic is still redirected).

Stopping (SIGTERM/SIGINT) closes the plugin socket first (no new CNI calls), lets pod operations
in flight finish, then closes the ZDS server and the API client. Nothing is released: ztunnel
keeps serving the captured pods and the next agent picks them up again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from cni.agent import captures, netns_cache, plugin_server, zds_server
from cni.agent import config as config_mod
from cni.agent import reconciler as reconciler_mod
from cni.redirect import ebpf, redirector
from meshcore import errors, log
from meshcore.aio import runtime
from meshcore.kube import client as kube_client
from meshcore.kube import errors as kube_errors

logger = logging.getLogger("cni.agent")

PROGRAM = "mesh-cni-agent"


def _make_socket_dir(path: str) -> None:
    # The directory is shared with the peer (ztunnel's mount, the CNI plugin's netconf).
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)


async def run(cfg: config_mod.Config) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    # How pods are captured; eBPF mode compiles its programs here, so a node without BCC or
    # kernel headers fails now, naming what is missing, not at its first pod.
    pod_redirector = redirector.Redirector(
        mode=cfg.redirect_mode, programs=ebpf.Programs(cfg.bpf_pin_dir)
    )
    await asyncio.to_thread(pod_redirector.prepare)

    # The netns cache: how a restarted agent finds the pods it captured before.
    cache = netns_cache.NetnsCache(cfg.state_dir)
    cache.load()

    # The Kubernetes API (the controller's local API server in the playground).
    api = kube_client.ApiClient(cfg.kube_api)

    # What ztunnel must serve: written by the reconciler, read by every ZDS snapshot.
    capture_table = captures.CaptureTable()
    zds = zds_server.ZdsServer(cfg.ztunnel_socket, capture_table.snapshot)

    # The reconciler: namespace and pod informers, per-pod workers, in-pod redirection.
    reconciler = reconciler_mod.Reconciler(
        node_name=cfg.node_name,
        api=api,
        zds=zds,
        redirector=pod_redirector,
        cache=cache,
        capture_table=capture_table,
        dns_capture=cfg.dns_capture,
        system_namespace=cfg.system_namespace,
    )

    # CNI ADD/DEL/CHECK from mesh-cni, answered by the reconciler.
    plugin = plugin_server.PluginEventServer(cfg.cni_event_socket, reconciler)

    runner: asyncio.Task[None] | None = None
    try:
        await reconciler.restore()
        _make_socket_dir(cfg.ztunnel_socket)
        await zds.start()
        _make_socket_dir(cfg.cni_event_socket)
        await plugin.start()
        runner = asyncio.create_task(reconciler.run(), name="reconciler")
        stopping = asyncio.create_task(stop.wait(), name="stop-signal")
        logger.info(
            "node agent started",
            extra=log.fields(
                node=cfg.node_name,
                kube_api=cfg.kube_api,
                zds=cfg.ztunnel_socket,
                cni=cfg.cni_event_socket,
                dns_capture=cfg.dns_capture,
                redirect_mode=cfg.redirect_mode,
            ),
        )
        try:
            await asyncio.wait({runner, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            await asyncio.wait({stopping})
    finally:
        logger.info("node agent stopping")
        await plugin.close()
        crash: BaseException | None = None
        if runner is not None:
            runner.cancel()
            await asyncio.wait({runner})
            crash = None if runner.cancelled() else runner.exception()
        await reconciler.close()
        await zds.close()
        await api.close()
        logger.info("node agent stopped")
    if crash is not None:
        raise crash


def main() -> None:
    try:
        cfg = config_mod.Config.from_env(os.environ)
    except config_mod.ConfigError as exc:
        print(f"{PROGRAM}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    log.configure(cfg.log_level)
    try:
        runtime.run(run(cfg))
    except kube_errors.KubeConfigError as exc:
        print(f"{PROGRAM}: KUBE_API: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except (errors.MeshError, OSError) as exc:
        print(f"{PROGRAM}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
