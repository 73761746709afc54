"""Manifests for ``meshctl apply -f`` / ``delete -f``: parse every document, resolve every kind,
and only then act, so that a typo in the last document applies nothing.

`parse_documents` is pure; `resolve_documents` asks the API server's discovery (through the
client's `resolve`) which resource serves each (apiVersion, kind).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Protocol

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


class _Loader(yaml.SafeLoader):
    """Safe YAML whose dates stay strings, as in kubectl's YAML-to-JSON conversion (a date would
    not even be JSON)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _key_text(key: Any) -> Any:
    if isinstance(key, bool):
        return "true" if key else "false"
    if key is None:
        return "null"
    return str(key) if isinstance(key, int | float) else key


def stringify_keys(value: Any) -> Any:
    """JSON's string keys for YAML's number, boolean and null keys (``8080:`` is ``"8080"``, as
    kubectl converts them): a PeerAuthentication's `portLevelMtls` is keyed by port numbers, and
    a three-way apply compares the manifest with what the server stored."""
    if isinstance(value, dict):
        return {_key_text(k): stringify_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [stringify_keys(v) for v in value]
    return value


def parse_documents(text: str, source: str) -> list[Document]:
    """Every non-empty document of a multi-document YAML stream (``kind: List`` flattened).

    Raises ManifestParseError naming the line and column of a YAML syntax error, or the document
    that lacks apiVersion, kind or metadata.name.
    """
    try:
        raw = [stringify_keys(doc) for doc in yaml.load_all(text, Loader=_Loader)]
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = exc.problem or exc.context or "invalid YAML"
        raise ManifestParseError(f"error parsing {source}: yaml: {where}{problem}") from exc
    except yaml.YAMLError as exc:
        raise ManifestParseError(f"error parsing {source}: yaml: {exc}") from exc
    except RecursionError as exc:
        raise ManifestParseError(f"error parsing {source}: yaml: nested too deeply") from exc
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
        missing = [f for f in ("apiVersion", "kind") if not isinstance(doc.obj.get(f), str)]
        if not doc.name:
            missing.append("metadata.name")
        if missing:
            raise ManifestParseError(
                f'error validating "{source}": document {doc.index}: '
                + ", ".join(f"{m} not set" for m in missing)
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
