"""Everything ztunnel knows about the mesh, fed by delta xDS.

An xDS batch is converted off to the side first; if any resource fails, nothing is applied and
the errors become the NACK (ztunnel src/xds.rs). Otherwise the whole batch lands in one step.

After a batch that can change an authorization decision (a policy added, changed or removed, or a
workload whose `authorization_policies` list changed), the policy listeners are told what changed,
synchronously and before `apply` returns. That is what wakes ztunnel's PolicyWatcher to re-check
live connections as soon as the update lands (spec section 6, item 6), with no timer involved.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from google.protobuf import any_pb2

from meshcore import log
from meshcore.model import authorization, ids, store, workload
from meshcore.xds import resources, types

logger = logging.getLogger("ztunnel.state")

T = TypeVar("T")


@dataclasses.dataclass(frozen=True, slots=True)
class PolicyChange:
    """What one xDS batch changed that can alter authorization decisions.

    A policy counts through both its old and its new version, so a policy that moved scope or
    namespace reaches the workloads it used to cover as well as those it covers now.
    """

    is_global: bool = False  # a GLOBAL policy changed: it applies to every workload
    namespaces: frozenset[str] = frozenset()  # NAMESPACE policies changed in these namespaces
    policies: frozenset[ids.PolicyKey] = frozenset()  # every changed policy key
    workloads: frozenset[ids.WorkloadUid] = frozenset()  # their `authorization_policies` changed

    @property
    def is_empty(self) -> bool:
        return not (self.is_global or self.namespaces or self.policies or self.workloads)

    def merge(self, other: PolicyChange) -> PolicyChange:
        """One change covering both (updates that arrived while a re-check was running)."""
        return PolicyChange(
            self.is_global or other.is_global,
            self.namespaces | other.namespaces,
            self.policies | other.policies,
            self.workloads | other.workloads,
        )

    def affects(self, wl: workload.Workload) -> bool:
        """Whether the policies applying to `wl` (store.PolicyStore.find_applicable) may differ."""
        return (
            self.is_global
            or wl.uid in self.workloads
            or wl.namespace in self.namespaces
            # A workload may list any policy key, whatever its scope.
            or any(key in self.policies for key in wl.authorization_policies)
        )

    @classmethod
    def of_policies(cls, changed: Iterable[authorization.Authorization]) -> PolicyChange:
        is_global = False
        namespaces: set[str] = set()
        keys: set[ids.PolicyKey] = set()
        for policy in changed:
            keys.add(policy.key)
            if policy.scope is authorization.Scope.GLOBAL:
                is_global = True
            elif policy.scope is authorization.Scope.NAMESPACE:
                namespaces.add(policy.namespace)
        return cls(is_global, frozenset(namespaces), frozenset(keys))


Listener = Callable[[PolicyChange], None]


class ProxyState:
    def __init__(self) -> None:
        self.workloads = store.WorkloadStore()
        self.services = store.ServiceStore()
        self.policies = store.PolicyStore()
        self._changed = asyncio.Event()
        self._policy_listeners: list[Listener] = []
        self.generation = 0

    # xDS ResourceHandler

    def apply(
        self,
        type_url: str,
        updated: Sequence[tuple[str, any_pb2.Any]],
        removed: Sequence[str],
    ) -> Sequence[str]:
        if type_url == types.ADDRESS:
            return self._apply_addresses(updated, removed)
        if type_url == types.AUTHORIZATION:
            return self._apply_policies(updated, removed)
        return [f"unsupported type {type_url}"]

    def _apply_addresses(
        self, updated: Sequence[tuple[str, any_pb2.Any]], removed: Sequence[str]
    ) -> Sequence[str]:
        converted, errors = _decode_all(updated, resources.decode_address)
        if errors:
            return errors
        # Compared before anything is applied: a removal in the same batch must not hide the
        # previous version of a workload that the batch also updates.
        reauthorize = frozenset(
            item.uid
            for item in converted
            if isinstance(item, workload.Workload)
            and (previous := self.workloads.find(item.uid)) is not None
            and (
                previous.authorization_policies != item.authorization_policies
                or previous.namespace != item.namespace
            )
        )
        for name in removed:
            if self.workloads.remove(ids.WorkloadUid(name)) is None:
                self.services.remove(ids.ServiceKey(name))
        for item in converted:
            if isinstance(item, workload.Workload):
                self.workloads.insert(item)
            else:
                self.services.insert(item)
        self._bump()
        logger.debug(
            "addresses applied",
            extra=log.fields(updated=len(converted), removed=len(removed)),
        )
        if reauthorize:
            self._notify(PolicyChange(workloads=reauthorize))
        return ()

    def _apply_policies(
        self, updated: Sequence[tuple[str, any_pb2.Any]], removed: Sequence[str]
    ) -> Sequence[str]:
        converted, errors = _decode_all(updated, resources.decode_authorization)
        if errors:
            return errors
        changed: list[authorization.Authorization] = []
        for name in removed:
            old = self.policies.remove(ids.PolicyKey(name))
            if old is not None:
                changed.append(old)
        for policy in converted:
            old = self.policies.find(policy.key)
            if old == policy:
                continue  # resent unchanged (e.g. after a reconnect): no decision can differ
            if old is not None:
                changed.append(old)
            changed.append(policy)
            self.policies.insert(policy)
        self._bump()
        change = PolicyChange.of_policies(changed)
        if not change.is_empty:
            self._notify(change)
        return ()

    def _notify(self, change: PolicyChange) -> None:
        for listener in list(self._policy_listeners):
            try:
                listener(change)
            except Exception:
                # The batch is applied; a listener bug must not turn it into a NACK, which
                # would make the server believe we still hold the previous versions.
                logger.exception("policy listener failed")

    def _bump(self) -> None:
        self.generation += 1
        self._changed.set()
        self._changed = asyncio.Event()

    # Queries

    def on_policy_change(self, listener: Listener) -> Callable[[], None]:
        """Call `listener` with what changed after every update that can alter an authorization
        decision, before `apply` returns; returns an unsubscribe function."""
        self._policy_listeners.append(listener)
        return lambda: self._policy_listeners.remove(listener)

    def find_local_workload(
        self, node: str, namespace: str, service_account: str, name: str
    ) -> workload.Workload | None:
        """The xDS record of a pod ZDS told us about: matched on node, namespace and service
        account, then on name (spec section 4)."""
        for wl in self.workloads.find_local(node, namespace, service_account):
            if wl.name == name:
                return wl
        return None

    async def fetch_local_workload(
        self, node: str, namespace: str, service_account: str, name: str, timeout: float
    ) -> workload.Workload | None:
        """Wait up to `timeout` seconds for the pod's workload to arrive over xDS."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            found = self.find_local_workload(node, namespace, service_account, name)
            if found is not None:
                return found
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            try:
                async with asyncio.timeout(remaining):
                    await self._changed.wait()
            except TimeoutError:
                return self.find_local_workload(node, namespace, service_account, name)


def _decode_all(
    updated: Sequence[tuple[str, any_pb2.Any]], decode: Callable[..., T]
) -> tuple[list[T], list[str]]:
    """Convert a whole batch off to the side; any failure names its resource (the NACK)."""
    converted: list[T] = []
    errors: list[str] = []
    for name, value in updated:
        try:
            converted.append(decode(value, name=name))
        except resources.ResourceError as exc:
            errors.append(f"{name}: {exc}")
    return converted, errors
