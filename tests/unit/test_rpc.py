"""meshcore.rpc: the client channel's address parsing and the bearer-token helpers."""

from __future__ import annotations

import asyncio

import pytest

from meshcore import rpc


def test_unix_and_tcp_addresses_open_channels() -> None:
    async def main() -> None:  # channels belong to the running loop
        unix = rpc.open_channel("unix:///run/mesh/xds.sock")
        tcp = rpc.open_channel("127.0.0.1:15010")
        try:
            assert "/run/mesh/xds.sock" in repr(unix)
            assert "127.0.0.1" in repr(tcp)
            assert "15010" in repr(tcp)
        finally:
            unix.close()
            tcp.close()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("", "empty gRPC address"),
        ("unix://relative.sock", "absolute path"),
        ("controller", "expected unix:///path or host:port"),
        ("controller:", "expected unix:///path or host:port"),
        ("controller:http", "expected unix:///path or host:port"),
        ("controller:70000", "expected unix:///path or host:port"),
        (":15010", "expected unix:///path or host:port"),
    ],
)
def test_unusable_addresses_are_rejected_by_name(address: str, problem: str) -> None:
    with pytest.raises(rpc.RpcConfigError, match=problem):
        rpc.open_channel(address)


def test_bearer_token_is_read_from_metadata() -> None:
    assert rpc.bearer_token({"authorization": "Bearer abc"}) == "abc"
    assert rpc.bearer_token({"authorization": b"Bearer abc"}) == "abc"
    assert rpc.bearer_token({"authorization": "Basic abc"}) is None
    assert rpc.bearer_token(None) is None
