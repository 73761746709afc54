"""`meshctl apply -f`'s manifest parsing on arbitrary YAML-ish text: only ManifestParseError may
come out, and what parses is JSON that the last-applied annotation can hold."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshcore.kube import objects
from meshctl import manifest

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

HEAD = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n"

# Pieces that reach every refusal and every scalar kind YAML 1.1 resolves.
_scalars = st.sampled_from(
    [
        "a", "'a'", '"a"', "1", "-1", "0x1F", "0o17", "017", "1_000", "1:30", "1.5", "1.0e+3",
        ".inf", "-.Inf", ".nan", "~", "null", "true", "yes", "off", "=", "<<", "2001-12-14",
        "2001-12-14T21:59:43Z", "9" * 30, "!!binary aGk=", "!!str 5", "!!int '7'", "!!float 1",
        "!!timestamp 2001-12-14", "!!set {a}", "!!omap [a: 1]", "!!pairs [a: 1]", "!foo x",
        "!!python/tuple [1]", "&a 1", "*a", "[a, b]", "{a: 1, a: 2}", "{1: a, '1': b}", "''",
        "|\n    text", "? [a]\n  : b",
    ]
)  # fmt: skip
_keys = st.sampled_from(["a", "b", "'a'", "1", "true", "null", "<<", "=", "[a]", "{a: 1}"])


@st.composite
def _mappings(draw: st.DrawFn) -> str:
    pairs = draw(st.lists(st.tuples(_keys, _scalars), max_size=4))
    return "data:\n" + "".join(f"  {k}: {v}\n" for k, v in pairs) if pairs else "data: {}\n"


_documents = st.one_of(
    _mappings().map(lambda body: HEAD + body),
    st.text(alphabet="ab:-[]{}&*!,'\"#\n 1", max_size=60),
    _scalars.map(lambda s: f"apiVersion: {s}\nkind: {s}\nmetadata: {{name: {s}}}\n"),
)
_streams = st.lists(_documents, max_size=3).map("\n---\n".join)


@SETTINGS
@given(_streams)
def test_only_manifest_errors_come_out_and_what_parses_is_json(text: str) -> None:
    try:
        docs = manifest.parse_documents(text, "f.yaml")
    except manifest.ManifestParseError:
        return
    for doc in docs:
        json.dumps(doc.obj, allow_nan=False)
        objects.build_last_applied(doc.obj)
        assert isinstance(doc.obj["apiVersion"], str)
        assert isinstance(doc.obj["metadata"]["name"], str)
