"""Traffic objects as xDS resources for waypoints (type `types.TRAFFIC`). Pure.

The controller sends each VirtualService, DestinationRule, HTTPRoute and Telemetry, and each
AuthorizationPolicy bound by targetRefs, as the API validated it, reduced to what a waypoint
translates (apiVersion, kind, metadata name/namespace/labels/annotations, spec); the waypoint
translates it with `meshcore.traffic` and `meshcore.policy`, the same code the controller's
validation is consistent with. The resource name is ``kind/namespace/name``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from google.protobuf import any_pb2

from meshcore.proto import traffic_pb2
from meshcore.xds import resources

KINDS = frozenset(
    {"VirtualService", "DestinationRule", "HTTPRoute", "AuthorizationPolicy", "Telemetry"}
)
_KEPT_METADATA = ("name", "namespace", "labels", "annotations")


def is_for_waypoints(obj: Mapping[str, Any]) -> bool:
    """A traffic kind; an AuthorizationPolicy only when bound by targetRefs (ztunnel gets the
    others as Authorization resources)."""
    kind = obj.get("kind")
    if kind not in KINDS:
        return False
    if kind != "AuthorizationPolicy":
        return True
    spec = obj.get("spec") or {}
    return bool(spec.get("targetRefs") or spec.get("targetRef"))


def resource_name(kind: str, namespace: str, name: str) -> str:
    return f"{kind}/{namespace}/{name}"


def traffic_resource(obj: Mapping[str, Any]) -> tuple[str, any_pb2.Any]:
    meta = obj.get("metadata") or {}
    kept = {
        "apiVersion": obj.get("apiVersion", ""),
        "kind": obj.get("kind", ""),
        "metadata": {k: meta[k] for k in _KEPT_METADATA if k in meta},
        "spec": obj.get("spec") or {},
    }
    message = traffic_pb2.TrafficObject(
        kind=kept["kind"],
        namespace=meta.get("namespace", ""),
        name=meta.get("name", ""),
        json=json.dumps(kept, sort_keys=True, separators=(",", ":")),
    )
    wrapped = any_pb2.Any()
    wrapped.Pack(message, type_url_prefix="type.googleapis.com/")
    return resource_name(message.kind, message.namespace, message.name), wrapped


def decode_traffic_object(name: str, resource: any_pb2.Any) -> dict[str, Any]:
    """The object a resource carries; `resources.ResourceError` naming the problem otherwise."""
    message = traffic_pb2.TrafficObject()
    if not resource.Unpack(message):
        raise resources.ResourceError(name, "type_url", f"not a TrafficObject: {resource.type_url}")
    if message.kind not in KINDS:
        raise resources.ResourceError(name, "kind", f"not a traffic kind: {message.kind!r}")
    try:
        obj = json.loads(message.json)
    except ValueError as exc:
        raise resources.ResourceError(name, "json", f"not JSON: {exc}") from exc
    if not isinstance(obj, dict) or obj.get("kind") != message.kind:
        raise resources.ResourceError(name, "json", "not an object of the kind named")
    return obj
