"""Kubernetes' YAML-to-JSON conversion, as kubectl and the API server apply it to manifests and
request bodies: `load_documents` turns a YAML stream into JSON data, or says at which document,
line and column it holds something JSON cannot (see `Loader`).

Used by ``meshctl apply -f`` and by the local API server's ``application/yaml`` bodies, so that
a manifest means the same thing on both sides.
"""

from __future__ import annotations

import json
import math
from collections.abc import Hashable
from typing import Any, NoReturn

import yaml


class YamlDocumentError(ValueError):
    """A YAML stream that is not JSON data: `detail` names the line and column; `document` is
    the 1-based document of well-formed YAML that is refused, None for a syntax error."""

    def __init__(self, detail: str, document: int | None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.document = document


_YAML_TAG = "tag:yaml.org,2002:"
_MERGE_TAG = _YAML_TAG + "merge"
_INT64 = 2**63
# An integer written in more characters than this cannot fit in 64 bits in any YAML notation;
# it is refused before Python converts it (a long sexagesimal one converts in quadratic time).
_MAX_INT_TEXT = 256


class RefusedError(yaml.MarkedYAMLError):
    """Well-formed YAML that a manifest may not use: an alias that expands too far or contains
    itself, a value JSON cannot hold, a duplicate key."""

    def __init__(self, mark: yaml.Mark | None, problem: str) -> None:
        super().__init__(problem=problem, problem_mark=mark)


MAX_EXPANDED_NODES = 1_000_000  # nodes of one document with every alias written out
# Characters of scalar text that aliases may add to a document once written out: a few
# anchored long strings, aliased within the node limit, would otherwise still make gigabytes.
MAX_ALIASED_TEXT = 16 << 20


def _check_expansion(root: yaml.Node) -> None:
    """Refuse a document that aliases would blow up, or that contains itself."""
    sizes: dict[int, tuple[int, int]] = {}  # node -> (nodes, text) with aliases written out
    open_nodes: set[int] = set()
    written = 0  # text of the distinct scalars seen so far: what the document holds itself

    def size(node: yaml.Node) -> tuple[int, int]:
        nonlocal written
        known = sizes.get(id(node))
        if known is not None:
            return known
        if id(node) in open_nodes:
            raise RefusedError(node.start_mark, "a YAML alias refers to a node that contains it")
        open_nodes.add(id(node))
        nodes, text = 1, 0
        if isinstance(node, yaml.SequenceNode):
            children: list[yaml.Node] = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
            text = len(node.value)
            written += text
        for child in children:
            child_nodes, child_text = size(child)
            nodes += child_nodes
            text += child_text
            if nodes > MAX_EXPANDED_NODES:
                raise RefusedError(
                    node.start_mark,
                    f"YAML aliases expand this document past {MAX_EXPANDED_NODES:,} nodes",
                )
            # What this node expands to beyond all the text written so far can only be less
            # than what aliases add to the whole document: no document within the bound fails.
            if text - written > MAX_ALIASED_TEXT:
                raise RefusedError(
                    node.start_mark,
                    f"YAML aliases add over {MAX_ALIASED_TEXT:,} characters to this document",
                )
        open_nodes.discard(id(node))
        sizes[id(node)] = (nodes, text)
        return nodes, text

    size(root)


def excerpt(text: str) -> str:
    """`text`, cut short for an error message."""
    return text if len(text) <= 24 else f"{text[:16]}... ({len(text)} characters)"


def _written(node: yaml.Node) -> str:
    """A scalar key as the file spells it, quotes included (``true`` and ``'true'`` differ)."""
    if isinstance(node, yaml.ScalarNode):
        quote = node.style if node.style in ("'", '"') else ""
        return f"{quote}{node.value}{quote}"
    return ""


class Loader(yaml.SafeLoader):
    """Safe YAML reduced to what kubectl's YAML-to-JSON conversion accepts.

    Invariant: a document it loads is JSON data (string keys; string, 64-bit integer, finite
    number, boolean, null, list and mapping values), each mapping key written once, so nothing
    after it (the last-applied annotation, the three-way merge) meets a value it cannot encode.
    Anything else is a `RefusedError` at the node's line, raised while the document is read:

    - a document whose aliases would expand it past `MAX_EXPANDED_NODES` nodes (an alias bomb
      turns a few hundred bytes into gigabytes once written out as JSON), or that refers to
      itself; anchors and aliases are fine otherwise (PyYAML's own `dump` writes them for
      shared values), and so are the objects they share;
    - merge keys (``<<``), which kubectl's conversion has but manifests hardly use;
    - tags other than JSON's (``!!binary``, ``!!set``, ``!!timestamp``, ``!!omap``, ...),
      integers beyond 64 bits, infinities and NaN;
    - a mapping key written twice, compared as the JSON string it becomes (``true`` and
      ``"true"`` are the same key; ``8080:`` is ``"8080"``).

    Dates stay strings (there is no timestamp resolver), as in kubectl's conversion.
    """

    def compose_document(self) -> yaml.Node | None:
        # Counted on the composed graph, where an alias is the anchored node itself: nothing is
        # expanded to count it.
        node = super().compose_document()
        if node is not None:
            _check_expansion(node)
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        if not isinstance(node, yaml.MappingNode):
            raise yaml.constructor.ConstructorError(
                None, None, f"expected a mapping, but found {node.id}", node.start_mark
            )
        mapping: dict[Hashable, Any] = {}
        first: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                raise RefusedError(
                    key_node.start_mark, "merge keys (<<) are not supported: write the keys out"
                )
            key = self.construct_object(key_node, deep=deep)
            if not (key is None or isinstance(key, str | int | float)):
                raise RefusedError(
                    key_node.start_mark,
                    "a mapping key must be a string, a number, a boolean or null",
                )
            text = key_text(key)
            earlier = first.get(text)
            if earlier is not None:
                spelling = ""
                if _written(earlier) != _written(key_node):
                    spelling = (
                        f" (written {_written(earlier)} there; keys are compared as JSON strings)"
                    )
                raise RefusedError(
                    key_node.start_mark,
                    f"mapping key {json.dumps(text)} already defined at line"
                    f" {earlier.start_mark.line + 1}{spelling}",
                )
            first[text] = key_node
            mapping[text] = self.construct_object(value_node, deep=deep)
        return mapping

    def construct_json_int(self, node: yaml.ScalarNode) -> int:
        value = None
        if len(node.value) <= _MAX_INT_TEXT:
            try:
                value = self.construct_yaml_int(node)
            except ValueError:  # Python's own limit on the digits it converts
                value = None
        if value is None or not -_INT64 <= value < _INT64:
            raise RefusedError(
                node.start_mark, f"integer {excerpt(node.value)} does not fit in 64 bits"
            )
        return value

    def construct_json_float(self, node: yaml.ScalarNode) -> float:
        value = self.construct_yaml_float(node)
        if not math.isfinite(value):
            raise RefusedError(
                node.start_mark,
                f"{excerpt(node.value)} is not a finite number (JSON has no infinity or NaN)",
            )
        return value

    def construct_non_json(self, node: yaml.Node) -> NoReturn:
        tag = node.tag
        shown = "!!" + tag.removeprefix(_YAML_TAG) if tag.startswith(_YAML_TAG) else tag
        raise RefusedError(
            node.start_mark,
            f"{shown} values are not supported: a manifest holds only JSON values (strings,"
            " numbers, booleans, null, lists and mappings)",
        )


# JSON's types only; every other tag, explicit or local, reaches `construct_non_json`. `=` is a
# plain string (no "value" resolver), as it is for kubectl.
Loader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp)
        for tag, regexp in resolvers
        if tag not in (_YAML_TAG + "timestamp", _YAML_TAG + "value")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Loader.yaml_constructors = {
    _YAML_TAG + "null": yaml.SafeLoader.construct_yaml_null,
    _YAML_TAG + "bool": yaml.SafeLoader.construct_yaml_bool,
    _YAML_TAG + "int": Loader.construct_json_int,
    _YAML_TAG + "float": Loader.construct_json_float,
    _YAML_TAG + "str": yaml.SafeLoader.construct_yaml_str,
    _YAML_TAG + "seq": yaml.SafeLoader.construct_yaml_seq,
    _YAML_TAG + "map": yaml.SafeLoader.construct_yaml_map,
    None: Loader.construct_non_json,
}
Loader.yaml_multi_constructors = {}


def key_text(key: str | int | float | None) -> str:
    """JSON's string key for a YAML key (``8080:`` is ``"8080"``, as kubectl converts it): a
    PeerAuthentication's `portLevelMtls` is keyed by port numbers, and a three-way apply
    compares the manifest with what the server stored."""
    if isinstance(key, bool):
        return "true" if key else "false"
    if key is None:
        return "null"
    return key if isinstance(key, str) else str(key)


def _where(exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    return f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""


def _one_line(exc: yaml.YAMLError) -> str:
    return " ".join(str(exc).split())


def load_documents(text: str | bytes) -> list[Any]:
    """Every document of the stream (None for an empty one), as JSON data.

    Raises YamlDocumentError: for YAML that `Loader` refuses or cannot construct, with the
    document it is in; for a syntax error (or bytes that are not UTF-8/16), without one.
    """
    raw: list[Any] = []
    try:
        # The reader checks the text (its encoding, non-printable characters) as it is made.
        loader = Loader(text)
    except yaml.YAMLError as exc:
        raise YamlDocumentError(_one_line(exc), None) from exc
    try:
        while loader.check_node():  # = check_data(), which the stubs leave untyped
            # Written out once: values an alias shared become separate, so that editing one
            # object (a default namespace, say) cannot change another part of the document.
            raw.append(json.loads(json.dumps(loader.get_data())))
    except (RefusedError, yaml.constructor.ConstructorError) as exc:
        problem = exc.problem or exc.context or "not JSON data"
        raise YamlDocumentError(f"{_where(exc)}{problem}", len(raw) + 1) from exc
    except yaml.MarkedYAMLError as exc:
        problem = exc.problem or exc.context or "invalid YAML"
        raise YamlDocumentError(f"{_where(exc)}{problem}", None) from exc
    except yaml.YAMLError as exc:  # the reader: bytes that do not decode, characters YAML refuses
        raise YamlDocumentError(_one_line(exc), None) from exc
    except RecursionError as exc:
        raise YamlDocumentError("nested too deeply", None) from exc
    finally:
        loader.dispose()
    return raw
