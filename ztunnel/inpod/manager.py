"""Per-pod proxies, started and stopped as the node agent adds and removes pods over ZDS.

For each pod: keep its network namespace (through a dedicated thread), open the three listeners
inside it (15001 outbound, 15006 plaintext inbound, 15008 HBONE) and start warming the
certificate of its identity. The Ack goes back to the agent only after the listeners exist, so
the agent installs the redirection rules only when something is there to receive the traffic.

Invariants: a uid maps to at most one running pod proxy; a replaced or deleted pod's listeners
are closed and its connections aborted before the entry goes away; the netns fd passed in is
always closed (PodNetwork keeps its own duplicate).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Any

from meshcore import log, netns
from meshcore.identity import spiffe
from meshcore.wire import zds
from ztunnel.inpod import pod_network
from ztunnel.proxy import inbound, outbound
from ztunnel.proxy.inputs import PodContext, ProxyInputs

logger = logging.getLogger("ztunnel.inpod")

OUTBOUND_PORT = pod_network.OUTBOUND_PORT
INBOUND_PLAINTEXT_PORT = pod_network.INBOUND_PLAINTEXT_PORT
INBOUND_HBONE_PORT = pod_network.INBOUND_HBONE_PORT


class PodProxy:
    """The listeners and connections of one pod."""

    def __init__(self, inputs: ProxyInputs, pod: PodContext) -> None:
        self.pod = pod
        self.outbound = outbound.OutboundProxy(inputs, pod)
        self.inbound = inbound.InboundProxy(inputs, pod)
        self.plaintext = inbound.PlaintextInboundProxy(inputs, pod)
        self.servers: list[asyncio.Server] = []
        self.hbone_listener: socket.socket | None = None
        self._hbone_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        network = self.pod.network
        try:
            for port, factory in (
                (OUTBOUND_PORT, self.outbound.protocol),
                (INBOUND_PLAINTEXT_PORT, self.plaintext.protocol),
            ):
                # 15001 answers for other addresses in eBPF mode (cni/redirect/ebpf.py).
                sock = network.listen(port, transparent=port == OUTBOUND_PORT)
                server = await loop.create_server(factory, sock=sock)
                self.servers.append(server)
            # HBONE: TLS must own each socket from its first byte, so no asyncio.Server here.
            self.hbone_listener = network.listen(INBOUND_HBONE_PORT)
            self._hbone_task = loop.create_task(self.inbound.serve(self.hbone_listener))
        except BaseException:
            self.stop("start failed")
            raise

    def stop_accepting(self) -> None:
        """Close the pod's listeners; connections already accepted carry on."""
        for server in self.servers:
            server.close()
        self.servers.clear()
        listener, task = self.hbone_listener, self._hbone_task
        self.hbone_listener = self._hbone_task = None
        if task is not None:
            task.cancel()
            # Closed once the accept has been withdrawn from the loop, never under its reader.
            if listener is not None:
                task.add_done_callback(lambda _: listener.close())
        elif listener is not None:
            listener.close()

    def stop(self, reason: str) -> None:
        """Stop accepting, then abort every live connection of the pod (it is gone)."""
        self.pod.is_closing = True
        self.stop_accepting()
        self.outbound.close()
        self.inbound.close()
        self.plaintext.close()
        for link in list(self.pod.relays):
            link.abort(reason)
        self.pod.network.close()


class WorkloadManager:
    """ZDS WorkloadHandler: keeps one PodProxy per enrolled pod."""

    def __init__(self, inputs: ProxyInputs) -> None:
        self._inputs = inputs
        self._proxies: dict[str, PodProxy] = {}
        self._lock = asyncio.Lock()

    @property
    def proxies(self) -> dict[str, PodProxy]:
        return self._proxies

    async def add_workload(self, uid: str, info: zds.WorkloadInfo, netns_fd: int) -> None:
        async with self._lock:
            try:
                await self._add(uid, info, netns_fd)
            finally:
                os.close(netns_fd)

    async def _add(self, uid: str, info: zds.WorkloadInfo, netns_fd: int) -> None:
        inputs = self._inputs
        existing = self._proxies.get(uid)
        if existing is not None:
            if existing.pod.network.inode == netns.inode(netns_fd):
                return  # the same sandbox again (e.g. a snapshot replay): nothing to do
            # Same pod uid, new sandbox: the old namespace is gone, replace the proxy.
            self._remove(uid, "pod sandbox replaced")
        identity = spiffe.SpiffeId.for_workload(
            info.namespace, info.service_account, inputs.config.trust_domain
        )
        network = pod_network.PodNetwork(netns_fd, info.name)
        pod = PodContext(
            uid=uid, info=info, identity=identity, node=inputs.config.node_name, network=network
        )
        proxy = PodProxy(inputs, pod)
        await proxy.start()
        self._proxies[uid] = proxy
        inputs.certs.acquire(identity)
        inputs.telemetry.metrics.proxies_started.inc()
        inputs.telemetry.metrics.active_proxies.set(len(self._proxies))
        logger.info(
            "pod proxy started",
            extra=log.fields(uid=uid, pod=f"{info.namespace}/{info.name}", identity=identity.uri),
        )

    async def keep_workload(self, uid: str) -> None:
        # The agent lost this pod's netns fd but the pod still exists: keep what we have.
        if uid not in self._proxies:
            logger.warning("asked to keep an unknown pod", extra=log.fields(uid=uid))

    async def del_workload(self, uid: str) -> None:
        async with self._lock:
            self._remove(uid, "pod removed from the mesh")

    async def snapshot_done(self, keep_uids: frozenset[str]) -> None:
        async with self._lock:
            for uid in [u for u in self._proxies if u not in keep_uids]:
                self._remove(uid, "pod not in the node agent's snapshot")

    def _remove(self, uid: str, reason: str) -> None:
        proxy = self._proxies.pop(uid, None)
        if proxy is None:
            return
        proxy.stop(reason)
        self._inputs.certs.release(proxy.pod.identity)
        self._inputs.telemetry.metrics.proxies_stopped.inc()
        self._inputs.telemetry.metrics.active_proxies.set(len(self._proxies))
        logger.info(
            "pod proxy stopped",
            extra=log.fields(
                uid=uid, pod=f"{proxy.pod.info.namespace}/{proxy.pod.info.name}", reason=reason
            ),
        )

    def stop_all(self, reason: str) -> None:
        for uid in list(self._proxies):
            self._remove(uid, reason)

    def dump(self) -> list[dict[str, Any]]:
        """`workloadState` for the admin config dump."""
        return [
            {
                "uid": uid,
                "name": p.pod.info.name,
                "namespace": p.pod.info.namespace,
                "serviceAccount": p.pod.info.service_account,
                "identity": p.pod.identity.uri,
                "netnsInode": p.pod.network.inode,
                "activeConnections": len(p.pod.relays),
                "pooledConnections": p.outbound.pool.count(),
                "state": "Up",
            }
            for uid, p in sorted(self._proxies.items())
        ]
