from __future__ import annotations

import pytest

from meshctl import labels


@pytest.mark.parametrize(
    ("args", "expected_set", "expected_remove"),
    [
        pytest.param(["a=b"], (("a", "b"),), (), id="set"),
        pytest.param(["a-"], (), ("a",), id="remove"),
        pytest.param(
            ["istio.io/dataplane-mode=ambient", "x="],
            (("istio.io/dataplane-mode", "ambient"), ("x", "")),
            (),
            id="prefixed-key-and-empty-value",
        ),
        pytest.param(["a=1", "b-"], (("a", "1"),), ("b",), id="both"),
    ],
)
def test_parse_label_args(
    args: list[str], expected_set: tuple[tuple[str, str], ...], expected_remove: tuple[str, ...]
) -> None:
    changes = labels.parse_label_args(args)
    assert changes.set == expected_set
    assert changes.remove == expected_remove


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param([], "at least one label update", id="none"),
        pytest.param(["novalue"], "invalid label argument 'novalue'", id="no-equals"),
        pytest.param(["-x=1"], "invalid label key '-x'", id="bad-key-start"),
        pytest.param(["Bad_Prefix/x=1"], "prefix part", id="bad-prefix"),
        pytest.param(["a=b c"], "invalid label value 'b c'", id="space-in-value"),
        pytest.param(["a=" + "v" * 64], "invalid label value", id="value-too-long"),
        pytest.param(["a=1", "a-"], "can not both modify and remove", id="set-and-remove"),
        pytest.param(["a=1", "a=2"], "given twice", id="twice"),
    ],
)
def test_parse_label_args_errors(args: list[str], message: str) -> None:
    with pytest.raises(labels.LabelError, match=message):
        labels.parse_label_args(args)


def plan(current: dict[str, str], args: list[str], overwrite: bool = False) -> labels.LabelPlan:
    return labels.build_label_plan(current, labels.parse_label_args(args), overwrite=overwrite)


@pytest.mark.parametrize(
    ("current", "args", "overwrite", "patch", "verb"),
    [
        pytest.param({}, ["a=b"], False, {"a": "b"}, "labeled", id="new"),
        pytest.param({"a": "b"}, ["a=b"], False, None, "not labeled", id="same-value"),
        pytest.param({"a": "b"}, ["a=c"], True, {"a": "c"}, "labeled", id="overwrite"),
        pytest.param({"a": "b"}, ["a-"], False, {"a": None}, "unlabeled", id="remove"),
        pytest.param({}, ["a-"], False, None, "not labeled", id="remove-missing"),
    ],
)
def test_label_plan(
    current: dict[str, str],
    args: list[str],
    overwrite: bool,
    patch: dict[str, str | None] | None,
    verb: str,
) -> None:
    result = plan(current, args, overwrite)
    assert result.verb == verb
    assert result.patch == (None if patch is None else {"metadata": {"labels": patch}})


def test_changing_a_value_needs_overwrite() -> None:
    with pytest.raises(labels.LabelError) as info:
        plan({"istio.io/dataplane-mode": "ambient"}, ["istio.io/dataplane-mode=none"])
    assert str(info.value) == (
        "'istio.io/dataplane-mode' already has a value (ambient), and --overwrite is false"
    )
