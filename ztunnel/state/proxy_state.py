"""Everything ztunnel knows about the mesh, fed by delta xDS.

An xDS batch is converted off to the side first; if any resource fails, nothing is applied and
the errors become the NACK (ztunnel src/xds.rs). Otherwise the whole batch lands in one step.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

from google.protobuf import any_pb2

from meshcore import log
from meshcore.model import ids, store, workload
from meshcore.xds import resources, types

logger = logging.getLogger("ztunnel.state")

Listener = Callable[[], None]
T = TypeVar("T")


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
        return ()

    def _apply_policies(
        self, updated: Sequence[tuple[str, any_pb2.Any]], removed: Sequence[str]
    ) -> Sequence[str]:
        converted, errors = _decode_all(updated, resources.decode_authorization)
        if errors:
            return errors
        for name in removed:
            self.policies.remove(ids.PolicyKey(name))
        for policy in converted:
            self.policies.insert(policy)
        self._bump()
        for listener in list(self._policy_listeners):
            listener()
        return ()

    def _bump(self) -> None:
        self.generation += 1
        self._changed.set()
        self._changed = asyncio.Event()

    # Queries

    def on_policy_change(self, listener: Listener) -> Callable[[], None]:
        """Call `listener` after every authorization update; returns an unsubscribe function."""
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
