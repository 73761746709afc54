from __future__ import annotations

import pytest

from meshcore.identity import spiffe


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("spiffe://cluster.local/ns/shop/sa/web", ("cluster.local", "shop", "web")),
        ("spiffe://td.example/ns/a-b/sa/c.d", ("td.example", "a-b", "c.d")),
    ],
    ids=["default-domain", "dotted-names"],
)
def test_parse_roundtrip(uri: str, expected: tuple[str, str, str]) -> None:
    sid = spiffe.SpiffeId.parse(uri)
    assert (sid.trust_domain, sid.namespace, sid.service_account) == expected
    assert str(sid) == uri
    assert sid.principal == uri.removeprefix("spiffe://")


@pytest.mark.parametrize(
    "uri",
    [
        "http://cluster.local/ns/a/sa/b",
        "spiffe://cluster.local/ns/a",
        "spiffe://cluster.local/sa/b/ns/a",
        "spiffe://cluster.local/ns/A/sa/b",
        "spiffe:///ns/a/sa/b",
        "spiffe://cluster.local/ns/a/sa/b/extra",
        "spiffe://cluster.local/ns/a/sa/b\n",
        "spiffe://cluster.local\n/ns/a/sa/b",
    ],
    ids=[
        "scheme",
        "short",
        "order",
        "uppercase",
        "no-domain",
        "extra-segment",
        "trailing-newline",
        "newline-in-domain",
    ],
)
def test_parse_rejects(uri: str) -> None:
    with pytest.raises(spiffe.InvalidSpiffeIdError) as err:
        spiffe.SpiffeId.parse(uri)
    assert repr(uri) in str(err.value)  # quoted, so a stray newline is visible


def test_defaults_for_workload() -> None:
    sid = spiffe.SpiffeId.for_workload("shop")
    assert sid.uri == "spiffe://cluster.local/ns/shop/sa/default"
