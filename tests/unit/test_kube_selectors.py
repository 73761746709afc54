from __future__ import annotations

from typing import Any

import pytest

from meshcore.kube import errors, selectors

LABELS = {"app": "web", "tier": "front", "example.com/team": "a"}


@pytest.mark.parametrize(
    ("text", "labels", "expected"),
    [
        ("", {}, True),
        ("app=web", LABELS, True),
        ("app==web", LABELS, True),
        ("app=db", LABELS, False),
        ("app!=db", LABELS, True),
        ("app!=web", LABELS, False),
        ("missing!=x", LABELS, True),
        ("app in (web,db)", LABELS, True),
        ("app in (db)", LABELS, False),
        ("missing in (x)", LABELS, False),
        ("app notin (db, cache)", LABELS, True),
        ("app notin (web)", LABELS, False),
        ("missing notin (x)", LABELS, True),
        ("app", LABELS, True),
        ("missing", LABELS, False),
        ("!missing", LABELS, True),
        ("!app", LABELS, False),
        ("app=web,tier=front", LABELS, True),
        ("app=web,tier=back", LABELS, False),
        ("app in (web, db),!missing,tier", LABELS, True),
        ("example.com/team=a", LABELS, True),
        (" app = web ", LABELS, True),
        ("app=", {"app": ""}, True),
        ("app=", LABELS, False),
    ],
    ids=lambda v: repr(v) if isinstance(v, str) else "",
)
def test_label_selector_matches(text: str, labels: dict[str, str], expected: bool) -> None:
    assert selectors.parse_label_selector(text).matches(labels) is expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("app in web", "cannot understand"),
        ("app in (a", "missing ')'"),
        ("app in (a))", "unbalanced ')'"),
        ("app in ((a))", "nested parentheses"),
        ("app in ()", "at least one value"),
        ("app=web,", "empty requirement"),
        (",app", "empty requirement"),
        ("app=a=b", "invalid label key"),
        ("-app=x", "invalid label key"),
        ("app=bad value", "cannot understand"),
        ("app=" + "v" * 64, "invalid label value"),
        ("Bad_/x=y", "invalid label key"),
        ("a b", "cannot understand"),
        ("!", "invalid label key"),
    ],
    ids=lambda v: v[:20],
)
def test_label_selector_rejects(text: str, fragment: str) -> None:
    with pytest.raises(errors.SelectorError) as err:
        selectors.parse_label_selector(text)
    assert fragment in str(err.value)
    assert repr(text) in str(err.value)
    # It is the server's 400 answer as well.
    assert (err.value.code, err.value.reason) == (400, "BadRequest")


def test_label_selector_round_trips_through_str() -> None:
    text = "app=web,tier!=back,env in (a,b),zone notin (x),ready,!old"
    parsed = selectors.parse_label_selector(text)
    assert selectors.parse_label_selector(str(parsed)) == parsed


def test_selector_from_match_labels() -> None:
    sel = selectors.selector_from_match_labels({"tier": "front", "app": "web"})
    assert str(sel) == "app=web,tier=front"
    assert sel.matches(LABELS)
    assert not sel.matches({"app": "web"})
    assert selectors.selector_from_match_labels({}).matches({})


POD: dict[str, Any] = {
    "metadata": {"name": "web", "namespace": "shop"},
    "spec": {"nodeName": "n1", "unschedulable": False, "replicas": 3},
    "status": {"phase": "Running"},
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", True),
        ("spec.nodeName=n1", True),
        ("spec.nodeName==n1", True),
        ("spec.nodeName=n2", False),
        ("spec.nodeName!=n2", True),
        ("metadata.name=web,metadata.namespace=shop", True),
        ("metadata.name=web,metadata.namespace=other", False),
        ("status.phase=Running", True),
        ("spec.missing=", True),
        ("spec.missing!=", False),
        ("spec.unschedulable=false", True),
        ("spec.replicas=3", True),
        ("metadata=", True),
    ],
    ids=repr,
)
def test_field_selector_matches(text: str, expected: bool) -> None:
    assert selectors.parse_field_selector(text).matches(POD) is expected


def test_field_selector_escapes() -> None:
    sel = selectors.parse_field_selector(r"metadata.name=a\,b\=c\\d")
    assert sel.requirements[0].value == "a,b=c\\d"
    assert selectors.parse_field_selector(str(sel)) == sel


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("spec.nodeName", "has no '=', '==' or '!='"),
        ("=n1", "invalid field path"),
        ("spec..nodeName=x", "invalid field path"),
        ("spec.nodeName=a=b", "unescaped '='"),
        ("spec.nodeName=a,", "empty requirement"),
        ("spec.nodeName=a\\", "dangling"),
    ],
    ids=lambda v: v[:20],
)
def test_field_selector_rejects(text: str, fragment: str) -> None:
    with pytest.raises(errors.SelectorError) as err:
        selectors.parse_field_selector(text)
    assert fragment in str(err.value)


def test_field_selector_supported_paths() -> None:
    supported = {"metadata.name", "spec.nodeName"}
    assert selectors.parse_field_selector("spec.nodeName=n1", supported).paths == {"spec.nodeName"}
    with pytest.raises(errors.SelectorError) as err:
        selectors.parse_field_selector("spec.hostname=x", supported)
    assert str(err.value) == 'field label not supported: "spec.hostname"'
