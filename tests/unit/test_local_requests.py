from __future__ import annotations

from typing import Any

import pytest

from controller.sources.local import apiserver, kinds
from meshcore.kube import errors, resources

REGISTRY = kinds.build_registry()


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/api/v1/pods", (resources.PODS, None, None, None)),
        ("/api/v1/namespaces/shop/pods", (resources.PODS, "shop", None, None)),
        ("/api/v1/namespaces/shop/pods/web", (resources.PODS, "shop", "web", None)),
        ("/api/v1/namespaces/shop/pods/web/status", (resources.PODS, "shop", "web", "status")),
        ("/api/v1/namespaces/shop/services/", (resources.SERVICES, "shop", None, None)),
        ("/api/v1/namespaces", (resources.NAMESPACES, None, None, None)),
        ("/api/v1/namespaces/shop", (resources.NAMESPACES, None, "shop", None)),
        ("/api/v1/namespaces/shop/status", (resources.NAMESPACES, None, "shop", "status")),
        ("/api/v1/nodes/n1", (resources.NODES, None, "n1", None)),
        ("/api/v1/nodes/n1/status", (resources.NODES, None, "n1", "status")),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_resource_routes(path: str, expected: tuple[Any, ...]) -> None:
    route = apiserver.build_route(REGISTRY, path)
    assert isinstance(route, apiserver.ResourceRoute)
    assert (route.served.rtype, route.namespace, route.name, route.subresource) == expected


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("/api", "APIVersions"),
        ("/api/v1", "APIResourceList"),
        ("/apis", "APIGroupList"),
    ],
)
def test_discovery_routes(path: str, kind: str) -> None:
    doc = apiserver.build_route(REGISTRY, path)
    assert isinstance(doc, dict)
    assert doc["kind"] == kind


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/healthz",
        "/api/v2/pods",
        "/api/v1/deployments",
        "/apis/batch/v1",
        "/apis/batch",
        "/apis/apps/v2",
        "/api/v1/namespaces/shop/nodes",
        "/api/v1/namespaces/shop/pods/web/log",
        "/api/v1/namespaces/shop/pods/web/status/x",
        "/api/v1//pods",
    ],
)
def test_unknown_paths_are_404(path: str) -> None:
    with pytest.raises(
        errors.NotFoundError, match="the server could not find the requested resource"
    ):
        apiserver.build_route(REGISTRY, path)


def test_discovery_lists_kinds_and_status_subresources() -> None:
    doc = apiserver.build_route(REGISTRY, "/api/v1")
    assert isinstance(doc, dict)
    names = {r["name"]: r for r in doc["resources"]}
    assert set(names) == {
        "namespaces",
        "namespaces/status",
        "nodes",
        "nodes/status",
        "pods",
        "pods/status",
        "services",
        "services/status",
    }
    assert names["pods"]["kind"] == "Pod"
    assert names["pods"]["namespaced"] is True
    assert names["nodes"]["namespaced"] is False
    assert "svc" in names["services"]["shortNames"]


def test_an_added_group_is_discovered_without_server_changes() -> None:
    widgets = resources.ResourceType("example.com", "v1", "Widget", "widgets", True)
    registry = kinds.build_registry([kinds.ServedKind(widgets)])
    groups = apiserver.build_route(registry, "/apis")
    assert isinstance(groups, dict)
    by_name = {g["name"]: g for g in groups["groups"]}
    assert set(by_name) == {
        "apps",
        "security.istio.io",
        "networking.istio.io",
        "gateway.networking.k8s.io",
        "telemetry.istio.io",
        "example.com",
    }
    widget_group = by_name["example.com"]
    assert widget_group["preferredVersion"]["groupVersion"] == "example.com/v1"
    route = apiserver.build_route(registry, "/apis/example.com/v1/namespaces/a/widgets/w")
    assert isinstance(route, apiserver.ResourceRoute)
    assert route.served.rtype == widgets


@pytest.mark.parametrize(
    ("body", "content_type", "error", "fragment"),
    [
        (b"{", "application/json", errors.BadRequestError, "not valid JSON"),
        (b"", "application/json", errors.BadRequestError, "the request body is empty"),
        (b"[1]", "application/json", errors.BadRequestError, "must be a JSON object, not array"),
        (b'"x"', "application/json", errors.BadRequestError, "must be a JSON object, not str"),
        (b'{"a": NaN}', "application/json", errors.BadRequestError, "NaN is not valid JSON"),
        (b'{"a": 1e999}', "application/json", errors.BadRequestError, "numbers must be finite"),
        (b"\xff\xfe{", "application/json", errors.BadRequestError, "not valid JSON"),
        (b"[" * 100 + b"]" * 100, "application/json", errors.BadRequestError, "nests deeper"),
        (b"a: [", "application/yaml", errors.BadRequestError, "not valid YAML"),
        (b"a: 1\na: 2\n", "application/yaml", errors.BadRequestError, 'key "a" already defined'),
        (b"a: 1\n---\nb: 2\n", "application/yaml", errors.BadRequestError, "one YAML document"),
        (b"a: !!set {x}", "application/yaml", errors.BadRequestError, "!!set values are not"),
        (b"a: \x00", "application/yaml", errors.BadRequestError, "unacceptable character"),
        (b"[" * 2000, "application/yaml", errors.BadRequestError, "nested too deeply"),
        (
            b"a: &a [x, x]\n"
            + b"".join(
                b"%c: &%c [*%c, *%c]\n" % (n, n, n - 1, n - 1) for n in range(ord("b"), ord("z"))
            ),
            "application/yaml",
            errors.BadRequestError,
            "aliases expand this document past",
        ),
        (
            b"a: &s " + b"x" * 100_000 + b"\nb: [" + b", ".join([b"*s"] * 200) + b"]\n",
            "application/yaml",
            errors.BadRequestError,
            "aliases add over 16,777,216 characters",
        ),
        (
            b'{"spec": {"image": "\\ud800"}}',
            "application/json",
            errors.BadRequestError,
            "not valid Unicode (surrogates not allowed at position 0)",
        ),
        (
            b'{"metadata": {"annotations": {"\\udfff": "x"}}}',
            "application/json",
            errors.BadRequestError,
            "not valid Unicode",
        ),
        (
            b"{}",
            "text/plain",
            errors.UnsupportedMediaTypeError,
            "unsupported media type 'text/plain'",
        ),
    ],
    ids=[
        "truncated",
        "empty",
        "array",
        "string",
        "nan",
        "infinite",
        "not-utf8",
        "deep",
        "bad-yaml",
        "yaml-duplicate-key",
        "yaml-two-documents",
        "yaml-set",
        "yaml-nul",
        "yaml-deep",
        "yaml-alias-bomb",
        "yaml-alias-text",
        "lone-surrogate",
        "lone-surrogate-key",
        "media-type",
    ],
)
def test_decode_body_rejects(
    body: bytes, content_type: str, error: type[errors.ApiError], fragment: str
) -> None:
    with pytest.raises(error) as err:
        apiserver.decode_body(body, content_type)
    assert fragment in str(err.value)


def test_decode_body_accepts_json_and_yaml() -> None:
    assert apiserver.decode_body(b'{"a": [1, "x"]}', "application/json; charset=utf-8") == {
        "a": [1, "x"]
    }
    assert apiserver.decode_body(b"a: 2024-01-01\nb: [1]\n", "application/yaml") == {
        "a": "2024-01-01",
        "b": [1],
    }


def test_decode_patch_media_types() -> None:
    for media in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
        assert apiserver.decode_body(b'{"a": null}', media, patch=True) == {"a": None}
    with pytest.raises(errors.UnsupportedMediaTypeError, match="application/json-patch"):
        apiserver.decode_body(b"[]", "application/json-patch+json", patch=True)


def test_yaml_aliases_are_written_out() -> None:
    """As for the API server's YAML: an alias is its anchored value, within the expansion bound."""
    decoded = apiserver.decode_body(b"a: &x {k: [1]}\nb: *x\n", "application/yaml")
    assert decoded == {"a": {"k": [1]}, "b": {"k": [1]}}
    assert decoded["a"] is not decoded["b"]
