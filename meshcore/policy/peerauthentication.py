"""PeerAuthentication in ambient: which mTLS mode each workload port gets, and the L4 policies
that enforce it (spec section 6, istiod's convertedSelectorPeerAuthentications and
convertPeerAuthentication). Pure.

ztunnel never sees a PeerAuthentication. Mesh-to-mesh traffic is HBONE (mTLS) whatever the
mode; the mode only decides whether plaintext from outside the mesh (no peer identity) is let
in. Resolution for a workload:
- mesh-wide: the oldest PeerAuthentication in the root namespace without a selector;
- namespace: the oldest in the workload's namespace without a selector (or with one that has
  no labels); its mode replaces the mesh-wide one unless UNSET;
- workload: the oldest in the workload's namespace whose matchLabels the workload has (never
  in the root namespace); its mode replaces the inherited one unless UNSET;
- portLevelMtls (only on that workload-level policy): per port, UNSET inherits.
DISABLE acts as PERMISSIVE; with no PeerAuthentication at all the mode is PERMISSIVE.

Policies produced, named as istiod names them:
- `<root>/istio_converted_static_strict`: DENY when the peer has no identity. Sent whenever a
  PeerAuthentication exists; a workload STRICT on every port lists its key.
- `<ns>/converted_peer_authentication_<name>`: for a workload-level policy whose ports do not
  all share the workload's mode. Workloads it governs list only this key. STRICT with
  exceptions is one DENY rule: no identity AND port not in any exception; PERMISSIVE with
  STRICT ports is one DENY rule per STRICT port: no identity AND that port.

Where istiod departs from that resolution we follow the resolution, and say why:
- istiod ignores a port-level DISABLE under a workload mode of UNSET with a STRICT parent (the
  port stays STRICT); here it acts as PERMISSIVE, as DISABLE does everywhere else.
- for a workload mode of PERMISSIVE (or UNSET) with STRICT ports, istiod can list the converted
  key yet skip its rules (an operator-precedence slip in convertPeerAuthentication, and an UNSET
  namespace policy read as not STRICT), leaving those ports open; here they are STRICT.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping
from typing import Any

from meshcore.model import authorization, ids
from meshcore.policy import spec

STATIC_STRICT_POLICY_NAME = "istio_converted_static_strict"  # "_": no Kubernetes name clashes
CONVERTED_PREFIX = "converted_peer_authentication_"
_MAX_PORT = 65535

_NO_IDENTITY = authorization.Match(
    not_principals=(authorization.StringMatch(authorization.MatchKind.PRESENCE),)
)


class MtlsMode(enum.Enum):
    UNSET = "UNSET"
    DISABLE = "DISABLE"
    PERMISSIVE = "PERMISSIVE"
    STRICT = "STRICT"


@dataclasses.dataclass(frozen=True, slots=True)
class PeerAuthentication:
    namespace: str
    name: str
    creation_timestamp: str  # RFC 3339; the oldest policy wins a tie
    selector: Mapping[str, str] | None  # matchLabels; None without a selector
    mode: MtlsMode
    port_modes: tuple[tuple[int, MtlsMode], ...] = ()  # by port

    @property
    def is_namespace_wide(self) -> bool:
        return not self.selector

    @property
    def age_key(self) -> tuple[str, str, str]:
        # istiod keeps the first of equal timestamps; name order makes "first" deterministic.
        return (self.creation_timestamp, self.namespace, self.name)


def parse_peer_authentication(obj: Mapping[str, Any]) -> PeerAuthentication:
    """Raises `InvalidPolicyError` naming the field for a malformed object or unknown mode.

    portLevelMtls keys that are not port numbers are left out: no connection has such a port,
    so they could never apply.
    """
    ref = spec.object_ref(obj, spec.PEER_AUTHENTICATION)
    if not isinstance(obj, Mapping):
        raise ref.fail("", f"not an object: {type(obj).__name__}")
    meta = spec.read_mapping(ref, obj.get("metadata"), "metadata")
    created = meta.get("creationTimestamp")
    body = spec.read_mapping(ref, obj.get("spec"), "spec")
    port_modes: dict[int, MtlsMode] = {}
    levels = spec.read_mapping(ref, body.get("portLevelMtls"), "spec.portLevelMtls")
    for key, mtls in levels.items():
        path = f"spec.portLevelMtls[{key!r}]"
        mode = _read_mode(ref, mtls, path)
        port = str(key)
        if port.isdecimal() and port.isascii() and 0 < int(port) <= _MAX_PORT:
            if int(port) in port_modes:
                # "80" and "080": the API refuses this; an object from elsewhere is still bad.
                raise ref.fail(path, f"port {int(port)} is listed more than once")
            port_modes[int(port)] = mode
    return PeerAuthentication(
        namespace=ref.namespace,
        name=ref.name,
        creation_timestamp=created if isinstance(created, str) else "",
        selector=spec.read_selector(ref, body.get("selector"), "spec.selector"),
        mode=_read_mode(ref, body.get("mtls"), "spec.mtls"),
        port_modes=tuple(sorted(port_modes.items())),
    )


def static_strict_key(root_namespace: str) -> ids.PolicyKey:
    return ids.policy_key(root_namespace, STATIC_STRICT_POLICY_NAME)


def converted_key(peer_authentication: PeerAuthentication) -> ids.PolicyKey:
    pa = peer_authentication
    return ids.policy_key(pa.namespace, CONVERTED_PREFIX + pa.name)


def build_static_strict(root_namespace: str) -> authorization.Authorization:
    """DENY any connection without a peer identity (plaintext into the workload)."""
    return authorization.Authorization(
        name=STATIC_STRICT_POLICY_NAME,
        namespace=root_namespace,
        scope=authorization.Scope.WORKLOAD_SELECTOR,
        action=authorization.Action.DENY,
        rules=(authorization.Rule((authorization.Clause((_NO_IDENTITY,)),)),),
    )


def build_policies(
    peer_authentications: Iterable[PeerAuthentication], *, root_namespace: str
) -> tuple[authorization.Authorization, ...]:
    """Everything istiod sends for these PeerAuthentications, by key: the static STRICT policy
    (when there is any PeerAuthentication) and the port-level ones."""
    pas = list(peer_authentications)
    if not pas:
        return ()
    policies = [build_static_strict(root_namespace)]
    policies.extend(build_port_level_policies(pas, root_namespace=root_namespace))
    return tuple(sorted(policies, key=lambda p: p.key))


def build_port_level_policies(
    peer_authentications: Iterable[PeerAuthentication], *, root_namespace: str
) -> tuple[authorization.Authorization, ...]:
    """`converted_peer_authentication_<name>` for each workload-level PeerAuthentication whose
    ports do not all share its resolved mode."""
    pas = list(peer_authentications)
    policies = []
    for pa in pas:
        if pa.namespace == root_namespace or pa.is_namespace_wide or not pa.port_modes:
            continue
        parent = _parent_is_strict(pa.namespace, pas, root_namespace)
        policy = _build_port_level(pa, parent)
        if policy is not None:
            policies.append(policy)
    return tuple(sorted(policies, key=lambda p: p.key))


def find_peer_authentication_keys(
    namespace: str,
    labels: Mapping[str, str],
    peer_authentications: Iterable[PeerAuthentication],
    *,
    root_namespace: str,
) -> tuple[ids.PolicyKey, ...]:
    """The keys a workload with `labels` in `namespace` lists for its mTLS mode: the converted
    policy of its workload-level PeerAuthentication when that has port exceptions, else the
    static STRICT policy when it is STRICT, else none."""
    pas = list(peer_authentications)
    owner = _workload_policy(namespace, labels, pas, root_namespace)
    parent = _parent_is_strict(namespace, pas, root_namespace)
    if owner is not None and _exceptions(owner, parent):
        return (converted_key(owner),)
    if _base_is_strict(owner, parent):
        return (static_strict_key(root_namespace),)
    return ()


def find_effective_mode(
    namespace: str,
    labels: Mapping[str, str],
    port: int,
    peer_authentications: Iterable[PeerAuthentication],
    *,
    root_namespace: str,
) -> MtlsMode:
    """STRICT or PERMISSIVE: what ztunnel enforces on plaintext to `port` of that workload."""
    pas = list(peer_authentications)
    owner = _workload_policy(namespace, labels, pas, root_namespace)
    parent = _parent_is_strict(namespace, pas, root_namespace)
    strict = _base_is_strict(owner, parent)
    if owner is not None:
        strict = dict(_port_strictness(owner, strict)).get(port, strict)
    return MtlsMode.STRICT if strict else MtlsMode.PERMISSIVE


def _read_mode(ref: spec.ObjectRef, value: object, path: str) -> MtlsMode:
    mode = spec.read_mapping(ref, value, path).get("mode")
    if mode is None or mode == "":
        return MtlsMode.UNSET
    try:
        return MtlsMode(mode)
    except ValueError:
        known = ", ".join(m.value for m in MtlsMode)
        raise ref.fail(f"{path}.mode", f"unknown mode {mode!r} (one of {known})") from None


def _oldest(candidates: Iterable[PeerAuthentication]) -> PeerAuthentication | None:
    return min(candidates, key=lambda pa: pa.age_key, default=None)


def _workload_policy(
    namespace: str,
    labels: Mapping[str, str],
    pas: list[PeerAuthentication],
    root_namespace: str,
) -> PeerAuthentication | None:
    if namespace == root_namespace:
        return None  # selector policies in the root namespace are ignored
    return _oldest(
        pa
        for pa in pas
        if pa.namespace == namespace
        and pa.selector
        and all(labels.get(k) == v for k, v in pa.selector.items())
    )


def _parent_is_strict(namespace: str, pas: list[PeerAuthentication], root_namespace: str) -> bool:
    """The mode inherited from the namespace-wide, else the mesh-wide policy."""
    mesh = _oldest(
        pa
        for pa in pas
        if pa.namespace == root_namespace
        and (pa.selector is None or (namespace == root_namespace and not pa.selector))
    )
    local = None
    if namespace != root_namespace:
        local = _oldest(pa for pa in pas if pa.namespace == namespace and pa.is_namespace_wide)
    strict = mesh is not None and mesh.mode is MtlsMode.STRICT
    if local is not None and local.mode is not MtlsMode.UNSET:
        strict = local.mode is MtlsMode.STRICT
    return strict


def _base_is_strict(owner: PeerAuthentication | None, parent: bool) -> bool:
    if owner is None or owner.mode is MtlsMode.UNSET:
        return parent
    return owner.mode is MtlsMode.STRICT


def _port_strictness(owner: PeerAuthentication, base: bool) -> list[tuple[int, bool]]:
    return [
        (port, base if mode is MtlsMode.UNSET else mode is MtlsMode.STRICT)
        for port, mode in owner.port_modes
    ]


def _exceptions(owner: PeerAuthentication, parent: bool) -> list[int]:
    """Ports whose mode differs from the workload's: they need the converted policy."""
    base = _base_is_strict(owner, parent)
    return [port for port, strict in _port_strictness(owner, base) if strict != base]


def _build_port_level(pa: PeerAuthentication, parent: bool) -> authorization.Authorization | None:
    exceptions = _exceptions(pa, parent)
    if not exceptions:
        return None
    if _base_is_strict(pa, parent):
        # One rule: no identity AND not one of the PERMISSIVE ports. istiod puts the identity
        # clause first for an explicit STRICT, last when it merges an inherited STRICT in.
        identity = authorization.Clause((_NO_IDENTITY,))
        ports = [
            authorization.Clause((authorization.Match(not_destination_ports=(p,)),))
            for p in exceptions
        ]
        clauses = [identity, *ports] if pa.mode is MtlsMode.STRICT else [*ports, identity]
        rules: tuple[authorization.Rule, ...] = (authorization.Rule(tuple(clauses)),)
    else:
        # One rule per STRICT port: no identity AND that port.
        rules = tuple(
            authorization.Rule(
                (
                    authorization.Clause(
                        (dataclasses.replace(_NO_IDENTITY, destination_ports=(p,)),)
                    ),
                )
            )
            for p in exceptions
        )
    return authorization.Authorization(
        name=CONVERTED_PREFIX + pa.name,
        namespace=pa.namespace,
        scope=authorization.Scope.WORKLOAD_SELECTOR,
        action=authorization.Action.DENY,
        rules=rules,
    )
