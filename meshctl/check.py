"""`meshctl check`: would this connection be allowed? Decided from the API objects with the
same translation the controller runs (`meshcore.policy`) and the same evaluation ztunnel runs
(`meshcore.rbac`), without sending traffic. Pure functions of API objects.

The destination's node ztunnel decides: it gathers the GLOBAL policies, its namespace's
NAMESPACE policies and the selector / PeerAuthentication policies its workload lists; the
source is identified by its SPIFFE ID when it is in the mesh, and has no identity otherwise
(plaintext arriving on 15006).
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from meshcore import digits, rbac
from meshcore.identity import spiffe
from meshcore.kube import objects
from meshcore.model import authorization, ids, store
from meshcore.policy import authorization as authz_policy
from meshcore.policy import errors as policy_errors
from meshcore.policy import peerauthentication, selection
from meshctl import podfields

STATIC_STRICT_NAME = "istio_converted_static_strict"
CONVERTED_PREFIX = "converted_peer_authentication_"


@dataclasses.dataclass(frozen=True, slots=True)
class Policies:
    """The mesh's policies as ztunnel gets them, plus what is needed to explain a decision."""

    store: store.PolicyStore
    translations: Mapping[ids.PolicyKey, authz_policy.Translation]
    selectors: Mapping[ids.PolicyKey, tuple[str, Mapping[str, str]]]  # key -> (ns, matchLabels)
    peer_authentications: tuple[peerauthentication.PeerAuthentication, ...]
    root_namespace: str
    skipped: tuple[str, ...]  # policies that do not translate (the controller skips them too)


@dataclasses.dataclass(frozen=True, slots=True)
class Verdict:
    destination: str  # namespace/pod
    address: str  # ip:port the connection reaches
    allowed: bool
    explanation: tuple[str, ...]


def build_policies(
    authorization_policies: Iterable[Mapping[str, Any]],
    peer_authentications: Iterable[Mapping[str, Any]],
    *,
    root_namespace: str,
) -> Policies:
    policy_store = store.PolicyStore()
    translations: dict[ids.PolicyKey, authz_policy.Translation] = {}
    selectors: dict[ids.PolicyKey, tuple[str, Mapping[str, str]]] = {}
    skipped: list[str] = []
    for obj in authorization_policies:
        try:
            translation = authz_policy.build_translation(obj, root_namespace=root_namespace)
            selector = authz_policy.selector_of(obj)
        except policy_errors.PolicyError as exc:
            skipped.append(str(exc))
            continue
        if translation is None:
            continue  # targetRefs or dry run: not ztunnel's
        policy = translation.authorization
        policy_store.insert(policy)
        translations[policy.key] = translation
        if selector is not None:
            selectors[policy.key] = (policy.namespace, selector)
    pas = []
    for obj in peer_authentications:
        try:
            pas.append(peerauthentication.parse_peer_authentication(obj))
        except policy_errors.PolicyError as exc:
            skipped.append(str(exc))
    for derived in peerauthentication.build_policies(pas, root_namespace=root_namespace):
        policy_store.insert(derived)
    return Policies(
        policy_store, translations, selectors, tuple(pas), root_namespace, tuple(skipped)
    )


def find_workload_keys(
    policies: Policies, namespace: str, labels: Mapping[str, str]
) -> tuple[ids.PolicyKey, ...]:
    """`Workload.authorization_policies` as the controller computes it for these labels."""
    selected = sorted(
        key
        for key, (policy_ns, selector) in policies.selectors.items()
        if selection.selects(
            policy_ns, selector, namespace, labels, root_namespace=policies.root_namespace
        )
    )
    pa_keys = peerauthentication.find_peer_authentication_keys(
        namespace, labels, policies.peer_authentications, root_namespace=policies.root_namespace
    )
    return (*selected, *pa_keys)


def source_identity(pod: Mapping[str, Any], trust_domain: str) -> spiffe.SpiffeId | None:
    """The SPIFFE ID a captured pod presents; None for a pod outside the mesh (plaintext)."""
    if not podfields.is_captured(pod):
        return None
    sa = str(podfields.spec(pod).get("serviceAccountName") or spiffe.DEFAULT_SERVICE_ACCOUNT)
    return spiffe.SpiffeId.for_workload(objects.namespace(pod), sa, trust_domain)


def check_pod(
    policies: Policies,
    source: Mapping[str, Any],
    destination: Mapping[str, Any],
    port: int,
    *,
    trust_domain: str = spiffe.DEFAULT_TRUST_DOMAIN,
) -> Verdict:
    dst_name = f"{objects.namespace(destination)}/{objects.name(destination)}"
    dst_ip, src_ip = podfields.pod_ip(destination), podfields.pod_ip(source)
    address = f"{dst_ip}:{port}"
    if not dst_ip or not src_ip:
        missing = dst_name if not dst_ip else f"{objects.namespace(source)}/{objects.name(source)}"
        return Verdict(dst_name, address, False, (f"{missing} has no IP address yet",))
    identity = source_identity(source, trust_domain)
    how = (
        f"source identity {identity} (mTLS)" if identity else "source outside the mesh (plaintext)"
    )
    if not podfields.is_captured(destination):
        return Verdict(
            dst_name, address, True, (how, "destination is not in the mesh: no policy applies")
        )
    keys = find_workload_keys(policies, objects.namespace(destination), objects.labels(destination))
    applicable = policies.store.find_for(objects.namespace(destination), keys)
    conn = rbac.ConnectionInfo(
        source_identity=identity,
        source_ip=ipaddress.ip_address(src_ip),
        destination_ip=ipaddress.ip_address(dst_ip),
        destination_port=port,
    )
    decision = rbac.evaluate(applicable, conn)
    return Verdict(
        dst_name, address, decision.is_allowed, (how, explain(policies, decision, applicable))
    )


def explain(
    policies: Policies, decision: rbac.Decision, applicable: Sequence[authorization.Authorization]
) -> str:
    if decision.policy is None:
        if decision.verdict is rbac.Verdict.ALLOWED:
            return "no ALLOW policy applies, and no DENY policy matched"
        allows = ", ".join(_describe_key(policies, p.key) for p in applicable if _is_allow(p))
        return f"no rule of the ALLOW policies in effect matched ({allows})"
    what = "allowed by" if decision.is_allowed else "denied by"
    return f"{what} {_describe_key(policies, decision.policy, decision.rule)}"


def _is_allow(policy: authorization.Authorization) -> bool:
    return policy.action is authorization.Action.ALLOW and not policy.dry_run


def _describe_key(policies: Policies, key: ids.PolicyKey, rule: int | None = None) -> str:
    namespace, _, name = key.partition("/")
    if name == STATIC_STRICT_NAME:
        return "PeerAuthentication mode STRICT (no peer identity)"
    if name.startswith(CONVERTED_PREFIX):
        owner = name.removeprefix(CONVERTED_PREFIX)
        return f"PeerAuthentication {namespace}/{owner} (STRICT on this port)"
    text = f"AuthorizationPolicy {key}"
    translation = policies.translations.get(key)
    if rule is not None and translation is not None and rule < len(translation.rule_sources):
        text += f", rule spec.rules[{translation.rule_sources[rule]}]"
    return text


def resolve_service_port(
    service: Mapping[str, Any], port: int, pod: Mapping[str, Any]
) -> int | None:
    """The pod port a service port reaches on `pod` (named target ports resolved), or None."""
    for entry in podfields.service_ports(service):
        if entry.get("port") != port:
            continue
        target = entry.get("targetPort", port)
        if isinstance(target, int) and not isinstance(target, bool):
            return target
        if isinstance(target, str) and digits.is_digits(target):
            return int(target)
        if isinstance(target, str):
            protocol = str(entry.get("protocol") or "TCP")
            return podfields.find_named_port(pod, target, protocol)
    return None


def render(source: str, verdicts: Sequence[Verdict], skipped: Sequence[str]) -> str:
    lines = []
    for v in verdicts:
        word = "ALLOW" if v.allowed else "DENY"
        lines.append(f"{word:<6}{source} -> {v.destination} ({v.address})")
        lines.extend(f"      {reason}" for reason in v.explanation)
    lines.extend(
        f"note: skipped an invalid policy (the controller skips it too): {s}" for s in skipped
    )
    return "\n".join(lines) + "\n"
