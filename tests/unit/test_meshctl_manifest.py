from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest
import yaml

from meshcore.kube import errors as kube_errors
from meshcore.kube import resources, yamljson
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
        pytest.param(
            "apiVersion: 1\nkind: Pod\nmetadata: {name: x}\n",
            'error validating "f.yaml": document 1: apiVersion must be a string, not 1 (an'
            " integer)",
            id="apiversion-not-a-string",
        ),
        pytest.param(
            NAMESPACE + "---\napiVersion: v1\nkind: Pod\nmetadata: {name: 12345}\n",
            'error validating "f.yaml": document 2: metadata.name must be a string, not 12345'
            " (an integer)",
            id="name-not-a-string",
        ),
        pytest.param(
            "apiVersion: v1\nkind: [Pod]\nmetadata: {name: x, namespace: true}\n",
            'error validating "f.yaml": document 1: kind must be a string, not a list;'
            " metadata.namespace must be a string, not true (a boolean)",
            id="kind-and-namespace-not-strings",
        ),
        pytest.param(
            "apiVersion: v1\nkind: Pod\nmetadata: web\n",
            'error validating "f.yaml": document 1: metadata must be a mapping, not "web" (a'
            " string)",
            id="metadata-not-a-mapping",
        ),
    ],
)
def test_parse_errors_name_the_place(text: str, expected: str) -> None:
    with pytest.raises(manifest.ManifestParseError) as info:
        manifest.parse_documents(text, "f.yaml")
    assert str(info.value).startswith(expected)


def billion_laughs(levels: int) -> str:
    """The classic alias bomb: each level is nine aliases of the one before (9**levels
    strings once expanded), in a few hundred bytes."""
    lines = ['a0: &a0 "lol"']
    for n in range(1, levels + 1):
        lines.append(f"a{n}: &a{n} [" + ", ".join([f"*a{n - 1}"] * 9) + "]")
    return "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata:\n  " + "\n  ".join(lines)


@pytest.mark.timeout(5)
def test_alias_bomb_is_refused_before_expansion() -> None:
    text = billion_laughs(10)
    assert len(text) < 700
    with pytest.raises(manifest.ManifestParseError) as info:
        manifest.parse_documents(NAMESPACE + "---\n" + text, "bomb.yaml")
    assert re.fullmatch(
        r"error parsing bomb\.yaml: document 2: line \d+, column \d+: YAML aliases expand this"
        r" document past 1,000,000 nodes",
        str(info.value),
    )


@pytest.mark.timeout(5)
def test_aliases_of_long_strings_are_refused_before_expansion() -> None:
    """Few nodes, much text: 20,000 aliases of a 1,000-character string would write out 20 MB
    (and nested, gigabytes) from a 100 KB file; the node bound alone let that through."""
    text = (
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata:\n"
        f"  a: &s {'x' * 1000}\n  b: [{', '.join(['*s'] * 20_000)}]\n"
    )
    with pytest.raises(manifest.ManifestParseError) as info:
        manifest.parse_documents(text, "text.yaml")
    assert re.fullmatch(
        r"error parsing text\.yaml: document 1: line 6, column 6: YAML aliases add over"
        r" 16,777,216 characters to this document",
        str(info.value),
    )


def test_the_text_bound_counts_only_what_aliases_add(monkeypatch: pytest.MonkeyPatch) -> None:
    """A manifest's own text, however long, is not refused for its size (bound lowered here
    so that the manifests stay small)."""
    monkeypatch.setattr(yamljson, "MAX_ALIASED_TEXT", 10_000)
    head = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata:\n"
    written = head + "".join(f"  k{i}: {'v' * 1000}\n" for i in range(20))
    [doc] = manifest.parse_documents(written, "big.yaml")
    assert len(doc.obj["data"]) == 20
    aliased = head + f"  a: &s {'v' * 1000}\n  b: [{', '.join(['*s'] * 11)}]\n"
    with pytest.raises(manifest.ManifestParseError, match="aliases add over 10,000 characters"):
        manifest.parse_documents(aliased, "aliased.yaml")


def test_anchors_and_aliases_within_bounds_are_values_of_their_own() -> None:
    """PyYAML's own dump writes an anchor for a value used twice (a Deployment's labels in
    its selector and template): such a manifest applies, and each place gets its own copy."""
    shared = {"app": "web"}
    text = yaml.safe_dump(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web"},
            "spec": {
                "selector": {"matchLabels": shared},
                "template": {"metadata": {"labels": shared}},
            },
        }
    )
    assert "&id001" in text
    [doc] = manifest.parse_documents(text, "dump.yaml")
    spec = doc.obj["spec"]
    assert spec["selector"]["matchLabels"] == spec["template"]["metadata"]["labels"] == shared
    assert spec["selector"]["matchLabels"] is not spec["template"]["metadata"]["labels"]
    assert len(manifest.parse_documents(billion_laughs(3), "small.yaml")[0].obj["data"]["a3"]) == 9


OBJ = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n"  # the value is on line 4


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            OBJ + "data: &x\n  a: *x\n",
            "document 1: line 4, column 7: a YAML alias refers to a node that contains it",
            id="recursive-alias",
        ),
        pytest.param(
            OBJ + "data:\n  <<: {a: b}\n",
            "document 1: line 5, column 3: merge keys (<<) are not supported: write the keys out",
            id="merge-key",
        ),
        pytest.param(
            OBJ + "data: {a: !!binary aGVsbG8=}\n",
            "document 1: line 4, column 11: !!binary values are not supported: a manifest holds"
            " only JSON values (strings, numbers, booleans, null, lists and mappings)",
            id="binary",
        ),
        pytest.param(
            OBJ + "data: !!set {a, b}\n",
            "document 1: line 4, column 7: !!set values are not supported",
            id="set",
        ),
        pytest.param(
            OBJ + "data: {a: !!timestamp 2001-12-14}\n",
            "document 1: line 4, column 11: !!timestamp values are not supported",
            id="timestamp",
        ),
        pytest.param(
            OBJ + "data: !!omap [a: 1]\n",
            "document 1: line 4, column 7: !!omap values are not supported",
            id="omap",
        ),
        pytest.param(
            OBJ + "data: !!python/object:os.system x\n",
            "document 1: line 4, column 7: !!python/object:os.system values are not supported",
            id="python-object",
        ),
        pytest.param(
            OBJ + "data: !custom x\n",
            "document 1: line 4, column 7: !custom values are not supported",
            id="local-tag",
        ),
        pytest.param(
            OBJ + "spec: {replicas: " + "9" * 5000 + "}\n",
            "document 1: line 4, column 18: integer 9999999999999999... (5000 characters) does not"
            " fit in 64 bits",
            id="integer-5000-digits",
        ),
        pytest.param(
            OBJ + "spec: {replicas: 9223372036854775808}\n",
            "document 1: line 4, column 18: integer 9223372036854775808 does not fit in 64 bits",
            id="integer-2**63",
        ),
        pytest.param(
            OBJ + "spec: {x: .inf}\n",
            "document 1: line 4, column 11: .inf is not a finite number (JSON has no infinity"
            " or NaN)",
            id="infinity",
        ),
        pytest.param(
            OBJ + "spec: {x: .NaN}\n",
            "document 1: line 4, column 11: .NaN is not a finite number",
            id="nan",
        ),
        pytest.param(
            OBJ + "spec: {x: 1.0e+999}\n",
            "document 1: line 4, column 11: 1.0e+999 is not a finite number",
            id="float-overflow",
        ),
        pytest.param(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n  name: b\n",
            'document 1: line 5, column 3: mapping key "name" already defined at line 4',
            id="duplicate-key",
        ),
        pytest.param(
            NAMESPACE
            + "---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n"
            + "  labels: {true: a, 'true': b}\n",
            'document 2: line 10, column 21: mapping key "true" already defined at line 10'
            " (written true there; keys are compared as JSON strings)",
            id="duplicate-key-once-a-string",
        ),
        pytest.param(
            OBJ + "spec:\n  ports: {8080: a, 0x1F90: b}\n",
            'document 1: line 5, column 20: mapping key "8080" already defined at line 5'
            " (written 8080 there; keys are compared as JSON strings)",
            id="duplicate-port-number",
        ),
    ],
)
def test_yaml_a_manifest_may_not_use_is_refused_by_place(text: str, expected: str) -> None:
    with pytest.raises(manifest.ManifestParseError) as info:
        manifest.parse_documents(text, "f.yaml")
    assert str(info.value).startswith("error parsing f.yaml: " + expected)


def test_characters_yaml_does_not_allow_are_a_parse_error() -> None:
    """The reader refuses them as it is made; that was a traceback, not an error message."""
    with pytest.raises(manifest.ManifestParseError) as info:
        manifest.parse_documents(OBJ + "spec: {x: \x00}\n", "f.yaml")
    assert str(info.value).startswith(
        "error parsing f.yaml: yaml: unacceptable character #x0000: special characters are not"
        " allowed"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("date: 2001-12-14", {"date": "2001-12-14"}, id="date-stays-a-string"),
        pytest.param("at: 2001-12-14T21:59:43Z", {"at": "2001-12-14T21:59:43Z"}, id="timestamp"),
        pytest.param("ports: {8080: a, 443: b}", {"ports": {"8080": "a", "443": "b"}}, id="ports"),
        pytest.param("k: {true: a, null: b}", {"k": {"true": "a", "null": "b"}}, id="bool-null"),
        pytest.param("k: {=: a}", {"k": {"=": "a"}}, id="equals-sign-key"),
        pytest.param("n: -9223372036854775808", {"n": -(2**63)}, id="int64-min"),
        pytest.param("n: 0x7fffffffffffffff", {"n": 2**63 - 1}, id="int64-max"),
        pytest.param("n: !!str 5", {"n": "5"}, id="str-tag"),
        pytest.param("n: 1.5e+3", {"n": 1500.0}, id="float"),
    ],
)
def test_json_values_are_read_as_kubectl_reads_them(text: str, expected: dict[str, Any]) -> None:
    (doc,) = manifest.parse_documents(OBJ + "spec:\n  " + text + "\n", "f.yaml")
    assert doc.obj["spec"] == expected


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("# only a comment\n", id="comment"),
        pytest.param("---\n# a\n---\n...\n", id="empty-documents"),
    ],
)
def test_a_file_without_objects_parses_to_nothing(text: str) -> None:
    # "no objects passed to apply" is said once for all the -f files, by the command.
    assert manifest.parse_documents(text, "f.yaml") == []


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
