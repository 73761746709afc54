"""The xDS cache's pre-serialised resources and its shared versions map."""

from __future__ import annotations

import pytest
from google.protobuf import any_pb2

from controller.xds import cache as xds_cache
from meshcore.proto import discovery_pb2


def _any(size: int) -> any_pb2.Any:
    return any_pb2.Any(type_url="type.googleapis.com/test.Blob", value=b"x" * size)


@pytest.mark.parametrize(
    ("resources", "removed"),
    [
        pytest.param([], [], id="empty"),
        pytest.param([("a", 1)], [], id="one-small"),
        pytest.param([("a", 1), ("b", 300), ("c", 20_000)], [], id="multi-byte-lengths"),
        pytest.param([("a", 5)], ["gone-1", "gone-2"], id="upserts-and-removals"),
        pytest.param([], ["gone"], id="removals-only"),
    ],
)
def test_header_plus_wire_elements_is_the_response(
    resources: list[tuple[str, int]], removed: list[str]
) -> None:
    header = discovery_pb2.DeltaDiscoveryResponse(
        system_version_info="7", type_url="t", nonce="3", removed_resources=removed
    ).SerializeToString()
    wires = [xds_cache.build_wire(n, f"v-{n}", _any(size)) for n, size in resources]
    parsed = discovery_pb2.DeltaDiscoveryResponse.FromString(b"".join([header, *wires]))
    expected = discovery_pb2.DeltaDiscoveryResponse(
        system_version_info="7",
        type_url="t",
        nonce="3",
        removed_resources=removed,
        resources=[
            discovery_pb2.Resource(name=n, version=f"v-{n}", resource=_any(size))
            for n, size in resources
        ],
    )
    assert parsed == expected


def test_versions_map_is_shared_until_its_type_changes() -> None:
    cache = xds_cache.ResourceCache()
    cache.update("a", {"x": _any(1), "y": _any(2)})
    first = cache.versions("a")
    assert dict(first) == {n: e.version for n, e in cache.snapshot("a").items()}
    assert cache.versions("a") is first
    cache.update("a", {"x": _any(1)})  # same content: nothing changed
    assert cache.versions("a") is first
    cache.update("b", {"z": _any(3)})  # another type
    assert cache.versions("a") is first
    cache.update("a", {"x": _any(9)}, ["y"])
    second = cache.versions("a")
    assert second is not first
    assert dict(second) == {"x": cache.snapshot("a")["x"].version}
    assert "y" in first  # an older map is never changed under its holders


def test_versions_of_an_unknown_type_is_empty() -> None:
    assert dict(xds_cache.ResourceCache().versions("nothing")) == {}
