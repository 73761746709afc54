"""The demo app's PROXY protocol v2 listener (``--proxy-port``), in-process on 127.0.0.1.

Real sockets carry real headers (built by meshcore.wire.proxyproto, as ztunnel writes them) in
front of real HTTP/1.1 requests; the app must answer with the caller and identity the header
names, and close any connection whose header is missing or malformed, logging why.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from meshcore.identity import spiffe
from meshcore.wire import proxyproto
from meshctl.demo import app

CLIENT_ID = spiffe.SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/client")
MESH_CLIENT = (ipaddress.IPv4Address("10.244.1.7"), 41234)
POD_TARGET = (ipaddress.IPv4Address("10.244.2.9"), 8080)
REQUEST = b"GET /products HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"


@contextlib.asynccontextmanager
async def serving_both(config: app.ServiceConfig) -> AsyncIterator[tuple[int, int]]:
    """The app as `mesh-demo-app serve --port 0 --proxy-port 0` starts it."""
    servers = await app.DemoServer(config).start()
    try:
        assert len(servers) == 2
        yield servers[0].sockets[0].getsockname()[1], servers[1].sockets[0].getsockname()[1]
    finally:
        for server in servers:
            server.close()
        for server in servers:
            await server.wait_closed()


async def exchange(port: int, chunks: list[bytes]) -> tuple[bytes, tuple[str, int]]:
    """Send `chunks` (one write each), half-close, and return everything the server sent."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    local = writer.get_extra_info("sockname")
    for chunk in chunks:
        writer.write(chunk)
        await writer.drain()
    writer.write_eof()
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    await writer.wait_closed()
    return raw, local


def _json_body(raw: bytes) -> dict[str, Any]:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    parsed: dict[str, Any] = json.loads(body)
    return parsed


MESH_HEADER = proxyproto.build_header(
    MESH_CLIENT, POD_TARGET, [proxyproto.Tlv.for_identity(CLIENT_ID)]
)


@pytest.mark.parametrize(
    "chunks",
    [
        pytest.param([MESH_HEADER + REQUEST], id="header-and-request-in-one-write"),
        pytest.param([MESH_HEADER[:10], MESH_HEADER[10:], REQUEST], id="header-split"),
        pytest.param([MESH_HEADER[:20], MESH_HEADER[20:] + REQUEST[:5], REQUEST[5:]], id="mixed"),
    ],
)
def test_proxy_port_reports_the_client_and_identity_from_the_header(chunks: list[bytes]) -> None:
    config = app.ServiceConfig("product-catalog", 0, pod_name="pc-1", proxy_port=0)

    async def main() -> dict[str, Any]:
        async with serving_both(config) as (_, proxy_port):
            raw, _ = await exchange(proxy_port, chunks)
            return _json_body(raw)

    body = asyncio.run(main())
    assert body["pod"] == "pc-1"
    assert body["caller"] == "10.244.1.7:41234"
    assert body["caller_identity"] == "spiffe://cluster.local/ns/shop/sa/client"
    assert [p["id"] for p in body["products"]] == [1, 2, 3]  # existing fields are kept


def test_both_ports_serve_and_only_the_proxy_port_has_an_identity() -> None:
    config = app.ServiceConfig("payment-processing", 0, pod_name="pp-1", proxy_port=0)

    async def main() -> tuple[dict[str, Any], tuple[str, int], dict[str, Any], tuple[str, int]]:
        async with serving_both(config) as (plain_port, proxy_port):
            plain_raw, plain_local = await exchange(
                plain_port, [REQUEST.replace(b"/products", b"/pay")]
            )
            local_raw, local_local = await exchange(
                proxy_port,
                [proxyproto.build_local_header() + REQUEST.replace(b"/products", b"/pay")],
            )
            return _json_body(plain_raw), plain_local, _json_body(local_raw), local_local

    plain, plain_local, local, local_local = asyncio.run(main())
    assert plain["caller"] == f"{plain_local[0]}:{plain_local[1]}"
    assert plain["caller_identity"] is None
    assert plain["payment"] == "approved"
    # LOCAL (a health check by the proxy itself): the real peer, no identity.
    assert local["caller"] == f"{local_local[0]}:{local_local[1]}"
    assert local["caller_identity"] is None


@pytest.mark.parametrize(
    ("chunks", "error"),
    [
        pytest.param([REQUEST], "signature", id="plain-http-on-the-proxy-port"),
        pytest.param([MESH_HEADER[:20]], "connection ended after 20 bytes", id="truncated-header"),
        pytest.param([b""], "connection ended after 0 bytes", id="nothing-at-all"),
        pytest.param(
            [proxyproto.SIGNATURE + b"\x21\x11\x00\x12" + bytes(12) + b"\xd0\x00\x03web" + REQUEST],
            "not a SPIFFE ID",
            id="bad-identity-tlv",
        ),
    ],
)
def test_connection_without_a_valid_header_is_closed_and_logged(
    chunks: list[bytes], error: str, caplog: pytest.LogCaptureFixture
) -> None:
    config = app.ServiceConfig("product-catalog", 0, proxy_port=0)

    async def main() -> tuple[bytes, tuple[str, int]]:
        async with serving_both(config) as (_, proxy_port):
            return await exchange(proxy_port, chunks)

    with caplog.at_level(logging.ERROR, logger="mesh-demo-app"):
        raw, local = asyncio.run(main())
    records = [r for r in caplog.records if r.name == "mesh-demo-app"]
    fields = [getattr(r, "fields", {}) for r in records]
    assert raw == b""  # closed without an answer
    assert len(records) == 1, caplog.text
    assert records[0].levelno == logging.ERROR
    assert "PROXY protocol v2" in records[0].getMessage()
    assert fields[0]["peer"] == f"{local[0]}:{local[1]}"
    assert error in fields[0]["error"]


def test_a_silent_client_is_closed_after_the_header_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = app.ServiceConfig("product-catalog", 0, proxy_port=0, proxy_header_timeout=0.2)

    async def main() -> bytes:
        async with serving_both(config) as (_, proxy_port):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
            writer.write(MESH_HEADER[:10])  # a start, then nothing
            await writer.drain()
            raw = await asyncio.wait_for(reader.read(), 10)  # the server hangs up
            writer.close()
            await writer.wait_closed()
            return raw

    with caplog.at_level(logging.ERROR, logger="mesh-demo-app"):
        assert asyncio.run(main()) == b""
    errors = [getattr(r, "fields", {}).get("error", "") for r in caplog.records]
    assert any("no complete PROXY header within 0.2s" in e for e in errors), errors


def test_serve_command_line_accepts_a_proxy_port() -> None:
    args = app.build_parser().parse_args(
        ["serve", "--service", "x", "--port", "8080", "--proxy-port", "15088"]
    )
    assert (args.port, args.proxy_port) == (8080, 15088)
    assert app.build_parser().parse_args(["serve", "--service", "x"]).proxy_port is None
    for bad in ("abc", "70000", "-1"):
        with pytest.raises(SystemExit):
            app.build_parser().parse_args(["serve", "--service", "x", "--proxy-port", bad])
