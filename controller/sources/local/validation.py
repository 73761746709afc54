"""Validation of API objects, Kubernetes style: every error, each with its field path.

A kind is described by a small schema (`Obj`, `ListOf`, `Str`, `Int`, ...). `validate()` walks an
object against it and returns all `FieldError`s: wrong types (with the expected type), unknown
fields, missing required fields, then the semantic checks of each node, which only run once
the node's own subtree is well-typed (so a check never sees a string where it expects a list).
`build_invalid_error` joins them the way the API server does:

    Pod "web" is invalid: spec.containers[0].command: Required value
    Pod "web" is invalid: [spec.containers[0].command: Required value, spec.nodeName: ...]

The Pod, Service, Namespace, Node and (apps/v1) Deployment schemas are here, Istio's security
kinds in `policyschemas`; other kinds get `GENERIC` (metadata is checked, the rest is
free-form) until they have a schema of their own.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from meshcore.kube import errors, selectors

REQUIRED = "Required value"
INVALID = "Invalid value"
UNSUPPORTED = "Unsupported value"
DUPLICATE = "Duplicate value"
UNKNOWN = "Unknown field"
FORBIDDEN = "Forbidden"

_CAUSE_REASONS = {
    REQUIRED: "FieldValueRequired",
    INVALID: "FieldValueInvalid",
    UNSUPPORTED: "FieldValueNotSupported",
    DUPLICATE: "FieldValueDuplicate",
    UNKNOWN: "FieldValueUnknown",
    FORBIDDEN: "FieldValueForbidden",
}
_MAX_SHOWN_VALUE = 80


def render_value(value: Any) -> str:
    """A value as an error message shows it: JSON, cut short."""
    try:
        text = json.dumps(value, sort_keys=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= _MAX_SHOWN_VALUE else text[: _MAX_SHOWN_VALUE - 3] + "..."


@dataclasses.dataclass(frozen=True, slots=True)
class FieldError:
    path: str
    type: str  # REQUIRED | INVALID | UNSUPPORTED | DUPLICATE | UNKNOWN | FORBIDDEN
    value: str | None = None  # already rendered; None when the message shows no value
    detail: str = ""

    def __str__(self) -> str:
        parts = [self.path or "<root>", self.type]
        if self.value is not None:
            parts.append(self.value)
        if self.detail:
            parts.append(self.detail)
        return ": ".join(parts)


def required(path: str, detail: str = "") -> FieldError:
    return FieldError(path, REQUIRED, None, detail)


def invalid(path: str, value: Any, detail: str) -> FieldError:
    return FieldError(path, INVALID, render_value(value), detail)


def unsupported(path: str, value: Any, supported: Sequence[str]) -> FieldError:
    shown = ", ".join(json.dumps(s) for s in supported)
    return FieldError(path, UNSUPPORTED, render_value(value), f"supported values: {shown}")


def duplicate(path: str, value: Any) -> FieldError:
    return FieldError(path, DUPLICATE, render_value(value))


def unknown(path: str) -> FieldError:
    return FieldError(path, UNKNOWN)


def forbidden(path: str, detail: str) -> FieldError:
    return FieldError(path, FORBIDDEN, None, detail)


def _type_error(path: str, value: Any, expected: str) -> FieldError:
    return invalid(path, value, f"must be of type {expected}")


def child(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def item(path: str, index: int) -> str:
    return f"{path}[{index}]"


def build_invalid_error(
    kind: str, name: str, field_errors: Sequence[FieldError]
) -> errors.ApiError:
    """The 422 Invalid Status the API server answers for `field_errors`."""
    texts = [str(e) for e in field_errors]
    joined = texts[0] if len(texts) == 1 else "[" + ", ".join(texts) + "]"
    causes = [
        {
            "reason": _CAUSE_REASONS.get(e.type, "FieldValueInvalid"),
            "message": str(e),
            "field": e.path,
        }
        for e in field_errors
    ]
    return errors.InvalidError(
        f'{kind} "{name}" is invalid: {joined}',
        details={"name": name, "kind": kind, "causes": causes},
    )


# -- rules on strings: each returns None when the value is fine, else the detail ------------

Rule = Callable[[str], str | None]

_DNS_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_IANA_SVC_RE = re.compile(r"^[-a-z0-9]+$")
_ENV_NAME_RE = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")


def dns_label(value: str) -> str | None:
    if len(value) > 63:
        return "must be no more than 63 characters"
    if not _DNS_LABEL_RE.match(value):
        return (
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or "
            "'-', and must start and end with an alphanumeric character (e.g. 'my-name', or "
            "'123-abc')"
        )
    return None


def dns_subdomain(value: str) -> str | None:
    if len(value) > 253:
        return "must be no more than 253 characters"
    if not _DNS_SUBDOMAIN_RE.match(value):
        return (
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, "
            "'-' or '.', and must start and end with an alphanumeric character (e.g. "
            "'example.com')"
        )
    return None


def iana_svc_name(value: str) -> str | None:
    if len(value) > 15:
        return "must be no more than 15 characters"
    if not _IANA_SVC_RE.match(value):
        return "must contain only alphanumeric characters (a-z, 0-9), and hyphens (-)"
    if "--" in value:
        return "must not contain consecutive hyphens"
    if not re.search(r"[a-z]", value):
        return "must contain at least one letter (a-z)"
    if value.startswith("-") or value.endswith("-"):
        return "must not begin or end with a hyphen"
    return None


def env_var_name(value: str) -> str | None:
    if not _ENV_NAME_RE.match(value):
        return (
            "a valid environment variable name must consist of alphabetic characters, digits, "
            "'_', '-', or '.', and must not start with a digit"
        )
    return None


def label_key(value: str) -> str | None:
    if selectors.is_label_key(value):
        return None
    prefix, slash, name = value.rpartition("/")
    if slash and (not prefix or dns_subdomain(prefix)):
        return "prefix part must be a lowercase RFC 1123 subdomain"
    if len(name) > 63:
        return "name part must be no more than 63 characters"
    return (
        "name part must consist of alphanumeric characters, '-', '_' or '.', and must start "
        "and end with an alphanumeric character (e.g. 'MyName', or 'my.name', or '123-abc')"
    )


def label_value(value: str) -> str | None:
    if selectors.is_label_value(value):
        return None
    if len(value) > 63:
        return "must be no more than 63 characters"
    return (
        "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' "
        "or '.', and must start and end with an alphanumeric character"
    )


def ip_address(value: str) -> str | None:
    if value == "":
        return None
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)"
    return None


def cluster_ip(value: str) -> str | None:
    """ "" (allocate one), "None" (headless) or an address."""
    return None if value == "None" else ip_address(value)


def optional(rule: Rule) -> Rule:
    """`rule`, but "" is fine too (an unset value, as for `spec.nodeName`)."""

    def check(value: str) -> str | None:
        return None if value == "" else rule(value)

    return check


def cidr(value: str) -> str | None:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return "must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)"
    return None


_POD_FIELD_PATHS = (
    "metadata.name",
    "metadata.namespace",
    "metadata.uid",
    "spec.nodeName",
    "spec.serviceAccountName",
    "status.hostIP",
    "status.podIP",
    "status.podIPs",
)
_ANNOTATED_FIELD_RE = re.compile(r"^metadata\.(labels|annotations)\['(?P<key>[^']+)'\]$")


def pod_field_path(value: str) -> str | None:
    """What `env[].valueFrom.fieldRef.fieldPath` may name (the downward API)."""
    if value in _POD_FIELD_PATHS:
        return None
    if (m := _ANNOTATED_FIELD_RE.match(value)) and label_key(m["key"]) is None:
        return None
    supported = ", ".join(json.dumps(p) for p in _POD_FIELD_PATHS)
    return (
        f"supported values: {supported}, \"metadata.labels['<key>']\", "
        "\"metadata.annotations['<key>']\""
    )


# -- the schema nodes ---------------------------------------------------------------------


class Schema(Protocol):
    def check(self, value: Any, path: str) -> list[FieldError]: ...


Check = Callable[[Any, str], list[FieldError]]


@dataclasses.dataclass(frozen=True, slots=True)
class Str:
    rule: Rule | None = None
    enum: tuple[str, ...] = ()
    non_empty: bool = False  # "" is a missing value (Required), as for names

    def check(self, value: Any, path: str) -> list[FieldError]:
        if not isinstance(value, str):
            return [_type_error(path, value, "string")]
        if self.non_empty and not value:
            return [required(path)]
        if self.enum and value not in self.enum:
            return [unsupported(path, value, self.enum)]
        if self.rule is not None and (detail := self.rule(value)) is not None:
            return [invalid(path, value, detail)]
        return []


@dataclasses.dataclass(frozen=True, slots=True)
class Int:
    minimum: int | None = None
    maximum: int | None = None

    def check(self, value: Any, path: str) -> list[FieldError]:
        # bool is an int in Python but not in JSON.
        if not isinstance(value, int) or isinstance(value, bool):
            return [_type_error(path, value, "integer")]
        if self.minimum is not None and value < self.minimum:
            return [invalid(path, value, self._range())]
        if self.maximum is not None and value > self.maximum:
            return [invalid(path, value, self._range())]
        return []

    def _range(self) -> str:
        if self.maximum is None:
            return f"must be greater than or equal to {self.minimum}"
        if self.minimum is None:
            return f"must be less than or equal to {self.maximum}"
        return f"must be between {self.minimum} and {self.maximum}, inclusive"


@dataclasses.dataclass(frozen=True, slots=True)
class Bool:
    def check(self, value: Any, path: str) -> list[FieldError]:
        return [] if isinstance(value, bool) else [_type_error(path, value, "boolean")]


@dataclasses.dataclass(frozen=True, slots=True)
class AnyObject:
    """A JSON object whose content this server does not interpret."""

    def check(self, value: Any, path: str) -> list[FieldError]:
        return [] if isinstance(value, dict) else [_type_error(path, value, "object")]


@dataclasses.dataclass(frozen=True, slots=True)
class IntOrStr:
    """Kubernetes IntOrString: a number, or a string such as a port name."""

    as_int: Int
    as_str: Str

    def check(self, value: Any, path: str) -> list[FieldError]:
        if isinstance(value, str):
            return self.as_str.check(value, path)
        if isinstance(value, int) and not isinstance(value, bool):
            return self.as_int.check(value, path)
        return [_type_error(path, value, "integer or string")]


@dataclasses.dataclass(frozen=True, slots=True)
class StrMap:
    """A map of strings (labels, annotations, selectors); key errors name the map's path."""

    key_rule: Rule | None = None
    value_rule: Rule | None = None
    max_total_bytes: int | None = None

    def check(self, value: Any, path: str) -> list[FieldError]:
        if not isinstance(value, dict):
            return [_type_error(path, value, "object")]
        found = []
        for k, v in value.items():
            if not isinstance(k, str):
                found.append(_type_error(path, k, "string (as a key)"))
                continue
            if self.key_rule is not None and (detail := self.key_rule(k)) is not None:
                found.append(invalid(path, k, detail))
            if not isinstance(v, str):
                found.append(_type_error(f"{path}[{k}]", v, "string"))
            elif self.value_rule is not None and (detail := self.value_rule(v)) is not None:
                found.append(invalid(path, v, detail))
        if not found and self.max_total_bytes is not None:
            size = sum(len(k.encode()) + len(v.encode()) for k, v in value.items())
            if size > self.max_total_bytes:
                found.append(
                    FieldError(
                        path, "Too long", None, f"must have at most {self.max_total_bytes} bytes"
                    )
                )
        return found


@dataclasses.dataclass(frozen=True, slots=True)
class MapOf:
    """A JSON object used as a map: keys checked by `key_rule` (errors name the map's path, as
    for labels), each value by `value` at ``path[key]``."""

    value: Schema
    key_rule: Rule | None = None
    non_empty: bool = False  # {} is a missing value (Required)

    def check(self, value: Any, path: str) -> list[FieldError]:
        if not isinstance(value, dict):
            return [_type_error(path, value, "object")]
        if self.non_empty and not value:
            return [required(path)]
        found = []
        for k, v in value.items():
            if self.key_rule is not None and (detail := self.key_rule(k)) is not None:
                found.append(invalid(path, k, detail))
            found.extend(self.value.check(v, f"{path}[{k}]"))
        return found


@dataclasses.dataclass(frozen=True, slots=True)
class ListOf:
    item: Schema
    non_empty: bool = False  # [] is a missing value (Required)
    check_list: Check | None = None

    def check(self, value: Any, path: str) -> list[FieldError]:
        if not isinstance(value, list):
            return [_type_error(path, value, "array")]
        if self.non_empty and not value:
            return [required(path)]
        found = []
        for i, entry in enumerate(value):
            found.extend(self.item.check(entry, item(path, i)))
        if not found and self.check_list is not None:
            found.extend(self.check_list(value, path))
        return found


@dataclasses.dataclass(frozen=True, slots=True)
class Obj:
    fields: Mapping[str, Schema]
    required: frozenset[str] = frozenset()
    check_obj: Check | None = None
    open: bool = False  # fields outside `fields` are allowed and left unchecked

    def check(self, value: Any, path: str) -> list[FieldError]:
        if not isinstance(value, dict):
            return [_type_error(path, value, "object")]
        found = []
        for name, entry in value.items():
            schema = self.fields.get(name)
            if schema is None:
                if not self.open:
                    found.append(unknown(child(path, str(name))))
                continue
            found.extend(schema.check(entry, child(path, name)))
        for name in sorted(self.required - value.keys()):
            found.append(required(child(path, name)))
        if not found and self.check_obj is not None:
            found.extend(self.check_obj(value, path))
        return found


def validate(schema: Schema, obj: Any) -> list[FieldError]:
    return schema.check(obj, "")


# -- metadata (every kind) -----------------------------------------------------------------

MAX_ANNOTATION_BYTES = 256 * 1024
# A grace period becomes a timestamp; a year keeps it far from datetime's limits.
MAX_GRACE_PERIOD_SECONDS = 365 * 24 * 3600


def _check_owner_references(refs: list[dict[str, Any]], path: str) -> list[FieldError]:
    controllers = [r for r in refs if r.get("controller") is True]
    if len(controllers) > 1:
        names = ", ".join(f"{r['kind']}/{r['name']}" for r in controllers)
        return [
            invalid(
                path,
                [r["name"] for r in controllers],
                f'Only one reference can have Controller set to true. Found "true" in '
                f"references for {names}",
            )
        ]
    return []


OWNER_REFERENCE = Obj(
    {
        "apiVersion": Str(non_empty=True),
        "kind": Str(non_empty=True),
        "name": Str(non_empty=True),
        "uid": Str(non_empty=True),
        "controller": Bool(),
        "blockOwnerDeletion": Bool(),
    },
    required=frozenset({"apiVersion", "kind", "name", "uid"}),
)


def build_metadata(name_rule: Rule) -> Obj:
    return Obj(
        {
            "name": Str(name_rule, non_empty=True),
            "generateName": Str(),
            "namespace": Str(dns_label, non_empty=True),
            "labels": StrMap(label_key, label_value),
            "annotations": StrMap(label_key, None, MAX_ANNOTATION_BYTES),
            "uid": Str(),
            "resourceVersion": Str(),
            "creationTimestamp": Str(),
            "deletionTimestamp": Str(),
            "deletionGracePeriodSeconds": Int(0, MAX_GRACE_PERIOD_SECONDS),
            "generation": Int(0),
            "ownerReferences": ListOf(OWNER_REFERENCE, check_list=_check_owner_references),
        },
        required=frozenset({"name"}),
    )


def build_object(name_rule: Rule, spec: Schema | None, status: Schema | None) -> Obj:
    """A kind's whole schema; with no spec schema, everything but metadata is free-form."""
    fields: dict[str, Schema] = {
        "apiVersion": Str(),
        "kind": Str(),
        "metadata": build_metadata(name_rule),
    }
    if spec is not None:
        fields["spec"] = spec
    if status is not None:
        fields["status"] = status
    return Obj(
        fields,
        required=frozenset({"metadata"} | ({"spec"} if spec is not None else set())),
        open=spec is None and status is None,
    )


GENERIC = build_object(dns_subdomain, None, None)

CONDITION = Obj(
    {
        "type": Str(non_empty=True),
        "status": Str(enum=("True", "False", "Unknown")),
        "reason": Str(),
        "message": Str(),
        "lastTransitionTime": Str(),
        "lastProbeTime": Str(),
        "lastHeartbeatTime": Str(),
        "observedGeneration": Int(0),
    },
    required=frozenset({"type", "status"}),
)
_IP_ENTRY = Obj({"ip": Str(ip_address, non_empty=True)}, required=frozenset({"ip"}))


# -- Pod -----------------------------------------------------------------------------------


def _check_env_var(value: dict[str, Any], path: str) -> list[FieldError]:
    if value.get("value") and "valueFrom" in value:
        return [
            invalid(child(path, "valueFrom"), "", "may not be specified when `value` is not empty")
        ]
    return []


CONTAINER_PORT = Obj(
    {
        "containerPort": Int(1, 65535),
        "name": Str(iana_svc_name, non_empty=True),
        "protocol": Str(enum=("TCP", "UDP")),
    },
    required=frozenset({"containerPort"}),
)
ENV_VAR = Obj(
    {
        "name": Str(env_var_name, non_empty=True),
        "value": Str(),
        "valueFrom": Obj(
            {
                "fieldRef": Obj(
                    {
                        "fieldPath": Str(pod_field_path, non_empty=True),
                        "apiVersion": Str(enum=("v1",)),
                    },
                    required=frozenset({"fieldPath"}),
                )
            },
            required=frozenset({"fieldRef"}),
        ),
    },
    required=frozenset({"name"}),
    check_obj=_check_env_var,
)


def _check_one_handler(handler: dict[str, Any], path: str) -> list[FieldError]:
    if len(handler) != 1:
        return [required(path, "must specify exactly one handler type (exec or sleep)")]
    return []


# A preStop hook runs before the container gets SIGTERM, inside the grace period.
LIFECYCLE_HANDLER = Obj(
    {
        "exec": Obj({"command": ListOf(Str(), non_empty=True)}, required=frozenset({"command"})),
        "sleep": Obj(
            {"seconds": Int(0, MAX_GRACE_PERIOD_SECONDS)}, required=frozenset({"seconds"})
        ),
    },
    check_obj=_check_one_handler,
)
LIFECYCLE = Obj({"preStop": LIFECYCLE_HANDLER})

CONTAINER = Obj(
    {
        "name": Str(dns_label, non_empty=True),
        # In the playground a container is its command: the image is not pulled or run.
        "image": Str(),
        "imagePullPolicy": Str(enum=("Always", "IfNotPresent", "Never")),
        "command": ListOf(Str(), non_empty=True),
        "args": ListOf(Str()),
        "workingDir": Str(),
        "ports": ListOf(CONTAINER_PORT),
        "env": ListOf(ENV_VAR),
        "lifecycle": LIFECYCLE,
    },
    required=frozenset({"name", "command"}),
)


def _check_containers(containers: list[dict[str, Any]], path: str) -> list[FieldError]:
    found = []
    names: set[str] = set()
    port_names: set[str] = set()
    for i, container in enumerate(containers):
        name = container["name"]
        if name in names:
            found.append(duplicate(child(item(path, i), "name"), name))
        names.add(name)
        for j, port in enumerate(container.get("ports", [])):
            port_name = port.get("name")
            if port_name is None:
                continue
            if port_name in port_names:
                found.append(
                    duplicate(child(item(child(item(path, i), "ports"), j), "name"), port_name)
                )
            port_names.add(port_name)
    return found


POD_SPEC = Obj(
    {
        "containers": ListOf(CONTAINER, non_empty=True, check_list=_check_containers),
        "nodeName": Str(optional(dns_subdomain)),
        "serviceAccountName": Str(dns_subdomain, non_empty=True),
        "terminationGracePeriodSeconds": Int(0, MAX_GRACE_PERIOD_SECONDS),
        "restartPolicy": Str(enum=("Always", "OnFailure", "Never")),
        "hostname": Str(dns_label, non_empty=True),
        "subdomain": Str(dns_label, non_empty=True),
        "nodeSelector": StrMap(label_key, label_value),
    },
    required=frozenset({"containers"}),
)
POD_STATUS = Obj(
    {
        "phase": Str(enum=("Pending", "Running", "Succeeded", "Failed", "Unknown")),
        "conditions": ListOf(CONDITION),
        "message": Str(),
        "reason": Str(),
        "hostIP": Str(ip_address),
        "hostIPs": ListOf(_IP_ENTRY),
        "podIP": Str(ip_address),
        "podIPs": ListOf(_IP_ENTRY),
        "startTime": Str(),
        "containerStatuses": ListOf(AnyObject()),
        "qosClass": Str(),
        "nominatedNodeName": Str(),
    }
)
POD = build_object(dns_subdomain, POD_SPEC, POD_STATUS)


# -- Service -------------------------------------------------------------------------------

SERVICE_PORT = Obj(
    {
        "name": Str(dns_label),
        "port": Int(1, 65535),
        "targetPort": IntOrStr(Int(1, 65535), Str(iana_svc_name, non_empty=True)),
        "protocol": Str(enum=("TCP", "UDP")),
        "appProtocol": Str(),
    },
    required=frozenset({"port"}),
)


def _check_service_spec(spec: dict[str, Any], path: str) -> list[FieldError]:
    found = []
    ports: list[dict[str, Any]] = spec.get("ports", [])
    ports_path = child(path, "ports")
    if not ports and spec.get("clusterIP") != "None":
        found.append(required(ports_path))
    names: set[str] = set()
    pairs: set[tuple[int, str]] = set()
    for i, port in enumerate(ports):
        name = port.get("name", "")
        if len(ports) > 1 and not name:
            found.append(required(child(item(ports_path, i), "name")))
        elif name and name in names:
            found.append(duplicate(child(item(ports_path, i), "name"), name))
        names.add(name)
        pair = (port["port"], port.get("protocol", "TCP"))
        if pair in pairs:
            found.append(duplicate(item(ports_path, i), {"port": pair[0], "protocol": pair[1]}))
        pairs.add(pair)
    ips = spec.get("clusterIPs")
    if ips is not None:
        if len(ips) > 1:
            found.append(invalid(child(path, "clusterIPs"), ips, "may hold at most one address"))
        elif ips and "clusterIP" in spec and spec["clusterIP"] not in ("", ips[0]):
            found.append(
                invalid(child(path, "clusterIPs"), ips, "must hold the same address as clusterIP")
            )
    return found


SERVICE_SPEC = Obj(
    {
        "ports": ListOf(SERVICE_PORT),
        "selector": StrMap(label_key, label_value),
        "clusterIP": Str(cluster_ip),
        "clusterIPs": ListOf(Str(cluster_ip, non_empty=True)),
        "type": Str(enum=("ClusterIP",)),
        "sessionAffinity": Str(enum=("None", "ClientIP")),
        "publishNotReadyAddresses": Bool(),
        "ipFamilies": ListOf(Str(enum=("IPv4",))),
        "ipFamilyPolicy": Str(enum=("SingleStack",)),
        "internalTrafficPolicy": Str(enum=("Cluster", "Local")),
    },
    check_obj=_check_service_spec,
)
SERVICE_STATUS = Obj({"loadBalancer": AnyObject(), "conditions": ListOf(CONDITION)})
SERVICE = build_object(dns_label, SERVICE_SPEC, SERVICE_STATUS)


# -- Namespace, Node -----------------------------------------------------------------------

NAMESPACE = build_object(
    dns_label,
    Obj({"finalizers": ListOf(Str())}),
    Obj({"phase": Str(enum=("Active", "Terminating")), "conditions": ListOf(AnyObject())}),
)
NAMESPACE = dataclasses.replace(NAMESPACE, required=frozenset({"metadata"}))

NODE = build_object(
    dns_subdomain,
    Obj(
        {
            "podCIDR": Str(cidr),
            "podCIDRs": ListOf(Str(cidr)),
            "unschedulable": Bool(),
            "providerID": Str(),
            "taints": ListOf(AnyObject()),
        }
    ),
    Obj(
        {
            "conditions": ListOf(CONDITION),
            "addresses": ListOf(
                Obj(
                    {"type": Str(non_empty=True), "address": Str(non_empty=True)},
                    required=frozenset({"type", "address"}),
                )
            ),
            "capacity": AnyObject(),
            "allocatable": AnyObject(),
            "nodeInfo": AnyObject(),
            "daemonEndpoints": AnyObject(),
            "phase": Str(),
        }
    ),
)
NODE = dataclasses.replace(NODE, required=frozenset({"metadata"}))


# -- Deployment (apps/v1) ------------------------------------------------------------------

# What a Deployment's pods may be: a Deployment exists to keep its pods running.
DEPLOYMENT_RESTART_POLICIES = ("Always",)


def _check_deployment_spec(spec: dict[str, Any], path: str) -> list[FieldError]:
    """The selector must pick the template's own pods, as the API server insists."""
    found = []
    selector_path = child(child(path, "selector"), "matchLabels")
    match_labels: dict[str, str] = spec["selector"].get("matchLabels") or {}
    if not match_labels:
        found.append(required(selector_path, "a Deployment needs a non-empty selector"))
    template = spec["template"]
    template_meta = template.get("metadata") or {}
    template_labels: dict[str, str] = template_meta.get("labels") or {}
    if match_labels and any(template_labels.get(k) != v for k, v in match_labels.items()):
        found.append(
            invalid(
                child(child(child(path, "template"), "metadata"), "labels"),
                template_labels,
                "`selector` does not match template `labels`",
            )
        )
    policy = template["spec"].get("restartPolicy")
    if policy is not None and policy not in DEPLOYMENT_RESTART_POLICIES:
        found.append(
            unsupported(
                child(child(child(path, "template"), "spec"), "restartPolicy"),
                policy,
                DEPLOYMENT_RESTART_POLICIES,
            )
        )
    return found


LABEL_SELECTOR = Obj({"matchLabels": StrMap(label_key, label_value)})
POD_TEMPLATE = Obj(
    {
        "metadata": Obj(
            {
                "labels": StrMap(label_key, label_value),
                "annotations": StrMap(label_key, None, MAX_ANNOTATION_BYTES),
            }
        ),
        "spec": POD_SPEC,
    },
    required=frozenset({"spec"}),
)
DEPLOYMENT_SPEC = Obj(
    {
        "replicas": Int(0),
        "selector": LABEL_SELECTOR,
        "template": POD_TEMPLATE,
    },
    required=frozenset({"selector", "template"}),
    check_obj=_check_deployment_spec,
)
DEPLOYMENT_STATUS = Obj(
    {
        "observedGeneration": Int(0),
        "replicas": Int(0),
        "updatedReplicas": Int(0),
        "readyReplicas": Int(0),
        "availableReplicas": Int(0),
        "unavailableReplicas": Int(0),
        "collisionCount": Int(0),
        "conditions": ListOf(CONDITION),
    }
)
DEPLOYMENT = build_object(dns_subdomain, DEPLOYMENT_SPEC, DEPLOYMENT_STATUS)
