"""Manifests for ``meshctl apply -f`` / ``delete -f``: parse every document, resolve every kind,
and only then act, so that a typo in the last document applies nothing.

`parse_documents` is pure; `resolve_documents` asks the API server's discovery (through the
client's `resolve`) which resource serves each (apiVersion, kind).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Hashable, Mapping
from typing import Any, NoReturn, Protocol

import yaml

from meshcore.kube import errors as kube_errors
from meshcore.kube import resources
from meshctl import errors


class ManifestParseError(errors.ManifestError):
    """The file is not YAML, or a document is not a Kubernetes object."""


class KindNotFoundError(errors.ManifestError):
    """A document's kind is not served: kubectl's "resource mapping not found" message."""


@dataclasses.dataclass(frozen=True, slots=True)
class Document:
    index: int  # 1-based position in the file, for messages
    obj: dict[str, Any]

    @property
    def api_version(self) -> str:
        return str(self.obj.get("apiVersion", ""))

    @property
    def kind(self) -> str:
        return str(self.obj.get("kind", ""))

    @property
    def name(self) -> str:
        meta = self.obj.get("metadata")
        return str(meta.get("name", "")) if isinstance(meta, Mapping) else ""

    @property
    def namespace(self) -> str:
        meta = self.obj.get("metadata")
        return str(meta.get("namespace") or "") if isinstance(meta, Mapping) else ""


@dataclasses.dataclass(frozen=True, slots=True)
class Resolved:
    rtype: resources.ResourceType
    obj: dict[str, Any]  # with metadata.namespace filled in for namespaced kinds

    @property
    def name(self) -> str:
        return str(self.obj["metadata"]["name"])

    @property
    def namespace(self) -> str | None:
        return str(self.obj["metadata"]["namespace"]) if self.rtype.namespaced else None

    @property
    def ref(self) -> str:
        """kubectl's ``kind[.group]/name`` used in "pod/client created"."""
        return f"{kind_ref(self.rtype)}/{self.name}"


def kind_ref(rtype: resources.ResourceType) -> str:
    kind = rtype.kind.lower()
    return f"{kind}.{rtype.group}" if rtype.group else kind


_YAML_TAG = "tag:yaml.org,2002:"
_MERGE_TAG = _YAML_TAG + "merge"
_INT64 = 2**63
# An integer written in more characters than this cannot fit in 64 bits in any YAML notation;
# it is refused before Python converts it (a long sexagesimal one converts in quadratic time).
_MAX_INT_TEXT = 256


class _RefusedError(yaml.MarkedYAMLError):
    """Well-formed YAML that a manifest may not use: an anchor or alias, a value JSON cannot
    hold, a duplicate key."""

    def __init__(self, mark: yaml.Mark | None, problem: str) -> None:
        super().__init__(problem=problem, problem_mark=mark)


MAX_EXPANDED_NODES = 1_000_000  # nodes of one document with every alias written out


def _check_expansion(root: yaml.Node) -> None:
    """Refuse a document that aliases would blow up, or that contains itself."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        known = sizes.get(id(node))
        if known is not None:
            return known
        if id(node) in open_nodes:
            raise _RefusedError(node.start_mark, "a YAML alias refers to a node that contains it")
        open_nodes.add(id(node))
        total = 1
        if isinstance(node, yaml.SequenceNode):
            children: list[yaml.Node] = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        for child in children:
            total += size(child)
            if total > MAX_EXPANDED_NODES:
                raise _RefusedError(
                    node.start_mark,
                    f"YAML aliases expand this document past {MAX_EXPANDED_NODES:,} nodes",
                )
        open_nodes.discard(id(node))
        sizes[id(node)] = total
        return total

    size(root)


def _excerpt(text: str) -> str:
    return text if len(text) <= 24 else f"{text[:16]}... ({len(text)} characters)"


def _written(node: yaml.Node) -> str:
    """A scalar key as the file spells it, quotes included (``true`` and ``'true'`` differ)."""
    if isinstance(node, yaml.ScalarNode):
        quote = node.style if node.style in ("'", '"') else ""
        return f"{quote}{node.value}{quote}"
    return ""


class _Loader(yaml.SafeLoader):
    """Safe YAML reduced to what kubectl's YAML-to-JSON conversion accepts.

    Invariant: a document it loads is JSON data (string keys; string, 64-bit integer, finite
    number, boolean, null, list and mapping values), each mapping key written once, so nothing
    after it (the last-applied annotation, the three-way merge) meets a value it cannot encode.
    Anything else is a `_RefusedError` at the node's line, raised while the document is read:

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
                raise _RefusedError(
                    key_node.start_mark, "merge keys (<<) are not supported: write the keys out"
                )
            key = self.construct_object(key_node, deep=deep)
            if not (key is None or isinstance(key, str | int | float)):
                raise _RefusedError(
                    key_node.start_mark,
                    "a mapping key must be a string, a number, a boolean or null",
                )
            text = _key_text(key)
            earlier = first.get(text)
            if earlier is not None:
                spelling = ""
                if _written(earlier) != _written(key_node):
                    spelling = (
                        f" (written {_written(earlier)} there; keys are compared as JSON strings)"
                    )
                raise _RefusedError(
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
            raise _RefusedError(
                node.start_mark, f"integer {_excerpt(node.value)} does not fit in 64 bits"
            )
        return value

    def construct_json_float(self, node: yaml.ScalarNode) -> float:
        value = self.construct_yaml_float(node)
        if not math.isfinite(value):
            raise _RefusedError(
                node.start_mark,
                f"{_excerpt(node.value)} is not a finite number (JSON has no infinity or NaN)",
            )
        return value

    def construct_non_json(self, node: yaml.Node) -> NoReturn:
        tag = node.tag
        shown = "!!" + tag.removeprefix(_YAML_TAG) if tag.startswith(_YAML_TAG) else tag
        raise _RefusedError(
            node.start_mark,
            f"{shown} values are not supported: a manifest holds only JSON values (strings,"
            " numbers, booleans, null, lists and mappings)",
        )


# JSON's types only; every other tag, explicit or local, reaches `construct_non_json`. `=` is a
# plain string (no "value" resolver), as it is for kubectl.
_Loader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp)
        for tag, regexp in resolvers
        if tag not in (_YAML_TAG + "timestamp", _YAML_TAG + "value")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.yaml_constructors = {
    _YAML_TAG + "null": yaml.SafeLoader.construct_yaml_null,
    _YAML_TAG + "bool": yaml.SafeLoader.construct_yaml_bool,
    _YAML_TAG + "int": _Loader.construct_json_int,
    _YAML_TAG + "float": _Loader.construct_json_float,
    _YAML_TAG + "str": yaml.SafeLoader.construct_yaml_str,
    _YAML_TAG + "seq": yaml.SafeLoader.construct_yaml_seq,
    _YAML_TAG + "map": yaml.SafeLoader.construct_yaml_map,
    None: _Loader.construct_non_json,
}
_Loader.yaml_multi_constructors = {}


def _key_text(key: str | int | float | None) -> str:
    """JSON's string key for a YAML key (``8080:`` is ``"8080"``, as kubectl converts it): a
    PeerAuthentication's `portLevelMtls` is keyed by port numbers, and a three-way apply
    compares the manifest with what the server stored."""
    if isinstance(key, bool):
        return "true" if key else "false"
    if key is None:
        return "null"
    return key if isinstance(key, str) else str(key)


def _load(text: str, source: str) -> list[Any]:
    """Every document of the stream (None for an empty one), as JSON data."""
    loader = _Loader(text)
    raw: list[Any] = []
    try:
        while loader.check_node():  # = check_data(), which the stubs leave untyped
            # Written out once: values an alias shared become separate, so that editing one
            # object (a default namespace, say) cannot change another part of the document.
            raw.append(json.loads(json.dumps(loader.get_data())))
    except (_RefusedError, yaml.constructor.ConstructorError) as exc:
        # Valid YAML that is not a manifest's: said with the document it is in.
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = exc.problem or exc.context or "not a manifest's YAML"
        raise ManifestParseError(
            f"error parsing {source}: document {len(raw) + 1}: {where}{problem}"
        ) from exc
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = exc.problem or exc.context or "invalid YAML"
        raise ManifestParseError(f"error parsing {source}: yaml: {where}{problem}") from exc
    except yaml.YAMLError as exc:
        raise ManifestParseError(f"error parsing {source}: yaml: {exc}") from exc
    except RecursionError as exc:
        raise ManifestParseError(f"error parsing {source}: yaml: nested too deeply") from exc
    finally:
        loader.dispose()
    return raw


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return f"{json.dumps(_excerpt(value))} (a string)"
    if isinstance(value, bool):
        return f"{json.dumps(value)} (a boolean)"
    if isinstance(value, int):
        return f"{value} (an integer)"
    return f"{json.dumps(value)} (a number)"


def _string_problems(field: str, value: Any) -> list[str]:
    if value is None or value == "":
        return [f"{field} not set"]
    if not isinstance(value, str):
        return [f"{field} must be a string, not {_describe(value)}"]
    return []


def _document_problems(obj: dict[str, Any]) -> list[str]:
    problems = _string_problems("apiVersion", obj.get("apiVersion"))
    problems += _string_problems("kind", obj.get("kind"))
    meta = obj.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        return [*problems, f"metadata must be a mapping, not {_describe(meta)}"]
    meta = meta or {}
    problems += _string_problems("metadata.name", meta.get("name"))
    if meta.get("namespace") is not None:
        problems += _string_problems("metadata.namespace", meta["namespace"])
    return problems


def parse_documents(text: str, source: str) -> list[Document]:
    """Every non-empty document of a multi-document YAML stream (``kind: List`` flattened); an
    empty list for a file with none (the command says "no objects passed to apply").

    Raises ManifestParseError naming the line and column of a YAML syntax error, the document,
    line and column of YAML a manifest may not use (see `_Loader`), or the document whose
    apiVersion, kind or metadata.name is missing or not a string.
    """
    raw = _load(text, source)
    docs: list[Document] = []
    for position, item in enumerate(raw, start=1):
        if item is None:
            continue
        if not isinstance(item, dict):
            raise ManifestParseError(
                f"error parsing {source}: document {position}: expected a mapping (an object"
                f" with apiVersion and kind), got {type(item).__name__}"
            )
        if item.get("kind") == "List" and isinstance(item.get("items"), list):
            for sub in item["items"]:
                if not isinstance(sub, dict):
                    raise ManifestParseError(
                        f"error parsing {source}: document {position}: List items must be objects"
                    )
                docs.append(Document(position, sub))
        else:
            docs.append(Document(position, item))
    for doc in docs:
        problems = _document_problems(doc.obj)
        if problems:
            raise ManifestParseError(
                f'error validating "{source}": document {doc.index}: ' + "; ".join(problems)
            )
    return docs


class Resolver(Protocol):
    async def resolve(self, api_version: str, kind: str) -> resources.ResourceType: ...


async def resolve_documents(
    client: Resolver, docs: list[Document], source: str, namespace: str | None
) -> list[Resolved]:
    """Map every document to its resource type (all of them before anything is applied).

    `namespace` is the ``-n`` flag: the default for namespaced objects that name none, and an
    error when an object names a different one (as kubectl does).
    """
    out: list[Resolved] = []
    for doc in docs:
        try:
            rtype = await client.resolve(doc.api_version, doc.kind)
        except kube_errors.UnknownKindError as exc:
            ns = doc.namespace or namespace or ""
            raise KindNotFoundError(
                f'resource mapping not found for name: "{doc.name}" namespace: "{ns}" from'
                f' "{source}": {exc}'
            ) from exc
        obj = dict(doc.obj)
        if rtype.namespaced:
            if namespace and doc.namespace and doc.namespace != namespace:
                raise errors.ManifestError(
                    f'the namespace from the provided object "{doc.namespace}" does not match the'
                    f" namespace \"{namespace}\". You must pass '--namespace={doc.namespace}' to"
                    " perform this operation."
                )
            meta = dict(obj.get("metadata") or {})
            meta["namespace"] = doc.namespace or namespace or "default"
            obj["metadata"] = meta
        out.append(Resolved(rtype, obj))
    return out


def format_server_error(exc: kube_errors.ApiError) -> str:
    return f"Error from server ({exc.reason}): {exc.message}"
