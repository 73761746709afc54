"""Inbound: HBONE tunnels arriving on the pod's port 15008, and plaintext on 15006.

HBONE: TLS with the pod's own certificate (the peer must present one from the mesh CA in our
trust domain), then per CONNECT stream: validate and authorize (routing.build_inbound), connect
to the app from inside the pod, and answer 200 only once that connect succeeded (401 on deny,
503 when the app can't be reached, 400 for a malformed request). A workload with an application
tunnel (spec section 2, item 6) is connected to on its tunnel port instead, and with PROXY it
first gets a PROXY v2 header naming the client and its SPIFFE ID.

Plaintext (15006) is what unenrolled clients send; the in-pod rules redirect it here. It is
authorized with no peer identity, so a policy requiring one (PeerAuthentication STRICT) rejects it.
It always goes to the port the client dialled: there is no identity for an application tunnel to
carry.

Authorization is continuous on both paths (spec section 6, item 6): every allowed connection is
tracked in `inputs.connections` with what it was authorized on, and one that a policy update
denies is closed (HBONE: the stream is reset; plaintext: the TCP connection) along with its app
side, and recorded with response_flags DENY.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket

from meshcore import log
from meshcore.aio import hbone, relay, tasks
from meshcore.model import workload
from meshcore.wire import hbone as hbone_wire
from ztunnel import telemetry
from ztunnel.inpod import pod_network
from ztunnel.proxy import routing, session
from ztunnel.proxy.inputs import PodContext, ProxyInputs

logger = logging.getLogger("ztunnel.inbound")

_ACCEPT_BACKOFF = 0.1  # seconds before accepting again after EMFILE and the like

# Binding to the client's address needs IP_TRANSPARENT and the in-pod return route; when either
# is missing we still connect, just without preserving the source address.
_SPOOF_UNAVAILABLE = {errno.EADDRNOTAVAIL, errno.EPERM, errno.EACCES, errno.EINVAL}


class InboundProxy:
    """Port 15008 of one pod."""

    def __init__(self, inputs: ProxyInputs, pod: PodContext) -> None:
        self._inputs = inputs
        self._pod = pod
        self._tasks = tasks.TaskSet()
        self._connections: set[hbone.HboneServerProtocol] = set()

    async def serve(self, listener: socket.socket) -> None:
        """Accept on the pod's 15008 until cancelled; each connection does TLS in its own task."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError as exc:
                # Out of file descriptors or buffers: keep the listener, back off a little.
                logger.warning(
                    "inbound accept failed",
                    extra=log.fields(pod=self._pod.info.name, error=str(exc)),
                )
                await asyncio.sleep(_ACCEPT_BACKOFF)
                continue
            if not self._inputs.handshakes.try_acquire(self._say_handshakes_exhausted):
                sock.close()  # the peer retries; its pool makes that rare
                continue
            self._tasks.spawn(self._handshake(sock))

    def _say_handshakes_exhausted(self) -> None:
        logger.warning(
            "too many inbound TLS handshakes in progress; refusing new connections",
            extra=log.fields(pod=self._pod.info.name, limit=self._inputs.handshakes.limit),
        )

    def close(self) -> None:
        self._tasks.cancel_all()
        for conn in list(self._connections):
            conn.abort()

    async def _handshake(self, sock: socket.socket) -> None:
        try:
            await self._accept_tls(sock)
        finally:
            self._inputs.handshakes.release()

    async def _accept_tls(self, sock: socket.socket) -> None:
        inputs = self._inputs
        try:
            peer = sock.getpeername()
        except OSError:
            peer = None  # already reset by the peer; the handshake below fails and says so
        # Control frames (RST_STREAM after a late policy rejection, 401s, WINDOW_UPDATEs) are
        # small writes: without this, Nagle holds them back for a delayed ACK (~40 ms). uvloop
        # sets it anyway; the stock loop skips sockets created with proto 0.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            context = await inputs.certs.fetch_server_context(self._pod.identity)
            conn = await hbone.accept(
                sock,
                context=context,
                trust_domain=self._pod.identity.trust_domain,
                on_request=self._on_request,
                timeout=inputs.config.connect_timeout,
            )
        except asyncio.CancelledError:
            sock.close()
            raise
        except Exception as exc:
            sock.close()
            # Wrong CA, wrong trust domain, no ALPN, garbage instead of TLS: refuse the peer.
            logger.warning(
                "inbound HBONE handshake refused",
                extra=log.fields(peer=str(peer), pod=self._pod.info.name, error=str(exc)),
            )
            flag = exc.flag if isinstance(exc, hbone.HboneConnectError) else None
            record = telemetry.ConnectionRecord(
                direction="inbound",
                src_addr=telemetry.format_addr(peer),
                dst_addr="",
                destination=self._pod.find_workload(inputs.state),
                destination_identity=self._pod.identity,
                mutual_tls=True,
                flag=flag or routing.Flag.TLS_FAILURE.value,
                error=str(exc),
            )
            inputs.telemetry.finished(record)
            return
        self._connections.add(conn)
        conn.closed.add_done_callback(lambda _: self._connections.discard(conn))

    def _on_request(
        self, conn: hbone.HboneServerProtocol, event: hbone_wire.TunnelRequested
    ) -> None:
        self._tasks.spawn(self._serve_tunnel(conn, event))

    async def _serve_tunnel(
        self, conn: hbone.HboneServerProtocol, event: hbone_wire.TunnelRequested
    ) -> None:
        inputs, pod = self._inputs, self._pod
        peer = conn.peer_address or ("0.0.0.0", 0)
        # Indexed, not unpacked: an IPv6 peername is (host, port, flowinfo, scope_id).
        peer_ip_text, peer_port = peer[0], peer[1]
        peer_ip = routing.parse_ip(peer_ip_text)
        forwarded_for, forwarded_host = _forwarded(event.headers)
        record = telemetry.ConnectionRecord(
            direction="inbound",
            src_addr=forwarded_for or telemetry.format_addr(conn.peer_address),
            dst_addr=event.authority,
            hbone_addr=event.authority,
            source=inputs.state.workloads.find_by_address(peer_ip),
            source_identity=conn.peer_identity,
            destination_identity=pod.identity,
            mutual_tls=True,
        )
        try:
            local = await _local_workload(inputs, pod)
            record.destination = local
            record.service = _attributed_service(inputs, local, forwarded_host)
            if local is None:
                conn.reject(event.stream_id, 503)
                record.flag = routing.Flag.CONNECT.value
                record.error = "local workload is not known yet (no xDS record)"
                return
            _, source_port = routing.client_address((peer_ip_text, peer_port), forwarded_for)
            plan = routing.build_inbound(
                inputs.state,
                local,
                peer_identity=conn.peer_identity,
                source_ip=peer_ip,
                source_port=source_port,
                authority=event.authority,
                method=event.method,
                local_ip=_local_ip(conn),
                is_hbone=True,
            )
            if isinstance(plan, routing.Refusal):
                conn.reject(event.stream_id, plan.status)
                record.flag, record.error = plan.flag.value, plan.reason
                return
            # Tracked from the decision on (no await in between), so a policy update that
            # lands while we connect to the app is not missed.
            with inputs.connections.track(plan.authorized, local) as tracked:
                try:
                    app = await _connect_app(
                        inputs,
                        pod,
                        plan.target,
                        (peer_ip_text, source_port),
                        header=plan.proxy_header,
                    )
                except (OSError, TimeoutError) as exc:
                    conn.reject(event.stream_id, 503)
                    record.flag = routing.Flag.CONNECT.value
                    record.error = f"connect to {plan.target[0]}:{plan.target[1]} failed: {exc}"
                    return
                if tracked.revocation is not None:
                    app.abort()
                    conn.reject(event.stream_id, 401)
                    record.flag, record.error = routing.Flag.DENY.value, tracked.revocation
                    return
                stream = conn.accept(event.stream_id)
                if stream is None:
                    app.abort()
                    record.error = "stream ended before it was accepted"
                    return
                await session.run(inputs, pod, stream, app, record, tracked=tracked)
        except asyncio.CancelledError:
            record.error = record.error or "proxy stopped"
            raise
        except Exception as exc:
            logger.exception("inbound tunnel failed", extra=log.fields(pod=pod.info.name))
            conn.reject(event.stream_id, 503)
            record.error = f"internal error: {exc}"
        finally:
            inputs.telemetry.finished(record)


class PlaintextInboundProxy:
    """Port 15006 of one pod: plaintext from clients outside the mesh."""

    def __init__(self, inputs: ProxyInputs, pod: PodContext) -> None:
        self._inputs = inputs
        self._pod = pod
        self._tasks = tasks.TaskSet()

    def protocol(self) -> relay.TcpEnd:
        return relay.TcpEnd(on_connected=lambda down: self._tasks.spawn(self._handle(down)))

    def close(self) -> None:
        self._tasks.cancel_all()

    async def _handle(self, down: relay.TcpEnd) -> None:
        inputs, pod = self._inputs, self._pod
        assert down.transport is not None
        peer = down.transport.get_extra_info("peername")
        record = telemetry.ConnectionRecord(
            direction="inbound",
            src_addr=telemetry.format_addr(peer),
            dst_addr="",
            destination_identity=pod.identity,
        )
        try:
            original = pod_network.original_dst(down.transport.get_extra_info("socket"))
            record.dst_addr = telemetry.format_addr(original)
            peer_ip = routing.parse_ip(peer[0])
            record.source = inputs.state.workloads.find_by_address(peer_ip)
            local = await _local_workload(inputs, pod)
            record.destination = local
            if local is None:
                record.flag = routing.Flag.CONNECT.value
                record.error = "local workload is not known yet (no xDS record)"
                down.abort()
                return
            plan = routing.build_inbound(
                inputs.state,
                local,
                peer_identity=None,
                source_ip=peer_ip,
                authority=hbone_wire.format_authority(original[0], original[1]),
            )
            if isinstance(plan, routing.Refusal):
                # Refused before the app is dialled: it never sees the connection.
                record.flag, record.error = plan.flag.value, plan.reason
                down.abort()
                return
            # Tracked from the decision on (no await in between): see the HBONE path.
            with inputs.connections.track(plan.authorized, local) as tracked:
                # The client's own port is not reused here: its connection, redirected to
                # us, shares this namespace, and the same 4-tuple would be taken for it.
                app = await _connect_app(inputs, pod, plan.target, (peer[0], None))
                if tracked.revocation is not None:
                    app.abort()
                    down.abort()
                    record.flag, record.error = routing.Flag.DENY.value, tracked.revocation
                    return
                await session.run(inputs, pod, down, app, record, tracked=tracked)
        except (OSError, TimeoutError) as exc:
            record.flag = routing.Flag.CONNECT.value
            record.error = f"connect to the app failed: {exc}"
            down.abort()
        except asyncio.CancelledError:
            record.error = record.error or "proxy stopped"
            down.abort()
            raise
        except Exception as exc:
            logger.exception("plaintext inbound failed", extra=log.fields(pod=pod.info.name))
            record.error = f"internal error: {exc}"
            down.abort()
        finally:
            inputs.telemetry.finished(record)


async def _local_workload(inputs: ProxyInputs, pod: PodContext) -> workload.Workload | None:
    found = pod.find_workload(inputs.state)
    if found is not None:
        return found
    return await inputs.state.fetch_local_workload(
        pod.node,
        pod.info.namespace,
        pod.info.service_account,
        pod.info.name,
        inputs.config.workload_wait,
    )


async def _connect_app(
    inputs: ProxyInputs,
    pod: PodContext,
    target: tuple[str, int],
    client: tuple[str, int | None],
    *,
    header: bytes | None = None,
) -> relay.TcpEnd:
    """Connect to the app from inside the pod, keeping the client's address (and, when given,
    its port) when possible. Only HBONE callers give the port: there the client's own
    connection lives in another namespace.

    `header` (an application tunnel's PROXY header) is sent before the relay exists, so it is
    the app's first bytes and the relay's data path stays as it is; a failure to send it counts
    as a failed connect.
    """
    timeout = inputs.config.connect_timeout
    try:
        sock = await pod.network.connect(
            target, timeout=timeout, source_ip=client[0], source_port=client[1]
        )
    except OSError as exc:
        if exc.errno not in _SPOOF_UNAVAILABLE:
            raise
        sock = await pod.network.connect(target, timeout=timeout)
    if header:
        try:
            async with asyncio.timeout(timeout):
                await asyncio.get_running_loop().sock_sendall(sock, header)
        except BaseException:
            sock.close()
            raise
    return await session.tcp_end(sock)


def _local_ip(
    conn: hbone.HboneServerProtocol,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The pod address the tunnel arrived on."""
    sockname = conn.transport.get_extra_info("sockname") if conn.transport else None
    if not isinstance(sockname, tuple):
        return None
    try:
        return routing.parse_ip(sockname[0])
    except ValueError:
        return None


def _forwarded(headers: tuple[tuple[str, str], ...]) -> tuple[str | None, str | None]:
    for name, value in headers:
        if name == "forwarded":
            return hbone_wire.parse_forwarded(value)
    return (None, None)


def _attributed_service(
    inputs: ProxyInputs, local: workload.Workload | None, host: str | None
) -> workload.Service | None:
    """The Service the client targeted, from `forwarded: host=`; only used for telemetry."""
    if local is None or not host:
        return None
    for svc in inputs.state.services.find_by_hostname(host):
        if local.binding(svc.key) is not None:
            return svc
    return None
