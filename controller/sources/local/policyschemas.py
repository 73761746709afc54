"""Schemas of Istio's security kinds (security.istio.io v1, the same in v1beta1):
AuthorizationPolicy and PeerAuthentication.

Strict, as a CRD's structural schema plus Istio's validating webhook would be together: unknown
fields and wrong types are errors naming their field path (``spec.rules[0].to[0].operation.
ports[0]: Invalid value: 7000: must be of type string``: Istio's ports are strings), then the
semantic checks of Istio's `ValidateAuthorizationPolicy` / `ValidatePeerAuthentication`, each
also pinned to the field it is about. The whole object is rejected on any error; nothing is
applied in part.

One rule is this mesh's own: AUDIT and CUSTOM are valid actions in Istio's schema, but ztunnel
enforces only ALLOW and DENY, so a policy for ztunnel (no targetRefs) with either is rejected
with istiod's ztunnel wording ("ztunnel does not support the AUDIT action") rather than stored
and silently ignored (`meshcore.policy.analysis.find_action_error` decides).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from typing import Any

from controller.sources.local import schemas, validation
from meshcore import digits
from meshcore.policy import analysis
from meshcore.policy import errors as policy_errors

ACTIONS = ("ALLOW", "DENY", "AUDIT", "CUSTOM")
MTLS_MODES = ("UNSET", "DISABLE", "PERMISSIVE", "STRICT")
# What a targetRef may name (group "" is the core group), from Istio's allowedTargetRefs.
TARGET_KINDS = (
    ("", "Service"),
    ("networking.istio.io", "ServiceEntry"),
    ("gateway.networking.k8s.io", "Gateway"),
    ("gateway.networking.k8s.io", "GatewayClass"),
)
MAX_SERVICE_ACCOUNTS = 16  # Istio's limit per list
MAX_SERVICE_ACCOUNT_LENGTH = 320
_MAX_PORT = 65535
_PREFIX_RE = re.compile(r"^[0-9]{1,3}$")
_PATH_LITERAL_RE = re.compile(r"^[a-zA-Z0-9-._~%!$&'()+,;:@=]+$")
_MATCH_ONE, _MATCH_ANY = "{*}", "{**}"


# -- rules on strings (None: fine, else the detail) -----------------------------------------


def ip_or_cidr(value: str) -> str | None:
    """An address or a CIDR range (``10.1.2.3``, ``10.1.0.0/16``), as Istio's ipBlocks."""
    address, slash, prefix = value.partition("/")
    try:
        if "%" in value:
            raise ValueError(value)  # no IPv6 zones: they name a local interface, not a peer
        if slash:
            if not _PREFIX_RE.match(prefix):
                raise ValueError(prefix)
            ipaddress.ip_network(value, strict=False)
        else:
            ipaddress.ip_address(address)
    except ValueError:
        return "must be an IP address or a CIDR range (e.g. 10.1.2.3 or 10.1.0.0/16)"
    return None


def port_number(value: str) -> str | None:
    """A port as Istio writes it in a policy: a string of digits, 0-65535."""
    significant = value.lstrip("0") or "0"
    if not digits.is_digits(value) or len(significant) > 5 or int(significant) > _MAX_PORT:
        return "must be a port number between 0 and 65535, written as a string of digits"
    return None


def port_key(value: str) -> str | None:
    """A key of `portLevelMtls`: a port number, 1-65535."""
    if port_number(value) is not None or int(value) == 0:
        return "must be a port number between 1 and 65535"
    return None


def service_account(value: str) -> str | None:
    """``serviceAccount`` or ``namespace/serviceAccount``, no wildcards (Istio's check)."""
    if "*" in value:
        return "wildcards are not allowed in serviceAccounts"
    if len(value) > MAX_SERVICE_ACCOUNT_LENGTH:
        return f"must be no more than {MAX_SERVICE_ACCOUNT_LENGTH} characters"
    parts = value.split("/")
    if len(parts) > 2 or not all(parts):
        return "expected format 'serviceAccount' or 'namespace/serviceAccount'"
    return None


def path_template(value: str) -> str | None:
    """Istio's CheckValidPathTemplate: ``{*}`` matches one segment, ``{**}`` the rest (last)."""
    has_template = _MATCH_ONE in value or _MATCH_ANY in value
    seen_any = False
    for glob in value.strip("/").split("/"):
        if glob in (_MATCH_ONE, _MATCH_ANY):
            if seen_any:
                return "{**} must be the last operator of a path template"
            seen_any = glob == _MATCH_ANY
            continue
        if "{" in glob or "}" in glob:
            return "contains '{' or '}' beyond a supported path template ({*} or {**})"
        if has_template and not _PATH_LITERAL_RE.match(glob):
            return f"segment {glob!r} of a path template is not a valid literal"
    return None


def _map_key(value: str) -> str | None:
    opening = value.find("[")
    if value.endswith("]") and 0 < opening < len(value) - 2:
        return None
    return "should have the format a[b]"


# Istio's ValidateAttribute: which `when` keys exist, and the rule their values follow.
_WHEN_EXACT: dict[str, validation.Rule | None] = {
    "source.ip": ip_or_cidr,
    "remote.ip": ip_or_cidr,
    "source.namespace": None,
    "source.serviceAccount": service_account,
    "source.principal": None,
    "request.auth.principal": None,
    "request.auth.audiences": None,
    "request.auth.presenter": None,
    "destination.ip": ip_or_cidr,
    "destination.port": port_number,
    "connection.sni": None,
}
_WHEN_MAPS = (
    "request.headers",
    "request.experimental.inline.headers",
    "request.auth.claims",
    "experimental.envoy.filters.",
)
_WHEN_REPLACED = {
    "destination.namespace": "is replaced by the metadata.namespace of the policy",
    "destination.name": "is deprecated: only supported in v1alpha1",
    "destination.user": "is deprecated: only supported in v1alpha1",
}


def _when_key(key: str) -> tuple[str | None, validation.Rule | None]:
    """(what is wrong with `key`, the rule for its values)."""
    if key in _WHEN_EXACT:
        return None, _WHEN_EXACT[key]
    if key.startswith(_WHEN_MAPS):
        return _map_key(key), None
    if key.startswith("destination.labels"):
        return "is replaced by the workload selector of the policy", None
    if key in _WHEN_REPLACED:
        return _WHEN_REPLACED[key], None
    return "unknown attribute", None


# -- AuthorizationPolicy -------------------------------------------------------------------

_VALUES = validation.ListOf(validation.Str(non_empty=True))  # Istio: "empty value not allowed"
_IP_BLOCKS = validation.ListOf(validation.Str(ip_or_cidr, non_empty=True))
_PORTS = validation.ListOf(validation.Str(port_number, non_empty=True))
_SERVICE_ACCOUNTS = validation.ListOf(
    validation.Str(service_account, non_empty=True),
    check_list=lambda values, path: (
        [validation.invalid(path, len(values), f"may hold at most {MAX_SERVICE_ACCOUNTS} values")]
        if len(values) > MAX_SERVICE_ACCOUNTS
        else []
    ),
)
_PATHS = validation.ListOf(validation.Str(path_template, non_empty=True))

WORKLOAD_SELECTOR = validation.Obj(
    {"matchLabels": validation.StrMap(validation.label_key, validation.label_value)}
)


def _check_target_ref(ref: dict[str, Any], path: str) -> list[validation.FieldError]:
    pair = (ref.get("group", ""), ref["kind"])
    if pair in TARGET_KINDS:
        return []
    supported = [f"{g}/{k}" if g else k for g, k in TARGET_KINDS]
    shown = f"{pair[0]}/{pair[1]}" if pair[0] else pair[1]
    return [validation.unsupported(validation.child(path, "kind"), shown, supported)]


TARGET_REF = validation.Obj(
    {
        "group": validation.Str(),
        "kind": validation.Str(non_empty=True),
        "name": validation.Str(validation.dns_subdomain, non_empty=True),
        "namespace": validation.Str(validation.dns_label, non_empty=True),
    },
    required=frozenset({"kind", "name"}),
    check_obj=_check_target_ref,
)

_SOURCE_FIELDS: dict[str, validation.Schema] = {
    "principals": _VALUES,
    "notPrincipals": _VALUES,
    "requestPrincipals": _VALUES,
    "notRequestPrincipals": _VALUES,
    "namespaces": _VALUES,
    "notNamespaces": _VALUES,
    "ipBlocks": _IP_BLOCKS,
    "notIpBlocks": _IP_BLOCKS,
    "remoteIpBlocks": _IP_BLOCKS,
    "notRemoteIpBlocks": _IP_BLOCKS,
    "serviceAccounts": _SERVICE_ACCOUNTS,
    "notServiceAccounts": _SERVICE_ACCOUNTS,
}
_IDENTITY_FIELDS = ("principals", "notPrincipals", "namespaces", "notNamespaces")
_ACCOUNT_FIELDS = ("serviceAccounts", "notServiceAccounts")


def _check_source(source: dict[str, Any], path: str) -> list[validation.FieldError]:
    if not any(source.values()):
        return [validation.required(path, "a source must set at least one field")]
    accounts = [f for f in _ACCOUNT_FIELDS if source.get(f)]
    if accounts and any(source.get(f) for f in _IDENTITY_FIELDS):
        return [
            validation.forbidden(
                validation.child(path, accounts[0]),
                "may not be set together with principals or namespaces",
            )
        ]
    return []


SOURCE = validation.Obj(_SOURCE_FIELDS, check_obj=_check_source)

_OPERATION_FIELDS: dict[str, validation.Schema] = {
    "hosts": _VALUES,
    "notHosts": _VALUES,
    "ports": _PORTS,
    "notPorts": _PORTS,
    "methods": _VALUES,
    "notMethods": _VALUES,
    "paths": _PATHS,
    "notPaths": _PATHS,
}


def _check_operation(operation: dict[str, Any], path: str) -> list[validation.FieldError]:
    if not any(operation.values()):
        return [validation.required(path, "an operation must set at least one field")]
    return []


OPERATION = validation.Obj(_OPERATION_FIELDS, check_obj=_check_operation)


def _check_when(condition: dict[str, Any], path: str) -> list[validation.FieldError]:
    key = condition["key"]
    problem, rule = _when_key(key)
    if problem is not None:
        return [validation.invalid(validation.child(path, "key"), key, problem)]
    if not condition.get("values") and not condition.get("notValues"):
        return [
            validation.required(validation.child(path, "values"), "values or notValues must be set")
        ]
    found = []
    for field in ("values", "notValues"):
        for i, value in enumerate(condition.get(field) or ()):
            if rule is not None and (detail := rule(value)) is not None:
                found.append(
                    validation.invalid(
                        validation.item(validation.child(path, field), i), value, detail
                    )
                )
    return found


WHEN = validation.Obj(
    {"key": validation.Str(non_empty=True), "values": _VALUES, "notValues": _VALUES},
    required=frozenset({"key"}),
    check_obj=_check_when,
)
RULE = validation.Obj(
    {
        "from": validation.ListOf(
            validation.Obj({"source": SOURCE}, required=frozenset({"source"})), non_empty=True
        ),
        "to": validation.ListOf(
            validation.Obj({"operation": OPERATION}, required=frozenset({"operation"})),
            non_empty=True,
        ),
        "when": validation.ListOf(WHEN),
    }
)

_BINDINGS = ("selector", "targetRef", "targetRefs")


def _find_action_error(spec: dict[str, Any], path: str) -> validation.FieldError | None:
    """AUDIT and CUSTOM, which ztunnel lacks, in istiod's words (a policy with targetRefs is
    a waypoint's, not ztunnel's, and may use them)."""
    action = spec.get("action", "ALLOW")
    try:
        message = analysis.find_action_error({"spec": spec})
    except policy_errors.PolicyError as exc:
        return validation.FieldError(exc.field or path, validation.INVALID, None, exc.reason)
    if message is None:
        return None
    return validation.FieldError(
        validation.child(path, "action"),
        validation.UNSUPPORTED,
        validation.render_value(action),
        message,
    )


def _check_authorization_policy_spec(
    spec: dict[str, Any], path: str
) -> list[validation.FieldError]:
    found = []
    action = spec.get("action", "ALLOW")
    if (action_error := _find_action_error(spec, path)) is not None:
        found.append(action_error)
    # As Istio counts them: a selector (even an empty one), a targetRef, a non-empty targetRefs.
    bindings = [b for b in _BINDINGS if b in spec and (b != "targetRefs" or spec[b])]
    if len(bindings) > 1:
        found.append(
            validation.forbidden(
                validation.child(path, bindings[1]),
                f"may not be set together with {bindings[0]}: only one of selector, targetRef "
                "or targetRefs can be set",
            )
        )
    if "provider" in spec and action != "CUSTOM":
        found.append(
            validation.forbidden(
                validation.child(path, "provider"),
                f"may only be set with the CUSTOM action, not {action}",
            )
        )
    if action == "CUSTOM" and action_error is None:
        if "rules" not in spec:
            found.append(
                validation.required(
                    validation.child(path, "rules"),
                    "a CUSTOM policy without rules never matches; add an empty rule {} to "
                    "apply it to every request",
                )
            )
        elif "provider" not in spec:
            found.append(validation.required(validation.child(path, "provider")))
    if action == "DENY" and not spec.get("rules"):
        found.append(
            validation.required(
                validation.child(path, "rules"),
                "a DENY policy without rules never matches; add an empty rule {} to deny "
                "everything it selects",
            )
        )
    return found


AUTHORIZATION_POLICY_SPEC = validation.Obj(
    {
        "selector": WORKLOAD_SELECTOR,
        "targetRef": TARGET_REF,
        "targetRefs": validation.ListOf(TARGET_REF),
        "action": validation.Str(enum=ACTIONS),
        "provider": validation.Obj(
            {"name": validation.Str(non_empty=True)}, required=frozenset({"name"})
        ),
        "rules": validation.ListOf(RULE),
    },
    check_obj=_check_authorization_policy_spec,
)
# What istiod writes (IstioStatus); observedGeneration is an int64, so JSON may carry a string.
POLICY_STATUS = validation.Obj(
    {
        "conditions": validation.ListOf(schemas.CONDITION),
        "observedGeneration": validation.IntOrStr(validation.Int(0), validation.Str()),
        "validationMessages": validation.ListOf(validation.AnyObject()),
    }
)


def _check_same_namespace(obj: dict[str, Any], path: str) -> list[validation.FieldError]:
    """A targetRef names an object of the policy's own namespace (Istio does not support
    cross-namespace references from a policy)."""
    spec = obj.get("spec") or {}
    own = obj["metadata"].get("namespace")
    refs: list[tuple[str, dict[str, Any]]] = []
    if "targetRef" in spec:
        refs.append(("spec.targetRef", spec["targetRef"]))
    refs += [
        (validation.item("spec.targetRefs", i), r)
        for i, r in enumerate(spec.get("targetRefs") or ())
    ]
    return [
        validation.forbidden(
            validation.child(where, "namespace"),
            f"must be empty or the policy's own namespace {own!r}: cross-namespace references "
            "are not supported",
        )
        for where, ref in refs
        if own and ref.get("namespace") not in (None, own)
    ]


AUTHORIZATION_POLICY = dataclasses.replace(
    schemas.build_object(validation.dns_subdomain, AUTHORIZATION_POLICY_SPEC, POLICY_STATUS),
    required=frozenset({"metadata"}),  # no spec: ALLOW with no rules, which denies everything
    check_obj=_check_same_namespace,
)


# -- PeerAuthentication --------------------------------------------------------------------

MTLS = validation.Obj({"mode": validation.Str(enum=MTLS_MODES)})


def _check_peer_authentication_spec(spec: dict[str, Any], path: str) -> list[validation.FieldError]:
    levels = spec.get("portLevelMtls")
    if levels is None:
        return []
    where = validation.child(path, "portLevelMtls")
    if not levels:
        return [validation.required(where, "if set, must hold at least one port")]
    selector = spec.get("selector") or {}
    if not selector.get("matchLabels"):
        return [
            validation.forbidden(
                where,
                "a mesh-wide or namespace-wide PeerAuthentication cannot have port-level mTLS: "
                "it needs selector.matchLabels",
            )
        ]
    seen: set[int] = set()
    found = []
    for key in levels:
        if int(key) in seen:  # "80" and "080": one port, two modes
            found.append(validation.duplicate(where, key))
        seen.add(int(key))
    return found


PEER_AUTHENTICATION_SPEC = validation.Obj(
    {
        "selector": WORKLOAD_SELECTOR,
        "mtls": MTLS,
        "portLevelMtls": validation.MapOf(MTLS, port_key),
    },
    check_obj=_check_peer_authentication_spec,
)
PEER_AUTHENTICATION = dataclasses.replace(
    schemas.build_object(validation.dns_subdomain, PEER_AUTHENTICATION_SPEC, POLICY_STATUS),
    required=frozenset({"metadata"}),
)
