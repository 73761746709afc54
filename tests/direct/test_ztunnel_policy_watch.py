"""Continuous authorization on ztunnel's inbound (spec section 6, item 6): real TLS, real sockets.

HBONE: the test's own network namespace plays the server pod; the real `InboundProxy` listens on
a loopback port with the pod's certificate, an echo server plays the app, and ztunnel's own HBONE
client opens long-lived tunnels as two different identities. Policies and workload updates go
in through `ProxyState.apply`, the same call the xDS client makes with each batch.

Plaintext (15006) needs the original destination of a REDIRECTed connection, so those tests build
a network namespace with a nat REDIRECT rule, like the in-pod rules, and run the real
`PlaintextInboundProxy` in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import ipaddress
import logging
import os
import socket
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from typing import Any

import prometheus_client
import pytest

from meshcore import netns
from meshcore.aio import hbone, relay
from meshcore.identity import ca as ca_mod
from meshcore.identity import spiffe, tls
from meshcore.model import authorization, ids, workload
from meshcore.wire import zds
from meshcore.xds import resources, types
from tests.direct import workload_certs
from tests.netns import netns_util
from ztunnel import config as config_mod
from ztunnel import telemetry
from ztunnel.identity import manager
from ztunnel.inpod import pod_network
from ztunnel.proxy import connection_manager, inbound
from ztunnel.proxy.inputs import PodContext, ProxyInputs
from ztunnel.state import proxy_state

NOW = datetime.datetime.now(datetime.UTC)
SERVER_ID = spiffe.SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/server")
WEB_ID = spiffe.SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/web")  # stays allowed
INTRUDER_ID = spiffe.SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/intruder")  # gets denied
LOOPBACK = ipaddress.IPv4Address("127.0.0.1")
APP_PORT = 8080  # plaintext tests: what the client dials, REDIRECTed to 15006
LATE_DEADLINE = 2.0  # the promise: a policy update closes what it now denies within 2 s
WAIT = 5.0  # generous deadline for everything else

SERVER = workload.Workload(
    uid=ids.pod_uid("shop", "server"),
    name="server",
    namespace="shop",
    addresses=(LOOPBACK,),
    node="n1",
    service_account="server",
    tunnel_protocol=workload.TunnelProtocol.HBONE,
)


def _deny(name: str, match: authorization.Match, **kw: Any) -> authorization.Authorization:
    fields: dict[str, Any] = {"namespace": "shop", "scope": authorization.Scope.NAMESPACE} | kw
    return authorization.Authorization(
        name=name,
        action=authorization.Action.DENY,
        rules=(authorization.Rule((authorization.Clause((match,)),)),),
        **fields,
    )


DENY_INTRUDER = _deny(
    "deny-intruder",
    authorization.Match(
        principals=(authorization.StringMatch.from_pattern(INTRUDER_ID.principal),)
    ),
)
# What an effective PeerAuthentication STRICT becomes (spec section 6): any peer without an
# identity is denied. The workloads it covers list its key.
STRICT = _deny(
    "istio_converted_static_strict",
    authorization.Match(
        not_principals=(authorization.StringMatch(authorization.MatchKind.PRESENCE),)
    ),
    namespace="istio-system",
    scope=authorization.Scope.WORKLOAD_SELECTOR,
)
STRICT_SERVER = dataclasses.replace(SERVER, authorization_policies=(STRICT.key,))


# --- plumbing ---


@pytest.fixture(scope="module")
def mesh_ca() -> ca_mod.CertificateAuthority:
    return ca_mod.CertificateAuthority.generate("cluster.local", now=NOW)


class RecordingTelemetry(telemetry.Telemetry):
    """The real metrics and access log, plus a queue of finished records to wait on."""

    def __init__(self) -> None:
        super().__init__(telemetry.Metrics(prometheus_client.CollectorRegistry()))
        self.records: asyncio.Queue[telemetry.ConnectionRecord] = asyncio.Queue()

    def finished(self, record: telemetry.ConnectionRecord) -> None:
        super().finished(record)
        self.records.put_nowait(record)

    async def next_record(self) -> telemetry.ConnectionRecord:
        return await asyncio.wait_for(self.records.get(), WAIT)

    def count(self, metric: str, **labels: str) -> float:
        """Sum of `metric` over every series whose labels include `labels`."""
        total = 0.0
        for family in self.metrics.registry.collect():
            for sample in family.samples:
                if sample.name == metric and labels.items() <= sample.labels.items():
                    total += sample.value
        return total


class EchoApp:
    """The pod's app: echoes every byte; each connection's end is a future the test can await."""

    def __init__(self) -> None:
        self.ended: list[asyncio.Future[None]] = []
        self.server: asyncio.Server | None = None

    async def start(self, sock: socket.socket | None = None) -> int:
        if sock is None:
            self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        else:
            self.server = await asyncio.start_server(self._serve, sock=sock)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ended = asyncio.get_running_loop().create_future()
        self.ended.append(ended)
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass  # reset by ztunnel: that is an end too
        finally:
            writer.close()
            ended.set_result(None)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def _inputs(state: proxy_state.ProxyState, certs_: object, tel: telemetry.Telemetry) -> ProxyInputs:
    inputs = ProxyInputs(
        config=config_mod.Config(
            node_name="n1",
            xds_address="unix:///x",
            ca_address="unix:///x",
            token_file="/x",
            zds_socket="/x",
            connect_timeout=5,
        ),
        state=state,
        certs=typing.cast(manager.CertManager, certs_),
        telemetry=tel,
    )
    return inputs


@contextlib.asynccontextmanager
async def policy_watcher(inputs: ProxyInputs) -> AsyncIterator[None]:
    """As ztunnel/app.py runs it: every policy change ProxyState applies wakes the watcher."""
    watcher = connection_manager.PolicyWatcher(inputs.state, inputs.connections)
    running = asyncio.create_task(watcher.run())
    try:
        yield
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running


def _pod(network: pod_network.PodNetwork) -> PodContext:
    return PodContext(
        uid="u1",
        info=zds.WorkloadInfo("server", "shop", "server"),
        identity=SERVER_ID,
        node="n1",
        network=network,
    )


def _apply_policies(
    state: proxy_state.ProxyState,
    updated: tuple[authorization.Authorization, ...] = (),
    removed: tuple[authorization.Authorization, ...] = (),
) -> None:
    """One Authorization batch, exactly as the xDS client hands it over."""
    batch = [resources.authorization_resource(p) for p in updated]
    assert state.apply(types.AUTHORIZATION, batch, [p.key for p in removed]) == ()


def _apply_workload(state: proxy_state.ProxyState, wl: workload.Workload) -> None:
    assert state.apply(types.ADDRESS, [resources.address_resource(wl)], []) == ()


def _access_log(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [getattr(r, "fields", {}) for r in caplog.records if r.name == "access"]


def _run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    async def checked() -> None:
        await main()
        # Nothing may outlive the test: every relay and handler task has finished.
        pending = asyncio.all_tasks() - {asyncio.current_task()}
        if pending:
            await asyncio.wait(pending, timeout=WAIT)
        assert not [t for t in pending if not t.done()]

    asyncio.run(checked())


# --- HBONE ---


class HookedNetwork:
    """The real pod network, plus a hook that runs while a connect to the app is in flight."""

    def __init__(self, real: pod_network.PodNetwork) -> None:
        self.real = real
        self.hook: Callable[[], Awaitable[None]] | None = None

    async def connect(
        self,
        address: tuple[str, int],
        *,
        timeout: float,
        source_ip: str | None = None,
        source_port: int | None = None,
    ) -> socket.socket:
        hook, self.hook = self.hook, None
        if hook is not None:
            await hook()
        return await self.real.connect(
            address, timeout=timeout, source_ip=source_ip, source_port=source_port
        )

    def close(self) -> None:
        self.real.close()


@dataclasses.dataclass
class Server:
    state: proxy_state.ProxyState
    inputs: ProxyInputs
    tel: RecordingTelemetry
    app: EchoApp
    network: HookedNetwork
    port: int  # the pod's "15008"
    app_port: int


@contextlib.asynccontextmanager
async def hbone_server(mesh_ca: ca_mod.CertificateAuthority) -> AsyncIterator[Server]:
    state = proxy_state.ProxyState()
    state.workloads.insert(SERVER)
    tel = RecordingTelemetry()
    inputs = _inputs(
        state, workload_certs.StaticServerCerts(workload_certs.issue(mesh_ca, SERVER_ID)), tel
    )
    app = EchoApp()
    app_port = await app.start()
    fd = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        network = HookedNetwork(pod_network.PodNetwork(fd, "self"))
    finally:
        os.close(fd)
    proxy = inbound.InboundProxy(inputs, _pod(typing.cast(pod_network.PodNetwork, network)))
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    serving = asyncio.ensure_future(proxy.serve(listener))
    try:
        async with policy_watcher(inputs):
            yield Server(state, inputs, tel, app, network, listener.getsockname()[1], app_port)
    finally:
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving
        proxy.close()
        listener.close()
        network.close()
        await app.close()


@dataclasses.dataclass
class Tunnel:
    """One CONNECT stream, with the client app's side as a stream reader/writer."""

    status: int
    link: relay.Relay | None = None
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None

    async def roundtrip(self, data: bytes) -> bytes:
        assert self.reader is not None
        assert self.writer is not None
        self.writer.write(data)
        return await asyncio.wait_for(self.reader.readexactly(len(data)), WAIT)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.link is not None:
            await asyncio.wait_for(self.link.done, WAIT)


async def _connect(
    mesh_ca: ca_mod.CertificateAuthority, server: Server, identity: spiffe.SpiffeId
) -> hbone.HboneClientProtocol:
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", server.port))
    return await hbone.connect(
        sock,
        context=tls.client_context(workload_certs.issue(mesh_ca, identity)),
        expected=[SERVER_ID],
        timeout=WAIT,
    )


async def _open(conn: hbone.HboneClientProtocol, server: Server) -> Tunnel:
    loop = asyncio.get_running_loop()
    stream = conn.open_stream(f"127.0.0.1:{server.app_port}", [])
    assert stream.response is not None
    status, _ = await asyncio.wait_for(stream.response, WAIT)
    if status != 200:
        return Tunnel(status)
    app_sock, proxy_sock = socket.socketpair()
    app_sock.setblocking(False)
    proxy_sock.setblocking(False)
    _, down = await loop.create_connection(relay.TcpEnd, sock=proxy_sock)
    link = relay.Relay()
    link.start(down, stream)
    reader, writer = await asyncio.open_connection(sock=app_sock)
    return Tunnel(status, link, reader, writer)


async def _await_closed(tunnel: Tunnel) -> None:
    """The client app sees its connection end (EOF or reset)."""
    assert tunnel.reader is not None
    with contextlib.suppress(ConnectionError):
        while await tunnel.reader.read(65536):
            pass


def test_deny_policy_closes_the_denied_tunnel_and_spares_the_allowed_one(
    mesh_ca: ca_mod.CertificateAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="access")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with hbone_server(mesh_ca) as server:
            web = await _connect(mesh_ca, server, WEB_ID)
            intruder = await _connect(mesh_ca, server, INTRUDER_ID)
            try:
                kept = await _open(web, server)
                doomed = await _open(intruder, server)
                assert (kept.status, doomed.status) == (200, 200)
                assert await kept.roundtrip(b"hello") == b"hello"
                assert await doomed.roundtrip(b"hello") == b"hello"
                assert len(server.inputs.connections) == 2
                kept_app, doomed_app = server.app.ended

                started = loop.time()
                _apply_policies(server.state, (DENY_INTRUDER,))
                # The client's tunnel is reset, and the app's side of it is closed.
                assert doomed.link is not None
                await asyncio.wait_for(doomed.link.done, LATE_DEADLINE)
                elapsed = loop.time() - started
                await asyncio.wait_for(doomed_app, LATE_DEADLINE)
                await asyncio.wait_for(_await_closed(doomed), LATE_DEADLINE)
                print(f"policy applied -> tunnel reset seen by the client: {elapsed * 1000:.1f} ms")
                assert doomed.link.error is not None
                assert "stream reset by peer" in doomed.link.error

                record = await server.tel.next_record()
                late = (
                    "connection closed: denied by policy shop/deny-intruder after a policy update"
                )
                assert (record.source_identity, record.flag, record.error) == (
                    INTRUDER_ID,
                    "DENY",
                    late,
                )
                assert record.request_bytes == 5  # what it carried before it was closed
                [entry] = [e for e in _access_log(caplog) if e["src.identity"] == INTRUDER_ID.uri]
                assert (entry["response_flags"], entry["error"]) == ("DENY", late)
                assert (
                    server.tel.count(
                        "istio_tcp_connections_closed_total",
                        response_flags="DENY",
                        source_principal=INTRUDER_ID.uri,
                    )
                    == 1
                )

                # The allowed tunnel was not touched and still carries data.
                assert not kept_app.done()
                assert await kept.roundtrip(b"still here") == b"still here"
                assert len(server.inputs.connections) == 1

                # New tunnels from the denied principal get 401 at connect time.
                refused = await _open(intruder, server)
                assert refused.status == 401
                record = await server.tel.next_record()
                assert record.flag == "DENY"
                assert record.error == "connection explicitly denied by shop/deny-intruder"
                assert len(server.app.ended) == 2  # the app never saw it

                # Removing the policy lets new connections in again.
                _apply_policies(server.state, removed=(DENY_INTRUDER,))
                again = await _open(intruder, server)
                assert again.status == 200
                assert await again.roundtrip(b"back") == b"back"
                await again.close()
                await kept.close()
                assert (await server.tel.next_record()).flag == "-"
                assert (await server.tel.next_record()).flag == "-"
                assert len(server.inputs.connections) == 0
                assert (
                    server.tel.count("istio_tcp_connections_closed_total", response_flags="DENY")
                    == 2
                )
            finally:
                web.close()
                intruder.close()

    _run(main)


def test_workload_update_that_selects_a_deny_policy_closes_tunnels(
    mesh_ca: ca_mod.CertificateAuthority,
) -> None:
    """The second trigger: the policy already exists; the workload's xDS record starts to
    list it (how a selector policy comes to cover a pod)."""
    selected = dataclasses.replace(
        DENY_INTRUDER, scope=authorization.Scope.WORKLOAD_SELECTOR, name="select-intruder"
    )

    async def main() -> None:
        async with hbone_server(mesh_ca) as server:
            intruder = await _connect(mesh_ca, server, INTRUDER_ID)
            try:
                tunnel = await _open(intruder, server)
                assert tunnel.status == 200
                _apply_policies(server.state, (selected,))
                # Not listed by the workload yet: it does not apply, the tunnel lives on.
                assert await tunnel.roundtrip(b"ping") == b"ping"
                assert tunnel.link is not None
                assert not tunnel.link.is_finished

                _apply_workload(
                    server.state,
                    dataclasses.replace(SERVER, authorization_policies=(selected.key,)),
                )
                await asyncio.wait_for(tunnel.link.done, LATE_DEADLINE)
                record = await server.tel.next_record()
                assert record.flag == "DENY"
                assert record.error is not None
                assert "shop/select-intruder" in record.error
            finally:
                intruder.close()

    _run(main)


def test_update_while_connecting_to_the_app_refuses_the_tunnel(
    mesh_ca: ca_mod.CertificateAuthority,
) -> None:
    """Authorized, then denied before the relay exists: 401, not a tunnel that is reset later."""

    async def main() -> None:
        async with hbone_server(mesh_ca) as server:

            async def deny_mid_connect() -> None:
                _apply_policies(server.state, (DENY_INTRUDER,))
                [tracked] = server.inputs.connections.find_by_workload(SERVER.uid)
                async with asyncio.timeout(WAIT):
                    while tracked.revocation is None:
                        await asyncio.sleep(0)  # the watcher's turn

            server.network.hook = deny_mid_connect
            intruder = await _connect(mesh_ca, server, INTRUDER_ID)
            try:
                tunnel = await _open(intruder, server)
                assert tunnel.status == 401
            finally:
                intruder.close()
            record = await server.tel.next_record()
            assert record.flag == "DENY"
            assert record.error == (
                "connection closed: denied by policy shop/deny-intruder after a policy update"
            )
            assert not record.is_open  # never counted as an established connection
            assert len(server.inputs.connections) == 0

    _run(main)


def test_strict_keeps_hbone_peers(mesh_ca: ca_mod.CertificateAuthority) -> None:
    """STRICT only refuses connections without an identity: HBONE peers always have one."""

    async def main() -> None:
        async with hbone_server(mesh_ca) as server:
            web = await _connect(mesh_ca, server, WEB_ID)
            try:
                before = await _open(web, server)
                assert before.status == 200
                _apply_policies(server.state, (STRICT,))
                _apply_workload(server.state, STRICT_SERVER)
                after = await _open(web, server)
                assert after.status == 200
                assert await before.roundtrip(b"a") == b"a"
                assert await after.roundtrip(b"b") == b"b"
                for tunnel in (before, after):
                    await tunnel.close()
                    assert (await server.tel.next_record()).flag == "-"
            finally:
                web.close()

    _run(main)


# --- plaintext (15006), in a namespace of its own ---


@pytest.fixture
def pod_netns(request: pytest.FixtureRequest) -> Iterator[netns_util.Netns]:
    """A namespace whose nat OUTPUT sends what is dialled to 127.0.0.1:8080 to 15006, except
    ztunnel's own marked sockets (the in-pod rules in miniature)."""
    topology = netns_util.Namespaces(netns_util.unique_prefix(request.node.name))
    try:
        ns = topology.add("pod")
        ns.exec(
            "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "127.0.0.1",
            "--dport", str(APP_PORT), "-m", "mark", "!", "--mark",
            f"{pod_network.INPOD_MARK:#x}/0xfff", "-j", "REDIRECT", "--to-ports", "15006",
        )  # fmt: skip
        yield ns
    finally:
        topology.cleanup()


@dataclasses.dataclass
class PlaintextServer:
    state: proxy_state.ProxyState
    inputs: ProxyInputs
    tel: RecordingTelemetry
    app: EchoApp
    ns: netns_util.Netns

    async def dial(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A client outside the mesh, in the pod's namespace, dialling the app's address."""
        fd = netns.open_netns(self.ns.path)
        try:
            sock = netns.run_in(fd, socket.socket)
        finally:
            os.close(fd)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", APP_PORT))
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock)


@contextlib.asynccontextmanager
async def plaintext_server(
    ns: netns_util.Netns, local: workload.Workload
) -> AsyncIterator[PlaintextServer]:
    state = proxy_state.ProxyState()
    state.workloads.insert(local)
    state.policies.insert(STRICT)  # istiod always sends it; workloads opt in by listing it
    tel = RecordingTelemetry()
    inputs = _inputs(state, object(), tel)
    fd = netns.open_netns(ns.path)
    try:
        network = pod_network.PodNetwork(fd, "pod")
    finally:
        os.close(fd)
    proxy = inbound.PlaintextInboundProxy(inputs, _pod(network))
    app = EchoApp()
    try:
        await app.start(netns_util.tcp_listener(ns, APP_PORT, "127.0.0.1"))
        listener = network.listen(15006)
        server = await asyncio.get_running_loop().create_server(proxy.protocol, sock=listener)
        try:
            async with policy_watcher(inputs):
                yield PlaintextServer(state, inputs, tel, app, ns)
        finally:
            server.close()
            await server.wait_closed()
    finally:
        proxy.close()
        await app.close()
        network.close()


async def _reads_to_end(reader: asyncio.StreamReader) -> bytes:
    try:
        return await asyncio.wait_for(reader.read(), LATE_DEADLINE)
    except ConnectionResetError:
        return b""


@pytest.mark.netns
def test_plaintext_is_accepted_without_strict_and_closed_when_strict_arrives(
    pod_netns: netns_util.Netns, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="access")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with plaintext_server(pod_netns, SERVER) as server:
            # No policy selects the pod (PERMISSIVE): plaintext reaches the app.
            reader, writer = await server.dial()
            try:
                writer.write(b"plain")
                assert await asyncio.wait_for(reader.readexactly(5), WAIT) == b"plain"
                assert len(server.inputs.connections) == 1
                [app_side] = server.app.ended

                # PeerAuthentication STRICT is enabled: the pod's record now lists the policy.
                started = loop.time()
                _apply_workload(server.state, STRICT_SERVER)
                assert await _reads_to_end(reader) == b""
                print(
                    f"STRICT applied -> plaintext closed: {(loop.time() - started) * 1000:.1f} ms"
                )
                await asyncio.wait_for(app_side, LATE_DEADLINE)
            finally:
                writer.close()
            record = await server.tel.next_record()
            late = (
                "connection closed: denied by policy istio-system/istio_converted_static_strict"
                " after a policy update"
            )
            assert (record.source_identity, record.flag, record.error) == (None, "DENY", late)
            [entry] = _access_log(caplog)
            assert (entry["response_flags"], entry["error"]) == ("DENY", late)
            assert (
                server.tel.count("istio_tcp_connections_closed_total", response_flags="DENY") == 1
            )
            assert len(server.inputs.connections) == 0

    _run(main)


@pytest.mark.netns
def test_strict_refuses_new_plaintext_before_the_app_and_its_removal_allows_it_again(
    pod_netns: netns_util.Netns,
) -> None:
    async def main() -> None:
        async with plaintext_server(pod_netns, STRICT_SERVER) as server:
            reader, writer = await server.dial()
            try:
                writer.write(b"let me in")
                assert await _reads_to_end(reader) == b""
            finally:
                writer.close()
            record = await server.tel.next_record()
            assert record.flag == "DENY"
            assert record.error == (
                "connection explicitly denied by istio-system/istio_converted_static_strict"
            )
            assert server.app.ended == []  # closed without reaching the app
            assert (
                server.tel.count("istio_tcp_connections_closed_total", response_flags="DENY") == 1
            )

            # STRICT off again (the workload no longer lists it): plaintext is accepted.
            _apply_workload(server.state, SERVER)
            reader, writer = await server.dial()
            try:
                writer.write(b"now?")
                assert await asyncio.wait_for(reader.readexactly(4), WAIT) == b"now?"
            finally:
                writer.close()
            record = await server.tel.next_record()
            assert (record.flag, record.error) == ("-", None)

    _run(main)
