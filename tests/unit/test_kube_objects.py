from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from meshcore.kube import objects

# RFC 7386, Appendix A, row by row.
RFC7386_EXAMPLES: list[tuple[Any, Any, Any]] = [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
]


@pytest.mark.parametrize(
    ("target", "patch", "expected"),
    RFC7386_EXAMPLES,
    ids=[f"rfc7386-{i + 1}" for i in range(len(RFC7386_EXAMPLES))],
)
def test_merge_patch_rfc7386(target: Any, patch: Any, expected: Any) -> None:
    target_before, patch_before = copy.deepcopy(target), copy.deepcopy(patch)
    result = objects.merge_patch(target, patch)
    assert result == expected
    # Neither input changes, and the result shares nothing with them.
    assert (target, patch) == (target_before, patch_before)
    if isinstance(result, dict) and isinstance(target, dict):
        for key, value in result.items():
            if isinstance(value, dict | list):
                assert value is not target.get(key)
                assert value is not (patch.get(key) if isinstance(patch, dict) else None)


def test_accessors_tolerate_missing_and_mistyped_fields() -> None:
    pod = {
        "metadata": {
            "name": "web",
            "namespace": "shop",
            "uid": "u1",
            "resourceVersion": "7",
            "labels": {"app": "web", "bad": 5},
            "annotations": {"a": "b"},
        }
    }
    assert objects.name(pod) == "web"
    assert objects.namespace(pod) == "shop"
    assert objects.uid(pod) == "u1"
    assert objects.resource_version(pod) == "7"
    assert objects.labels(pod) == {"app": "web"}
    assert objects.annotations_of(pod) == {"a": "b"}
    assert objects.key(pod) == ("shop", "web")
    assert not objects.is_terminating(pod)
    for broken in ({}, {"metadata": "x"}, {"metadata": {"name": 5, "labels": []}}):
        assert objects.name(broken) == ""
        assert objects.labels(broken) == {}
        assert objects.key(broken) == ("", "")
    assert objects.is_terminating({"metadata": {"deletionTimestamp": "2024-01-01T00:00:00Z"}})


@pytest.mark.parametrize(
    ("last", "desired", "live", "expected"),
    [
        pytest.param({}, {"a": 1}, {"a": 1}, {}, id="unchanged"),
        pytest.param({}, {"a": 2}, {"a": 1}, {"a": 2}, id="changed"),
        pytest.param({"a": 1, "b": 1}, {"a": 1}, {"a": 1, "b": 1}, {"b": None}, id="removed"),
        pytest.param({}, {"a": 1}, {"a": 1, "status": {"x": 1}}, {}, id="server-owned-kept"),
        pytest.param(
            {"m": {"x": "1"}},
            {"m": {"y": "2"}},
            {"m": {"x": "1", "other": "3"}},
            {"m": {"y": "2", "x": None}},
            id="nested-three-way",
        ),
        pytest.param({"a": 1}, {}, {}, {}, id="already-gone"),
        pytest.param({}, {"l": [1]}, {"l": [1, 2]}, {"l": [1]}, id="lists-replaced"),
        pytest.param({}, {"d": {"k": 1}}, {"d": "x"}, {"d": {"k": 1}}, id="type-change"),
    ],
)
def test_build_apply_patch(
    last: dict[str, Any], desired: dict[str, Any], live: dict[str, Any], expected: dict[str, Any]
) -> None:
    patch = objects.build_apply_patch(last, desired, live)
    assert patch == expected
    # Applying the patch gives the live object with every desired field as desired.
    result = objects.merge_patch(live, patch)
    for key, value in desired.items():
        if not isinstance(value, dict):
            assert result[key] == value


def test_last_applied_round_trip_excludes_itself() -> None:
    desired = {
        "kind": "Service",
        "metadata": {"name": "web", "annotations": {objects.LAST_APPLIED: "old", "x": "y"}},
    }
    text = objects.build_last_applied(desired)
    assert json.loads(text) == {
        "kind": "Service",
        "metadata": {"name": "web", "annotations": {"x": "y"}},
    }
    obj = {"metadata": {"annotations": {objects.LAST_APPLIED: text}}}
    assert objects.find_last_applied(obj)["metadata"]["name"] == "web"
    assert (
        objects.find_last_applied({"metadata": {"annotations": {objects.LAST_APPLIED: "{"}}}) == {}
    )
    assert desired["metadata"]["annotations"][objects.LAST_APPLIED] == "old"  # type: ignore[index]
