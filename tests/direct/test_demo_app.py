"""The demo shop's app, in-process on 127.0.0.1: real sockets, real HTTP/1.1."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from meshctl.demo import app, manifests


@contextlib.asynccontextmanager
async def serving(config: app.ServiceConfig) -> AsyncIterator[int]:
    server = await asyncio.start_server(app.DemoServer(config).handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port
    finally:
        server.close()
        await server.wait_closed()


async def get_json(url: str) -> tuple[int, dict[str, Any]]:
    status, body = await app.fetch(url)
    return status, json.loads(body)


def test_answers_with_pod_name_and_caller_address() -> None:
    async def main() -> tuple[int, dict[str, Any], tuple[str, int]]:
        config = app.ServiceConfig(
            "product-catalog", 0, pod_name="product-catalog-7f", pod_namespace="shop"
        )
        async with serving(config) as port:
            # Our own socket, so we know the address the server must report.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            local = writer.get_extra_info("sockname")
            writer.write(b"GET /products HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            await writer.drain()
            raw = await reader.read()
            writer.close()
            await writer.wait_closed()
        head, _, body = raw.partition(b"\r\n\r\n")
        return int(head.split()[1]), json.loads(body), local

    status, body, local = asyncio.run(main())
    assert status == 200
    assert body["service"] == "product-catalog"
    assert body["pod"] == "product-catalog-7f"
    assert body["namespace"] == "shop"
    assert body["caller"] == f"{local[0]}:{local[1]}"
    assert body["caller_identity"] is None  # a plain connection carries no identity
    assert [p["id"] for p in body["products"]] == [1, 2, 3]


@pytest.mark.parametrize(
    ("service", "path", "status", "key"),
    [
        pytest.param("payment-processing", "/pay", 200, "payment", id="pay"),
        pytest.param("product-catalog", "/healthz", 200, "status", id="healthz"),
        pytest.param("product-catalog", "/pay", 404, "error", id="wrong-path"),
    ],
)
def test_routes(service: str, path: str, status: int, key: str) -> None:
    async def main() -> tuple[int, dict[str, Any]]:
        async with serving(app.ServiceConfig(service, 0)) as port:
            return await get_json(f"http://127.0.0.1:{port}{path}")

    got_status, body = asyncio.run(main())
    assert got_status == status
    assert key in body


def test_keep_alive_serves_several_requests_on_one_connection() -> None:
    async def main() -> list[bytes]:
        async with serving(app.ServiceConfig("product-catalog", 0)) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            answers = []
            for _ in range(2):
                writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
                await writer.drain()
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(
                    next(
                        line.split(b":")[1]
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length")
                    )
                )
                await reader.readexactly(length)
                answers.append(head.split(b"\r\n")[0])
            writer.close()
            await writer.wait_closed()
            return answers

    assert asyncio.run(main()) == [b"HTTP/1.1 200 ", b"HTTP/1.1 200 "]


def test_order_management_aggregates_its_upstreams() -> None:
    async def main() -> tuple[int, dict[str, Any]]:
        async with (
            serving(app.ServiceConfig("product-catalog", 0, pod_name="pc")) as catalog,
            serving(app.ServiceConfig("payment-processing", 0, pod_name="pp")) as payment,
        ):
            orders = app.ServiceConfig(
                "order-management",
                0,
                pod_name="om",
                upstreams=(
                    ("catalog", f"http://127.0.0.1:{catalog}/products"),
                    ("payment", f"http://127.0.0.1:{payment}/pay"),
                ),
            )
            async with serving(orders) as port:
                return await get_json(f"http://127.0.0.1:{port}/orders")

    status, body = asyncio.run(main())
    assert status == 200
    assert body["order"]["status"] == "placed"
    assert body["upstreams"]["catalog"]["pod"] == "pc"
    assert len(body["upstreams"]["catalog"]["products"]) == 3
    assert body["upstreams"]["payment"]["payment"] == "approved"
    # The upstreams saw order-management's connection, from loopback.
    assert body["upstreams"]["payment"]["caller"].startswith("127.0.0.1:")


def test_order_management_reports_an_unreachable_upstream() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]

    async def main() -> tuple[int, dict[str, Any]]:
        config = app.ServiceConfig(
            "order-management", 0, upstreams=(("payment", f"http://127.0.0.1:{dead}/pay"),)
        )
        async with serving(config) as port:
            return await get_json(f"http://127.0.0.1:{port}/orders")

    status, body = asyncio.run(main())
    assert status == 502
    assert body["order"]["status"] == "failed"
    assert "refused" in body["upstreams"]["payment"]["error"].lower()


def test_get_command_prints_body_and_sets_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    # The server runs on its own thread's loop: `app.main` runs asyncio.run itself.
    import threading

    ready = threading.Event()
    loop = asyncio.new_event_loop()
    holder: dict[str, Any] = {}

    def serve() -> None:
        asyncio.set_event_loop(loop)

        async def start() -> None:
            holder["server"] = await asyncio.start_server(
                app.DemoServer(app.ServiceConfig("product-catalog", 0)).handle, "127.0.0.1", 0
            )
            ready.set()

        loop.run_until_complete(start())
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    ready.wait(5)
    port = holder["server"].sockets[0].getsockname()[1]
    try:
        assert app.main(["get", f"http://127.0.0.1:{port}/products"]) == 0
        assert json.loads(capsys.readouterr().out)["service"] == "product-catalog"
        assert app.main(["get", f"http://127.0.0.1:{port}/nope"]) == 1
        assert app.main(["get", "https://example.invalid/"]) == 1
        assert "only http://" in capsys.readouterr().err
    finally:

        async def stop() -> None:
            holder["server"].close()
            await holder["server"].wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_demo_manifest_shape() -> None:
    import yaml

    docs = list(yaml.safe_load_all(io.StringIO(manifests.build_demo_manifest())))
    kinds = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert ("Namespace", "shop") in kinds
    namespace = next(d for d in docs if d["kind"] == "Namespace")
    assert "labels" not in namespace["metadata"], "the user adds the ambient label"
    pods = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Pod"}
    assert set(pods) == {manifests.CLIENT}
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    assert set(deployments) == set(manifests.DEPLOYMENTS) == set(manifests.SERVICES)
    for name, deployment in deployments.items():
        assert deployment["apiVersion"] == "apps/v1"
        assert deployment["spec"]["replicas"] == manifests.REPLICAS[name]
        assert deployment["spec"]["selector"] == {"matchLabels": {"app": name}}
        template = deployment["spec"]["template"]
        assert template["metadata"]["labels"] == {"app": name}
        spec = template["spec"]
        assert spec["serviceAccountName"] == name
        assert spec["containers"][0]["ports"] == [{"name": "http", "containerPort": 8080}]
        env = [e["name"] for e in spec["containers"][0]["env"]]
        assert env == ["POD_NAME", "POD_NAMESPACE", "POD_IP"]
    assert manifests.REPLICAS["product-catalog"] == 2
    assert pods["client"]["spec"]["containers"][0]["command"] == ["sleep", "infinity"]
    services = [d for d in docs if d["kind"] == "Service"]
    assert {s["metadata"]["name"] for s in services} == set(manifests.SERVICES)
    assert all(
        s["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http"}] for s in services
    )
