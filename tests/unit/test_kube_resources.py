from __future__ import annotations

import pytest

from meshcore.kube import errors, resources

GATEWAYS = resources.ResourceType(
    "gateway.networking.k8s.io", "v1", "Gateway", "gateways", namespaced=True
)


@pytest.mark.parametrize(
    ("rtype", "args", "expected"),
    [
        (resources.PODS, (), "/api/v1/pods"),
        (resources.PODS, ("shop",), "/api/v1/namespaces/shop/pods"),
        (resources.PODS, ("shop", "web"), "/api/v1/namespaces/shop/pods/web"),
        (resources.PODS, ("shop", "web", "status"), "/api/v1/namespaces/shop/pods/web/status"),
        (resources.NAMESPACES, (None, "shop"), "/api/v1/namespaces/shop"),
        (resources.NAMESPACES, ("ignored", "shop"), "/api/v1/namespaces/shop"),
        (resources.NODES, (None, "n1", "status"), "/api/v1/nodes/n1/status"),
        (
            GATEWAYS,
            ("shop", "wp"),
            "/apis/gateway.networking.k8s.io/v1/namespaces/shop/gateways/wp",
        ),
        (resources.PODS, ("shop", "a/b"), "/api/v1/namespaces/shop/pods/a%2Fb"),
    ],
    ids=[
        "all",
        "namespace",
        "object",
        "status",
        "cluster",
        "ns-ignored",
        "node-status",
        "group",
        "quoted",
    ],
)
def test_paths(rtype: resources.ResourceType, args: tuple[str | None, ...], expected: str) -> None:
    assert rtype.path(*args) == expected


def test_path_needs_a_name_for_a_subresource() -> None:
    with pytest.raises(ValueError, match="needs an object name"):
        resources.PODS.path("shop", None, "status")


def test_api_version_and_split() -> None:
    assert resources.PODS.api_version == "v1"
    assert GATEWAYS.api_version == "gateway.networking.k8s.io/v1"
    assert resources.split_api_version("v1") == ("", "v1")
    assert resources.split_api_version("apps/v1") == ("apps", "v1")


def test_registry_lookups_and_clashes() -> None:
    registry = resources.ResourceRegistry([*resources.WELL_KNOWN, GATEWAYS])
    assert registry.find_kind("v1", "Pod") is resources.PODS
    assert registry.find_plural("gateway.networking.k8s.io", "v1", "gateways") is GATEWAYS
    assert registry.find_kind("v1", "Gateway") is None
    assert len(registry) == 5
    with pytest.raises(ValueError, match="clashes"):
        registry.add(resources.ResourceType("", "v1", "Pod", "pods", namespaced=False))


@pytest.mark.parametrize(
    ("status", "cls", "code", "reason"),
    [
        (
            {"code": 404, "reason": "NotFound", "message": "m"},
            errors.NotFoundError,
            404,
            "NotFound",
        ),
        (
            {"code": 409, "reason": "AlreadyExists", "message": "m"},
            errors.AlreadyExistsError,
            409,
            "AlreadyExists",
        ),
        (
            {"code": 409, "reason": "Conflict", "message": "m"},
            errors.ConflictError,
            409,
            "Conflict",
        ),
        ({"code": 410, "reason": "Expired", "message": "m"}, errors.GoneError, 410, "Expired"),
        ({"code": 422, "message": "m"}, errors.InvalidError, 422, "Invalid"),
        ({"message": "m"}, errors.ApiError, 500, "InternalError"),
        ({"code": 418, "reason": "Teapot", "message": "m"}, errors.ApiError, 418, "Teapot"),
    ],
    ids=["not-found", "exists", "conflict", "expired", "no-reason", "no-code", "unknown"],
)
def test_api_error_from_status(
    status: dict[str, object], cls: type[errors.ApiError], code: int, reason: str
) -> None:
    error = errors.ApiError.from_status(status)
    assert type(error) is cls
    assert (error.code, error.reason, error.message, str(error)) == (code, reason, "m", "m")
    assert error.status is status


def test_api_error_builds_its_status() -> None:
    error = errors.NotFoundError('pods "web" not found', details={"name": "web", "kind": "pods"})
    assert error.status == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'pods "web" not found',
        "reason": "NotFound",
        "code": 404,
        "details": {"name": "web", "kind": "pods"},
    }
    again = errors.ApiError.from_status(error.status)
    assert type(again) is errors.NotFoundError
    assert again.details == {"name": "web", "kind": "pods"}
    unknown = errors.UnknownKindError("v1", "Foo")
    assert str(unknown) == 'no matches for kind "Foo" in version "v1"'
    assert unknown.code == 404
