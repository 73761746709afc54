"""`meshctl apply -f` against the local API server: YAML a manifest may not use is refused with
the file, document and line, before anything is applied (found by an audit: aliases expanded
into gigabytes, `!!binary` and huge integers ended in tracebacks, duplicate keys were kept)."""

from __future__ import annotations

import pathlib

import pytest

from tests.direct import meshctl_harness

playground = meshctl_harness.playground

FIRST = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: first\n"
CONFIG = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\n  namespace: first\n"


def assert_nothing_applied(p: meshctl_harness.Playground) -> None:
    code, _, err = p.meshctl("get", "ns", "first")
    assert (code, err) == (1, 'Error from server (NotFound): namespaces "first" not found\n')


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        pytest.param(
            CONFIG + "data: &lol\n  a: [*lol]\n",
            "document 2: line 11, column 7: a YAML alias refers to a node that contains it",
            id="recursive-alias",
        ),
        pytest.param(
            CONFIG + "binaryData:\n  a: !!binary aGVsbG8=\n",
            "document 2: line 12, column 6: !!binary values are not supported: a manifest holds"
            " only JSON values (strings, numbers, booleans, null, lists and mappings)",
            id="binary",
        ),
        pytest.param(
            CONFIG + "data: !!set {a, b}\n",
            "document 2: line 11, column 7: !!set values are not supported",
            id="set",
        ),
        pytest.param(
            CONFIG + "data:\n  a: " + "1" * 5000 + "\n",
            "document 2: line 12, column 6: integer 1111111111111111... (5000 characters) does"
            " not fit in 64 bits",
            id="huge-integer",
        ),
        pytest.param(
            CONFIG + "data:\n  a: x\n  a: y\n",
            'document 2: line 13, column 3: mapping key "a" already defined at line 12',
            id="duplicate-key",
        ),
    ],
)
def test_yaml_a_manifest_may_not_use_applies_nothing(
    playground: meshctl_harness.Playground, bad: str, expected: str
) -> None:
    code, out, err = playground.meshctl("apply", "-f", "-", stdin=FIRST + "---\n" + bad)
    assert (code, out) == (1, "")
    assert err.startswith("error: error parsing STDIN: " + expected)
    assert err.count("\n") == 1  # one line, no traceback
    assert_nothing_applied(playground)


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        pytest.param(
            "apiVersion: 1\nkind: ConfigMap\nmetadata: {name: c}\n",
            "apiVersion must be a string, not 1 (an integer)",
            id="apiversion",
        ),
        pytest.param(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: 12345}\n",
            "metadata.name must be a string, not 12345 (an integer)",
            id="name",
        ),
    ],
)
def test_fields_that_are_not_strings_are_named_and_nothing_applied(
    playground: meshctl_harness.Playground,
    tmp_path: pathlib.Path,
    bad: str,
    expected: str,
) -> None:
    good_file, bad_file = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good_file.write_text(FIRST)
    bad_file.write_text(bad)
    code, out, err = playground.meshctl("apply", "-f", str(good_file), "-f", str(bad_file))
    assert (code, out) == (1, "")
    assert err == f'error: error validating "{bad_file}": document 1: {expected}\n'
    assert_nothing_applied(playground)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("# nothing here\n---\n# nor here\n", id="comments-only"),
    ],
)
def test_a_file_without_objects_is_an_error(
    playground: meshctl_harness.Playground, text: str
) -> None:
    code, out, err = playground.meshctl("apply", "-f", "-", stdin=text)
    assert (code, out, err) == (1, "", "error: no objects passed to apply\n")


def test_an_empty_file_beside_one_with_objects_is_fine(
    playground: meshctl_harness.Playground, tmp_path: pathlib.Path
) -> None:
    empty, good = tmp_path / "empty.yaml", tmp_path / "good.yaml"
    empty.write_text("# nothing yet\n")
    good.write_text(FIRST)
    code, out, err = playground.meshctl("apply", "-f", str(empty), "-f", str(good))
    assert (code, out, err) == (0, "namespace/first created\n", "")
