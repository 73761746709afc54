"""Manifests for ``meshctl apply -f`` / ``delete -f``: parse every document, resolve every kind,
and only then act, so that a typo in the last document applies nothing.

`parse_documents` is pure; `resolve_documents` asks the API server's discovery (through the
client's `resolve`) which resource serves each (apiVersion, kind).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any, Protocol

from meshcore.kube import errors as kube_errors
from meshcore.kube import resources, yamljson
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


def _load(text: str, source: str) -> list[Any]:
    """Every document of the stream (None for an empty one), as JSON data."""
    try:
        return yamljson.load_documents(text)
    except yamljson.YamlDocumentError as exc:
        where = f"document {exc.document}: " if exc.document is not None else "yaml: "
        raise ManifestParseError(f"error parsing {source}: {where}{exc.detail}") from exc


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return f"{json.dumps(yamljson.excerpt(value))} (a string)"
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
    line and column of YAML a manifest may not use (see `yamljson.Loader`), or the document whose
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
