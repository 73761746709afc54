from __future__ import annotations

import asyncio

import pytest

from meshcore.kube import errors as kube_errors
from meshcore.kube import resources
from meshctl import errors, manifest

POD = """apiVersion: v1
kind: Pod
metadata:
  name: client
spec:
  containers:
    - name: c
      command: [sleep, infinity]
"""

NAMESPACE = """apiVersion: v1
kind: Namespace
metadata:
  name: shop
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: x\n   bad: 1\n",
            "error parsing f.yaml: yaml: line 5, column 7: mapping values are not allowed here",
            id="bad-indentation",
        ),
        pytest.param(
            "apiVersion: v1\nkind: [Pod\n",
            "error parsing f.yaml: yaml: line 3, column 1:",
            id="unclosed-flow-sequence",
        ),
        pytest.param(
            NAMESPACE + "---\n- just\n- a list\n",
            "error parsing f.yaml: document 2: expected a mapping",
            id="document-not-a-mapping",
        ),
        pytest.param(
            "kind: Pod\nmetadata:\n  name: x\n",
            'error validating "f.yaml": document 1: apiVersion not set',
            id="missing-apiversion",
        ),
        pytest.param(
            "apiVersion: v1\nkind: Pod\nmetadata: {}\n",
            'error validating "f.yaml": document 1: metadata.name not set',
            id="missing-name",
        ),
    ],
)
def test_parse_errors_name_the_place(text: str, expected: str) -> None:
    with pytest.raises(manifest.ManifestParseError) as info:
        manifest.parse_documents(text, "f.yaml")
    assert str(info.value).startswith(expected)


def test_parse_multi_document_skips_empty_and_flattens_lists() -> None:
    text = (
        "---\n" + NAMESPACE + "---\n---\n" + POD
        + "---\napiVersion: v1\nkind: List\nitems:\n"
        + "  - {apiVersion: v1, kind: Namespace, metadata: {name: a}}\n"
        + "  - {apiVersion: v1, kind: Namespace, metadata: {name: b}}\n"
    )  # fmt: skip
    docs = manifest.parse_documents(text, "f.yaml")
    assert [(d.kind, d.name) for d in docs] == [
        ("Namespace", "shop"),
        ("Pod", "client"),
        ("Namespace", "a"),
        ("Namespace", "b"),
    ]


class FakeDiscovery:
    """Discovery that knows the core kinds only (the seam `resolve_documents` uses)."""

    async def resolve(self, api_version: str, kind: str) -> resources.ResourceType:
        for rtype in resources.WELL_KNOWN:
            if (rtype.api_version, rtype.kind) == (api_version, kind):
                return rtype
        raise kube_errors.UnknownKindError(api_version, kind)


def resolve(text: str, namespace: str | None = None) -> list[manifest.Resolved]:
    docs = manifest.parse_documents(text, "f.yaml")
    return asyncio.run(manifest.resolve_documents(FakeDiscovery(), docs, "f.yaml", namespace))


def test_unknown_kind_message_matches_kubectl() -> None:
    text = NAMESPACE + "---\napiVersion: v1\nkind: Foo\nmetadata:\n  name: x\n  namespace: y\n"
    with pytest.raises(manifest.KindNotFoundError) as info:
        resolve(text)
    assert str(info.value) == (
        'resource mapping not found for name: "x" namespace: "y" from "f.yaml": '
        'no matches for kind "Foo" in version "v1"'
    )


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        pytest.param(None, "default", id="default-namespace"),
        pytest.param("shop", "shop", id="namespace-flag"),
    ],
)
def test_namespace_is_filled_for_namespaced_kinds(flag: str | None, expected: str) -> None:
    ns_doc, pod_doc = resolve(NAMESPACE + "---\n" + POD, flag)
    assert ns_doc.namespace is None
    assert "namespace" not in ns_doc.obj["metadata"]
    assert pod_doc.namespace == expected
    assert pod_doc.ref == "pod/client"


def test_namespace_flag_conflicting_with_object_is_an_error() -> None:
    text = POD.replace("  name: client\n", "  name: client\n  namespace: other\n")
    with pytest.raises(errors.ManifestError, match="does not match the namespace"):
        resolve(text, "shop")


@pytest.mark.parametrize(
    ("rtype", "expected"),
    [
        pytest.param(resources.PODS, "pod", id="core"),
        pytest.param(
            resources.ResourceType(
                "security.istio.io", "v1", "AuthorizationPolicy", "authorizationpolicies", True
            ),
            "authorizationpolicy.security.istio.io",
            id="group",
        ),
    ],
)
def test_kind_ref(rtype: resources.ResourceType, expected: str) -> None:
    assert manifest.kind_ref(rtype) == expected


def test_server_error_format() -> None:
    exc = kube_errors.InvalidError(
        'Pod "web" is invalid: spec.containers[0].command: Required value'
    )
    assert manifest.format_server_error(exc) == (
        'Error from server (Invalid): Pod "web" is invalid: spec.containers[0].command: '
        "Required value"
    )
