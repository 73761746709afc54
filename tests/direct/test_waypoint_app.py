"""The waypoint's process wiring against the real controller (a child process): it obtains its
certificate from the CA, syncs services and workloads over xDS, becomes ready, serves metrics,
and then answers tunnels to a service VIP with its own identity. The service's only endpoint
listens nowhere (127.0.0.2, no HBONE there), so the request ends in a clear 503."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from meshcore.aio import hbone, relay
from meshcore.identity import ca_client, certs, csr, spiffe, tls
from meshcore.kube import resources
from tests.direct import controller_process, http_upstreams
from waypoint import app
from waypoint import config as config_mod

DEADLINE = 20.0
WAYPOINT_ID = spiffe.SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/waypoint")
WEB_ID = spiffe.SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/web")


def _pod(name: str, service_account: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "labels": labels},
        "spec": {
            "nodeName": "n1",
            "serviceAccountName": service_account,
            "containers": [{"name": "app", "command": ["sleep", "1"]}],
        },
    }


OBJECTS = [
    {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": "n1"},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]},
    },
    {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}},
    _pod("waypoint-0", "waypoint", {"gateway.networking.k8s.io/gateway-name": "waypoint"}),
    _pod("web", "web", {"app": "web"}),
    {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
    },
]


@pytest.fixture
def controller() -> Iterator[controller_process.Controller]:
    with controller_process.temporary_controller() as ctl:
        yield ctl


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(port: int, path: str) -> tuple[int, str]:
    """Status and body; 0 while nothing listens yet (the app is still starting)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except urllib.error.URLError:
        return 0, ""


async def _client_cert(controller: controller_process.Controller) -> certs.WorkloadCertificate:
    """The web pod's certificate, as its ztunnel would fetch it."""
    client = ca_client.GrpcCaClient(
        f"unix://{controller.xds_socket}", controller.token("n1"), "Kubernetes"
    )
    try:
        key = csr.generate_key()
        chain = await client.fetch_certificate(WEB_ID, csr.build_csr(key, WEB_ID), 3600)
    finally:
        await client.close()
    return certs.build_workload_certificate(WEB_ID, key, chain, trusted_root_pem=None)


def test_the_waypoint_process_gets_its_identity_and_state_and_serves_tunnels(
    controller: controller_process.Controller,
) -> None:
    async def main() -> None:
        controller.start()
        api = await controller.wait_ready()
        try:
            for obj in OBJECTS:
                await api.create(obj)
            await api.patch(
                resources.PODS,
                "web",
                "shop",
                {
                    "status": {
                        "podIP": "127.0.0.2",
                        "phase": "Running",
                        "conditions": [{"type": "Ready", "status": "True"}],
                    }
                },
                subresource="status",
            )
            service = await api.get(resources.SERVICES, "web", "shop")
            vip = service["spec"]["clusterIP"]
        finally:
            await api.close()
        hbone_port, metrics_port, ready_port = _free_port(), _free_port(), _free_port()
        cfg = config_mod.Config(
            namespace="shop",
            name="waypoint",
            xds_address=f"unix://{controller.xds_socket}",
            ca_address=f"unix://{controller.xds_socket}",
            token_file=controller.token("n1"),
            service_account="waypoint",
            cluster_id="Kubernetes",
            hbone_addr=("127.0.0.1", hbone_port),
            metrics_addr=("127.0.0.1", metrics_port),
            readiness_addr=("127.0.0.1", ready_port),
            connect_timeout=2.0,
        )
        stop = asyncio.Event()
        running = asyncio.create_task(app.run(cfg, stop))
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + DEADLINE
            while (await asyncio.to_thread(_get, ready_port, "/healthz/ready"))[0] != 200:
                assert not running.done(), running
                assert loop.time() < deadline, "the waypoint never became ready"
                await asyncio.sleep(0.05)
            status, metrics = await asyncio.to_thread(_get, metrics_port, "/metrics")
            assert status == 200
            assert "istio_requests_total" in metrics

            # A tunnel from the web pod's identity: the waypoint proves its own.
            sock = socket.create_connection(("127.0.0.1", hbone_port))
            sock.setblocking(False)
            conn = await hbone.connect(
                sock,
                context=tls.client_context(await _client_cert(controller)),
                expected=[WAYPOINT_ID],
                timeout=5,
            )
            assert conn.peer_identity == WAYPOINT_ID
            stream = conn.open_stream(f"{vip}:80", [])
            assert stream.response is not None
            status, _ = await asyncio.wait_for(stream.response, DEADLINE)
            assert status == 200  # the VIP names a service the waypoint serves
            app_sock, proxy_sock = socket.socketpair()
            app_sock.setblocking(False)
            proxy_sock.setblocking(False)
            _, down = await loop.create_connection(relay.TcpEnd, sock=proxy_sock)
            relay.Relay().start(down, stream)
            client = http_upstreams.Client(*await asyncio.open_connection(sock=app_sock))
            answer = await asyncio.wait_for(client.request(headers=[("host", "web")]), DEADLINE)
            assert answer.status == 503  # its endpoint (127.0.0.2:15008) is not there
            assert answer.body.startswith(b"upstream connect error or disconnect/reset")
            conn.close()
        finally:
            stop.set()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(running, DEADLINE)

    asyncio.run(main())
