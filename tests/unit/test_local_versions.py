"""One stored kind served in several versions (Istio's security kinds: v1 and v1beta1), the
discovery documents that list them, the conversion of bodies and answers, and the Warning
headers of a write. Pure functions of the registry."""

from __future__ import annotations

from typing import Any

import pytest

from controller.sources.local import apiserver, kinds
from meshcore.kube import client, errors, resources

REGISTRY = kinds.build_registry()
V1 = "security.istio.io/v1"
V1BETA1 = "security.istio.io/v1beta1"


def _route(path: str) -> apiserver.ResourceRoute:
    route = apiserver.build_route(REGISTRY, path)
    assert isinstance(route, apiserver.ResourceRoute)
    return route


@pytest.mark.parametrize("version", ["v1", "v1beta1"])
@pytest.mark.parametrize(
    ("plural", "kind"),
    [
        ("authorizationpolicies", "AuthorizationPolicy"),
        ("peerauthentications", "PeerAuthentication"),
    ],
)
def test_both_versions_route_to_the_one_stored_kind(version: str, plural: str, kind: str) -> None:
    route = _route(f"/apis/security.istio.io/{version}/namespaces/shop/{plural}/p/status")
    assert route.served.rtype.version == "v1"
    assert route.rtype == resources.ResourceType(
        "security.istio.io", version, kind, plural, namespaced=True
    )
    assert route.is_converted is (version != "v1")
    assert (route.namespace, route.name, route.subresource) == ("shop", "p", "status")


def test_lookups_by_any_version_find_the_kind_and_storage_speaks_v1() -> None:
    stored = REGISTRY.find_kind(V1, "AuthorizationPolicy")
    assert stored is not None
    assert REGISTRY.find_kind(V1BETA1, "AuthorizationPolicy") is stored
    assert REGISTRY.find_plural("security.istio.io", "v1beta1", "authorizationpolicies") is stored
    assert REGISTRY.find(stored.rtype) is stored
    assert REGISTRY.find(stored.rtype_at("v1beta1")) is None  # the store keys by v1 only
    assert REGISTRY.find_kind("security.istio.io/v1alpha1", "AuthorizationPolicy") is None
    assert stored.rtype in REGISTRY.types
    assert stored.rtype_at("v1beta1") not in REGISTRY.types


def test_discovery_lists_both_versions_v1_preferred() -> None:
    group_list = apiserver.build_route(REGISTRY, "/apis")
    assert isinstance(group_list, dict)
    (security,) = [g for g in group_list["groups"] if g["name"] == "security.istio.io"]
    assert [v["groupVersion"] for v in security["versions"]] == [V1, V1BETA1]
    assert security["preferredVersion"] == {"groupVersion": V1, "version": "v1"}
    assert apiserver.build_route(REGISTRY, "/apis/security.istio.io") == security


@pytest.mark.parametrize("version", ["v1", "v1beta1"])
def test_each_version_lists_the_kinds_with_short_names(version: str) -> None:
    doc = apiserver.build_route(REGISTRY, f"/apis/security.istio.io/{version}")
    assert isinstance(doc, dict)
    assert doc["groupVersion"] == f"security.istio.io/{version}"
    by_name = {r["name"]: r for r in doc["resources"]}
    assert set(by_name) == {
        "authorizationpolicies",
        "authorizationpolicies/status",
        "peerauthentications",
        "peerauthentications/status",
    }
    assert by_name["authorizationpolicies"]["shortNames"] == ["ap"]
    assert by_name["peerauthentications"]["shortNames"] == ["pa"]
    assert by_name["authorizationpolicies"]["kind"] == "AuthorizationPolicy"
    assert by_name["authorizationpolicies"]["namespaced"] is True


def test_an_unserved_version_is_404() -> None:
    with pytest.raises(errors.NotFoundError):
        apiserver.build_route(REGISTRY, "/apis/security.istio.io/v1alpha1/authorizationpolicies")


def test_a_kind_may_not_list_a_version_twice_nor_share_a_plural() -> None:
    ap = kinds.AUTHORIZATION_POLICIES
    with pytest.raises(ValueError, match="lists a version twice"):
        kinds.KindRegistry([kinds.ServedKind(ap, extra_versions=("v1beta1", "v1beta1"))])
    with pytest.raises(ValueError, match="served twice"):
        kinds.build_registry([kinds.ServedKind(ap)])


BETA = _route("/apis/security.istio.io/v1beta1/namespaces/shop/authorizationpolicies/p")
STORED = _route("/apis/security.istio.io/v1/namespaces/shop/authorizationpolicies/p")


@pytest.mark.parametrize(
    ("body", "converted"),
    [
        ({"apiVersion": V1BETA1, "kind": "AuthorizationPolicy"}, {"apiVersion": V1}),
        ({"metadata": {"labels": {"a": "b"}}}, {}),  # a merge patch without apiVersion
    ],
)
def test_bodies_are_converted_to_the_stored_version(
    body: dict[str, Any], converted: dict[str, Any]
) -> None:
    assert apiserver.convert_body(BETA, body) == {**body, **converted}
    assert apiserver.convert_body(STORED, body) is body


@pytest.mark.parametrize(
    "body",
    [
        {"apiVersion": V1, "kind": "AuthorizationPolicy"},
        {"apiVersion": V1BETA1, "kind": "PeerAuthentication"},
    ],
)
def test_a_body_of_another_version_or_kind_than_the_url_is_refused(body: dict[str, Any]) -> None:
    with pytest.raises(
        errors.BadRequestError, match=r"AuthorizationPolicy \(security.istio.io/v1beta1\)"
    ):
        apiserver.convert_body(BETA, body)


def test_answers_are_converted_to_the_urls_version() -> None:
    stored = {"apiVersion": V1, "kind": "AuthorizationPolicy", "metadata": {"name": "p"}}
    assert apiserver.convert_answer(BETA, stored) == {**stored, "apiVersion": V1BETA1}
    assert apiserver.convert_answer(STORED, stored) is stored
    assert stored["apiVersion"] == V1  # the store's copy is not changed


def test_warnings_are_deduplicated_cleaned_and_bounded() -> None:
    texts = ["a", "a", "line\nbreak\x7f", "x" * 1000, "lone \ud800"]
    built = apiserver.build_warnings(texts)
    assert built[:2] == ("a", "line break ")
    assert len(built[2]) == apiserver.MAX_WARNING_CHARS
    assert built[2].endswith("...")
    assert built[3] == "lone ?"
    assert apiserver.build_warning_header(built[3]) == b'299 - "lone ?"'
    many = apiserver.build_warnings([f"w{i}" for i in range(100)])
    assert len(many) == apiserver.MAX_WARNINGS
    assert many[-1] == f"{100 - apiserver.MAX_WARNINGS + 1} more warnings not shown"


@pytest.mark.parametrize(
    "text",
    [
        "spec.rules[0].to[0].operation.methods: HTTP attribute",
        'quotes " and \\ backslashes \\"',
        "non-ascii: ünïcode ✓",
        "",
        'commas, and 299 - "fake"',
    ],
)
def test_warning_headers_round_trip_through_the_clients_parser(text: str) -> None:
    header = apiserver.build_warning_header(text)
    assert header.startswith(b'299 - "')
    assert client.parse_warning_header(header.decode()) == [text]


@pytest.mark.parametrize(
    ("value", "texts"),
    [
        ('299 - "one", 299 - "two"', ["one", "two"]),
        ('299 kube-apiserver "a" "Tue, 15 Nov 1994 08:12:31 GMT"', ["a"]),
        ('199 - "not kubernetes", 299 - "b"', ["b"]),
        ('299 - "unterminated', []),
        ("garbage", []),
        ('299 - "ok", garbage, 299 - "lost"', ["ok"]),
        ("", []),
    ],
)
def test_warning_header_parser(value: str, texts: list[str]) -> None:
    assert client.parse_warning_header(value) == texts


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"8080: {mode: STRICT}", {"8080": {"mode": "STRICT"}}),
        (b"true: 1\nnull: [{a: {1: 2}}]", {"true": 1, "null": [{"a": {"1": 2}}]}),
    ],
)
def test_yaml_keys_become_json_strings(body: bytes, expected: Any) -> None:
    assert apiserver.decode_body(body, "application/yaml") == expected


def test_yaml_keys_that_clash_as_strings_are_refused() -> None:
    with pytest.raises(errors.BadRequestError, match='line 2, column 1: mapping key "1" already'):
        apiserver.decode_body(b"1: a\n'1': b\n", "application/yaml")


def test_yaml_bodies_with_port_keys_decode() -> None:
    body = b"spec:\n  portLevelMtls:\n    8080:\n      mode: DISABLE\n"
    decoded = apiserver.decode_body(body, "application/yaml")
    assert decoded == {"spec": {"portLevelMtls": {"8080": {"mode": "DISABLE"}}}}
