"""AuthorizationPolicy and PeerAuthentication objects -> the Authorizations ztunnel gets, and the
policy keys each workload lists. Pure: no I/O; `meshcore.policy` does the conversions.

Invariants:
- `_authorizations` holds exactly the translation of every known AuthorizationPolicy that is
  sent to ztunnel; `_derived` exactly `peerauthentication.build_policies` of the known
  PeerAuthentications. Their keys never collide: istiod's derived names contain "_", which no
  Kubernetes name can.
- `_attached` holds (namespace, matchLabels) for every sent policy with a non-empty selector:
  what `find_keys` matches workloads against.
- An update names the namespaces whose workloads may list different keys afterwards (None:
  all of them); nothing else about workloads changes with policies.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping

from controller.translate import services as svc_translate
from meshcore.kube import resources
from meshcore.model import authorization, ids
from meshcore.policy import authorization as authz_policy
from meshcore.policy import errors as policy_errors
from meshcore.policy import peerauthentication, selection, spec

GROUP = "security.istio.io"
AUTHORIZATION_POLICY = spec.AUTHORIZATION_POLICY
PEER_AUTHENTICATION = spec.PEER_AUTHENTICATION
# v1 is what istiod watches; v1beta1 objects are the same kind with the same fields.
AUTHORIZATION_POLICIES = resources.AUTHORIZATION_POLICIES
PEER_AUTHENTICATIONS = resources.PEER_AUTHENTICATIONS

_Key = tuple[str, str]  # (namespace, name)
_Attachment = tuple[str, tuple[tuple[str, str], ...]]  # (namespace, sorted matchLabels)


@dataclasses.dataclass(frozen=True, slots=True)
class PolicyUpdate:
    """What one event changed: policies to send or withdraw, and whose keys to recompute."""

    policies: tuple[authorization.Authorization, ...] = ()
    removed: tuple[ids.PolicyKey, ...] = ()
    # Namespaces whose workloads may now list other keys; None: every namespace.
    namespaces: frozenset[str] | None = frozenset()
    errors: tuple[str, ...] = ()


class PolicyIndex:
    def __init__(self, *, root_namespace: str, dry_run_enabled: bool = False) -> None:
        self._root = root_namespace
        self._dry_run_enabled = dry_run_enabled
        self._authorizations: dict[_Key, authorization.Authorization] = {}
        self._attached: dict[_Key, _Attachment] = {}
        # Selector policies by namespace, so a workload only looks at its own and the root's.
        self._attached_by_namespace: dict[str, set[_Key]] = collections.defaultdict(set)
        self._peer_authentications: dict[_Key, peerauthentication.PeerAuthentication] = {}
        self._derived: dict[ids.PolicyKey, authorization.Authorization] = {}

    @property
    def root_namespace(self) -> str:
        return self._root

    def policies(self) -> list[authorization.Authorization]:
        """Every policy ztunnel should have, sorted by key."""
        everything = [*self._authorizations.values(), *self._derived.values()]
        return sorted(everything, key=lambda p: p.key)

    def find_keys(self, namespace: str, labels: Mapping[str, str]) -> tuple[ids.PolicyKey, ...]:
        """`Workload.authorization_policies` for a workload: the selector policies of its
        namespace and the root namespace that select it (sorted), then its PeerAuthentication
        keys, as istiod lists them."""
        selected = []
        for ns in {namespace, self._root}:
            for key in self._attached_by_namespace.get(ns, ()):
                policy_ns, selector = self._attached[key]
                if selection.selects(
                    policy_ns, dict(selector), namespace, labels, root_namespace=self._root
                ):
                    selected.append(self._authorizations[key].key)
        pa_keys = peerauthentication.find_peer_authentication_keys(
            namespace, labels, self._peer_authentications.values(), root_namespace=self._root
        )
        return (*sorted(selected), *pa_keys)

    # --- AuthorizationPolicy ---

    def apply_authorization_policy(
        self, obj: svc_translate.KubeObject, *, deleted: bool
    ) -> PolicyUpdate:
        key = svc_translate.object_key(obj)
        errors: list[str] = []
        new: authorization.Authorization | None = None
        attachment: _Attachment | None = None
        if not deleted:
            try:
                new = authz_policy.build_authorization(
                    obj, root_namespace=self._root, dry_run_enabled=self._dry_run_enabled
                )
                selector = authz_policy.selector_of(obj) if new is not None else None
            except policy_errors.PolicyError as exc:
                errors.append(str(exc))  # not sent until a later version translates
                new = None
            else:
                if selector:
                    attachment = (key[0], tuple(sorted(selector.items())))
        old = self._authorizations.pop(key, None)
        old_attachment = self._attached.pop(key, None)
        self._attached_by_namespace[key[0]].discard(key)
        if not self._attached_by_namespace[key[0]]:
            del self._attached_by_namespace[key[0]]
        if new is not None:
            self._authorizations[key] = new
        if attachment is not None:
            self._attached[key] = attachment
            self._attached_by_namespace[key[0]].add(key)
        namespaces: frozenset[str] | None = frozenset()
        if attachment != old_attachment:
            namespaces = None if key[0] == self._root else frozenset({key[0]})
        return PolicyUpdate(
            policies=(new,) if new is not None and new != old else (),
            removed=(old.key,) if old is not None and new is None else (),
            namespaces=namespaces,
            errors=tuple(errors),
        )

    # --- PeerAuthentication ---

    def apply_peer_authentication(
        self, obj: svc_translate.KubeObject, *, deleted: bool
    ) -> PolicyUpdate:
        key = svc_translate.object_key(obj)
        errors: list[str] = []
        old = self._peer_authentications.pop(key, None)
        if not deleted:
            try:
                self._peer_authentications[key] = peerauthentication.parse_peer_authentication(obj)
            except policy_errors.PolicyError as exc:
                errors.append(str(exc))
        if old is None and key not in self._peer_authentications:
            return PolicyUpdate(errors=tuple(errors))
        # The mode of one policy reaches every workload of its namespace (of the mesh, from the
        # root namespace) and the port-level policies there: recompute them all.
        update = self._rederive(None if key[0] == self._root else frozenset({key[0]}))
        return dataclasses.replace(update, errors=tuple(errors))

    # --- namespaces ---

    def drop_namespace(self, namespace: str) -> PolicyUpdate:
        """Forget the namespace's policies (their delete events were missed)."""
        removed = []
        for key in [k for k in self._authorizations if k[0] == namespace]:
            removed.append(self._authorizations.pop(key).key)
        for key in self._attached_by_namespace.pop(namespace, set()):
            self._attached.pop(key, None)
        had_pas = False
        for key in [k for k in self._peer_authentications if k[0] == namespace]:
            del self._peer_authentications[key]
            had_pas = True
        scope = None if namespace == self._root else frozenset({namespace})
        update = self._rederive(scope) if had_pas else PolicyUpdate()
        return dataclasses.replace(
            update,
            removed=tuple(sorted((*update.removed, *removed))),
            namespaces=scope if removed or had_pas else frozenset(),
        )

    def _rederive(self, namespaces: frozenset[str] | None) -> PolicyUpdate:
        fresh = {
            p.key: p
            for p in peerauthentication.build_policies(
                self._peer_authentications.values(), root_namespace=self._root
            )
        }
        changed = [p for k, p in fresh.items() if self._derived.get(k) != p]
        removed = [k for k in self._derived if k not in fresh]
        self._derived = fresh
        return PolicyUpdate(
            policies=tuple(sorted(changed, key=lambda p: p.key)),
            removed=tuple(sorted(removed)),
            namespaces=namespaces,
        )
