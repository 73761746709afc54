"""Outbound: connections the pod's app makes, redirected to port 15001 inside the pod.

For each: read the original destination, build a plan (routing.build_outbound), then carry it
out: a CONNECT stream on a pooled HBONE connection to the destination's ztunnel (or to its
waypoint, with the original destination as the stream's authority), or plain TCP passthrough
for destinations outside the mesh. Failures close the app's connection and are counted and
logged with the reason.

The pool key is the plan's TCP target and expected identities: every stream through one
waypoint pod shares its connections, whichever service or pod each stream's authority names.
"""

from __future__ import annotations

import asyncio
import logging
import typing

from meshcore import log
from meshcore.aio import hbone, relay, tasks
from meshcore.model import workload
from meshcore.wire import hbone as hbone_wire
from ztunnel import telemetry
from ztunnel.identity import manager
from ztunnel.inpod import pod_network
from ztunnel.proxy import pool, routing, session
from ztunnel.proxy.inputs import PodContext, ProxyInputs

logger = logging.getLogger("ztunnel.outbound")


class OutboundProxy:
    def __init__(self, inputs: ProxyInputs, pod: PodContext) -> None:
        self._inputs = inputs
        self._pod = pod
        self._tasks = tasks.TaskSet()
        # The baggage header of the last source workload seen (the pod's own, nearly always).
        self._baggage: tuple[workload.Workload | None, str] = (None, "")
        self.pool = pool.HbonePool(
            self._connect_hbone,
            max_streams=inputs.config.pool_max_streams,
            idle_timeout=inputs.config.pool_idle_timeout,
        )

    def protocol(self) -> relay.TcpEnd:
        return relay.TcpEnd(on_connected=lambda down: self._tasks.spawn(self._handle(down)))

    def close(self) -> None:
        self._tasks.cancel_all()
        self.pool.close()

    async def _handle(self, down: relay.TcpEnd) -> None:
        inputs, pod = self._inputs, self._pod
        assert down.transport is not None
        peer = down.transport.get_extra_info("peername")
        record = telemetry.ConnectionRecord(
            direction="outbound",
            src_addr=telemetry.format_addr(peer),
            dst_addr="",
            source_identity=pod.identity,
        )
        try:
            original = pod_network.original_dst(down.transport.get_extra_info("socket"))
            record.dst_addr = telemetry.format_addr(original)
            source = pod.find_workload(inputs.state) or pod.fallback_workload()
            record.source = source
            plan = routing.build_outbound(inputs.state, source, original)
            if isinstance(plan, routing.Refusal):
                record.flag, record.error = plan.flag.value, plan.reason
                record.service = plan.service
                down.abort()
                return
            record.destination, record.service = plan.destination, plan.service
            if plan.destination is not None:
                record.destination_identity = routing.identity_of(plan.destination)
            if plan.route is routing.Route.HBONE:
                stream, link = await self._open_tunnel(down, plan, peer, record)
                await session.run(inputs, pod, down, stream, record, started=link)
            else:
                upstream = await self._open_passthrough(plan)
                await session.run(inputs, pod, down, upstream, record)
        except hbone.HboneConnectError as exc:
            record.flag, record.error = exc.flag, str(exc)
            down.abort()
        except (OSError, TimeoutError) as exc:
            record.flag = routing.Flag.CONNECT.value
            record.error = f"upstream connect failed: {str(exc) or type(exc).__name__}"
            down.abort()
        except asyncio.CancelledError:
            record.error = "proxy stopped"
            down.abort()
            raise
        except Exception as exc:
            logger.exception("outbound connection failed", extra=log.fields(src=record.src_addr))
            record.error = f"internal error: {exc}"
            down.abort()
        finally:
            inputs.telemetry.finished(record)

    async def _open_passthrough(self, plan: routing.OutboundPlan) -> relay.TcpEnd:
        sock = await self._pod.network.connect(
            plan.target, timeout=self._inputs.config.connect_timeout
        )
        return await session.tcp_end(sock)

    async def _open_tunnel(
        self,
        down: relay.TcpEnd,
        plan: routing.OutboundPlan,
        peer: tuple[str, int],
        record: telemetry.ConnectionRecord,
    ) -> tuple[hbone.HboneStreamEnd, relay.Relay]:
        """A CONNECT stream, established, already relayed to the client: the client's first
        bytes go out right behind the CONNECT (optimistic data) instead of a round trip later.
        The destination holds them until it has authorized the call and connected the app, and
        drops them if it refuses; here a refusal aborts the relay."""
        assert plan.authority is not None
        record.mutual_tls = True
        record.hbone_addr = plan.authority
        key = pool.PoolKey(
            source_identity=self._pod.identity,
            destination_identities=plan.expected_identities,
            destination=plan.target,
            source_ip=peer[0],
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._inputs.config.connect_timeout
        conn = self.pool.find_ready(key)
        if conn is None:
            async with asyncio.timeout_at(deadline):
                conn = await self.pool.fetch(key)
        stream = conn.open_stream(plan.authority, self._request_headers(plan, peer))
        response = stream.response
        assert response is not None
        link = session.start(self._pod, down, stream)
        try:
            if not response.done():
                await tasks.wait_any(response, link.done, deadline=deadline)
        except BaseException:
            session.abandon(self._pod, link, "no CONNECT response in time")
            raise
        if not response.done():
            # The relay ended first: the client went away (or the pod did).
            reason = "client closed before the tunnel was established"
            if link.error:
                reason += f" ({link.error})"
            session.abandon(self._pod, link, reason)
            raise hbone.HboneConnectError(reason, routing.Flag.NONE.value)
        if response.exception() is not None:
            session.abandon(self._pod, link, "HBONE stream failed")
            raise typing.cast(BaseException, response.exception())
        status, _headers = response.result()
        if status != 200:
            session.abandon(self._pod, link, f"HBONE CONNECT refused with {status}")
            flag = routing.Flag.DENY.value if status == 401 else routing.Flag.CONNECT.value
            raise hbone.HboneConnectError(f"HBONE CONNECT refused with {status}", flag, status)
        return stream, link

    def _request_headers(
        self, plan: routing.OutboundPlan, peer: tuple[str, int]
    ) -> list[tuple[str, str]]:
        src = plan.source
        host = plan.service.hostname if plan.service is not None else None
        cached_for, baggage = self._baggage
        if cached_for is not src:
            baggage = hbone_wire.baggage_header(_baggage(src))
            self._baggage = (src, baggage)
        return [
            ("forwarded", hbone_wire.forwarded_header(peer[0], peer[1], host)),
            ("baggage", baggage),
            ("traceparent", hbone_wire.new_traceparent()),
        ]

    async def _connect_hbone(self, key: pool.PoolKey) -> hbone.HboneClientProtocol:
        inputs = self._inputs
        try:
            context = await inputs.certs.fetch_client_context(key.source_identity)
        except manager.CertificateUnavailableError as exc:
            # Fail closed: without our own certificate there is no mTLS, so no connection.
            raise hbone.HboneConnectError(str(exc), routing.Flag.IDENTITY_ERROR.value) from exc
        sock = await self._pod.network.connect(
            key.destination, timeout=inputs.config.connect_timeout
        )
        return await hbone.connect(
            sock,
            context=context,
            expected=key.destination_identities,
            timeout=inputs.config.connect_timeout,
            keepalive=(inputs.config.pool_keepalive_interval, inputs.config.pool_keepalive_timeout),
        )


def _baggage(src: workload.Workload) -> dict[str, str]:
    kind = {
        workload.WorkloadType.DEPLOYMENT: "deployment",
        workload.WorkloadType.CRONJOB: "cronjob",
        workload.WorkloadType.JOB: "job",
    }.get(src.workload_type, "pod")
    return {
        "k8s.cluster.name": src.cluster_id,
        "k8s.namespace.name": src.namespace,
        f"k8s.{kind}.name": src.workload_name or src.name,
        "service.name": src.canonical_name or src.name,
        "service.version": src.canonical_revision or "latest",
    }
