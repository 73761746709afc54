"""The policy status controller of the local control plane: every AuthorizationPolicy carries a
`ZtunnelAccepted` condition saying what ztunnel makes of it, as istiod's ambient status writer
keeps it (pilot/pkg/serviceregistry/kube/controller/ambient: `WorkloadAuthorization.
GetConditions`).

The condition, decided by `build_condition` (pure):
- ``True / Accepted / "attached to ztunnel"``: ztunnel enforces the policy as written.
- ``True / UnsupportedValue / <istiod's message>``: ztunnel enforces it, but not every field
  (HTTP attributes, values that can never match, ...): `meshcore.policy.analysis` finds them and
  writes the message.
- ``False / Ignored / <why>``: the policy has targetRef(s), so it is a waypoint's or a gateway's
  and is never sent to ztunnel. istiod leaves ZtunnelAccepted out altogether here (the
  policy's WaypointAccepted condition speaks for it); this mesh has no waypoint status writer
  yet, so the condition says plainly that ztunnel does not enforce it.
- ``False / UnsupportedValue / "ztunnel does not support the AUDIT action"``: an action ztunnel
  lacks (the API refuses such policies; one stored before that rule still gets a clear status).

`PolicyStatusController` is driven by the store's watch of AuthorizationPolicies and writes
through the status subresource, and only when the condition differs from the stored one
(status, reason, message, observedGeneration): its own write comes back as a MODIFIED event
that then finds nothing to change, so there is no write loop. `lastTransitionTime` moves only
when the condition's status changes, as Kubernetes' condition helpers do. Other conditions (a
WaypointAccepted written by someone else) are kept as they are.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from controller.sources.local import kinds, reconciler
from controller.sources.local import store as store_mod
from meshcore import log
from meshcore.kube import objects
from meshcore.policy import analysis
from meshcore.policy import errors as policy_errors

_LOG = logging.getLogger("controller.policystatus")

AUTHORIZATION_POLICIES = kinds.AUTHORIZATION_POLICIES
CONDITION_TYPE = analysis.STATUS_CONDITION_TYPE
REASON_ACCEPTED = "Accepted"
MESSAGE_ACCEPTED = "attached to ztunnel"
REASON_UNSUPPORTED_VALUE = analysis.STATUS_REASON_UNSUPPORTED_VALUE
REASON_IGNORED = "Ignored"
MESSAGE_IGNORED = (
    "not attached to ztunnel: a policy with targetRef or targetRefs is for the waypoint or "
    "gateway it targets; ztunnel only enforces policies with a selector, or none"
)
REASON_INVALID = "Invalid"
TRUE, FALSE = "True", "False"
# The fields of a condition that say something; lastTransitionTime only records when.
_COMPARED = ("status", "reason", "message", "observedGeneration")

Key = reconciler.Key


@dataclasses.dataclass(frozen=True, slots=True)
class ZtunnelCondition:
    status: str  # TRUE | FALSE
    reason: str
    message: str


def build_condition(
    policy: Mapping[str, Any], *, root_namespace: str, dry_run_enabled: bool = False
) -> ZtunnelCondition:
    """What ztunnel makes of `policy` (a stored, valid AuthorizationPolicy), with the
    controller's settings."""
    try:
        action_error = analysis.find_action_error(policy)
        unenforced = analysis.find_unenforced(
            policy, root_namespace=root_namespace, dry_run_enabled=dry_run_enabled
        )
    except policy_errors.PolicyError as exc:
        return ZtunnelCondition(FALSE, REASON_INVALID, f"{exc.field}: {exc.reason}")
    if action_error is not None:
        return ZtunnelCondition(FALSE, REASON_UNSUPPORTED_VALUE, action_error)
    if any(u.category is analysis.Category.TARGET_REFS for u in unenforced):
        return ZtunnelCondition(FALSE, REASON_IGNORED, MESSAGE_IGNORED)
    if unenforced:
        message = analysis.build_status_message(unenforced)
        return ZtunnelCondition(TRUE, REASON_UNSUPPORTED_VALUE, message)
    return ZtunnelCondition(TRUE, REASON_ACCEPTED, MESSAGE_ACCEPTED)


def _generation(policy: Mapping[str, Any]) -> int:
    value = objects.metadata(policy).get("generation")
    return value if isinstance(value, int) and not isinstance(value, bool) else 1


def build_status(
    policy: Mapping[str, Any], condition: ZtunnelCondition, now: str
) -> dict[str, Any] | None:
    """The policy's status with `condition` in it, or None when the stored status already says
    exactly that (the case that keeps the controller from writing in a loop)."""
    status = policy.get("status")
    status = copy.deepcopy(status) if isinstance(status, dict) else {}
    conditions = status.get("conditions")
    conditions = conditions if isinstance(conditions, list) else []
    old = next(
        (c for c in conditions if isinstance(c, dict) and c.get("type") == CONDITION_TYPE), None
    )
    new = {
        "type": CONDITION_TYPE,
        "status": condition.status,
        "reason": condition.reason,
        "message": condition.message,
        "observedGeneration": _generation(policy),
        "lastTransitionTime": now,
    }
    if old is not None:
        if all(old.get(f) == new[f] for f in _COMPARED):
            return None
        if old.get("status") == new["status"] and isinstance(old.get("lastTransitionTime"), str):
            new["lastTransitionTime"] = old["lastTransitionTime"]
    status["conditions"] = [
        new if c is old else c for c in conditions if c is old or not _is_ztunnel_condition(c)
    ]
    if old is None:
        status["conditions"].append(new)
    return status


def _is_ztunnel_condition(condition: object) -> bool:
    return isinstance(condition, dict) and condition.get("type") == CONDITION_TYPE


class PolicyStatusController(reconciler.StoreReconciler):
    """Keeps the ZtunnelAccepted condition of every AuthorizationPolicy (see the module doc).

    `run()` until cancelled. A reconcile is synchronous on the event loop, so it reads and
    writes the store's current state; a write that fails (the store could not persist it) is
    retried with a backoff timer.
    """

    noun = "policy status"

    def __init__(
        self,
        object_store: store_mod.ObjectStore,
        *,
        root_namespace: str = kinds.DEFAULT_ROOT_NAMESPACE,
        dry_run_enabled: bool = False,
        clock: Callable[[], float] = time.time,
        initial_retry: float = 0.5,
        max_retry: float = 30.0,
    ) -> None:
        super().__init__(
            object_store,
            watched=AUTHORIZATION_POLICIES,
            initial_retry=initial_retry,
            max_retry=max_retry,
        )
        self._root_namespace = root_namespace
        self._dry_run_enabled = dry_run_enabled
        self._clock = clock

    def find_all_keys(self) -> Iterable[Key]:
        for policy in self._store.list(AUTHORIZATION_POLICIES).items:
            yield (objects.namespace(policy), objects.name(policy))

    def find_event_keys(self, event: objects.WatchEvent) -> Iterable[Key]:
        # A deleted policy reconciles to nothing, which also drops its pending retry.
        return [(objects.namespace(event.object), objects.name(event.object))]

    def reconcile_one(self, namespace: str, name: str) -> None:
        policy = self._store.find(AUTHORIZATION_POLICIES, name, namespace)
        if policy is None:
            return
        condition = build_condition(
            policy, root_namespace=self._root_namespace, dry_run_enabled=self._dry_run_enabled
        )
        status = build_status(policy, condition, store_mod.format_timestamp(self._clock()))
        if status is None:
            return
        body = copy.deepcopy(policy)
        body["status"] = status
        # The version read above is a precondition: nothing may have changed the policy since.
        self._store.replace(AUTHORIZATION_POLICIES, body, namespace, name, subresource="status")
        _LOG.info(
            "policy status written",
            extra=log.fields(
                namespace=namespace,
                policy=name,
                status=condition.status,
                reason=condition.reason,
            ),
        )
