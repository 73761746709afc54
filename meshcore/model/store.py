"""Indexed stores of workloads, services and policies.

Invariants: every secondary index agrees with the primary one. `insert` is remove-then-add, so an
updated object never leaves a stale entry behind under an old address, identity or hostname.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator
from typing import TypeVar

from meshcore.model import authorization, ids, workload

K = TypeVar("K")
V = TypeVar("V")


class WorkloadStore:
    def __init__(self) -> None:
        self._by_uid: dict[ids.WorkloadUid, workload.Workload] = {}
        self._by_address: dict[tuple[str, ids.IpAddress], ids.WorkloadUid] = {}
        self._by_service: dict[ids.ServiceKey, set[ids.WorkloadUid]] = collections.defaultdict(set)
        self._by_node_identity: dict[tuple[str, str, str], set[ids.WorkloadUid]] = (
            collections.defaultdict(set)
        )

    def __len__(self) -> int:
        return len(self._by_uid)

    def __iter__(self) -> Iterator[workload.Workload]:
        return iter(list(self._by_uid.values()))

    def insert(self, wl: workload.Workload) -> None:
        self.remove(wl.uid)
        self._by_uid[wl.uid] = wl
        for address in wl.addresses:
            self._by_address[(wl.network, address)] = wl.uid
        for binding in wl.services:
            self._by_service[binding.service].add(wl.uid)
        self._by_node_identity[(wl.node, wl.namespace, wl.service_account)].add(wl.uid)

    def remove(self, uid: ids.WorkloadUid) -> workload.Workload | None:
        wl = self._by_uid.pop(uid, None)
        if wl is None:
            return None
        for address in wl.addresses:
            if self._by_address.get((wl.network, address)) == uid:
                del self._by_address[(wl.network, address)]
        for binding in wl.services:
            _discard(self._by_service, binding.service, uid)
        _discard(self._by_node_identity, (wl.node, wl.namespace, wl.service_account), uid)
        return wl

    def find(self, uid: ids.WorkloadUid) -> workload.Workload | None:
        return self._by_uid.get(uid)

    def find_by_address(
        self, address: ids.IpAddress, network: str = ""
    ) -> workload.Workload | None:
        uid = self._by_address.get((network, address))
        return self._by_uid.get(uid) if uid is not None else None

    def find_endpoints(self, service: ids.ServiceKey) -> list[workload.Workload]:
        """Every workload backing `service`, sorted by uid so callers get a stable order."""
        return sorted(
            (self._by_uid[uid] for uid in self._by_service.get(service, ())),
            key=lambda w: w.uid,
        )

    def find_local(
        self, node: str, namespace: str, service_account: str
    ) -> list[workload.Workload]:
        """Workloads on `node` running as namespace/service_account (how ZDS pods are matched)."""
        uids = self._by_node_identity.get((node, namespace, service_account), ())
        return sorted((self._by_uid[uid] for uid in uids), key=lambda w: w.uid)


class ServiceStore:
    def __init__(self) -> None:
        self._by_key: dict[ids.ServiceKey, workload.Service] = {}
        self._by_vip: dict[ids.IpAddress, ids.ServiceKey] = {}
        self._by_hostname: dict[str, set[ids.ServiceKey]] = collections.defaultdict(set)

    def __len__(self) -> int:
        return len(self._by_key)

    def __iter__(self) -> Iterator[workload.Service]:
        return iter(list(self._by_key.values()))

    def insert(self, svc: workload.Service) -> None:
        self.remove(svc.key)
        self._by_key[svc.key] = svc
        for address in svc.addresses:
            self._by_vip[address] = svc.key
        self._by_hostname[svc.hostname].add(svc.key)

    def remove(self, key: ids.ServiceKey) -> workload.Service | None:
        svc = self._by_key.pop(key, None)
        if svc is None:
            return None
        for address in svc.addresses:
            if self._by_vip.get(address) == key:
                del self._by_vip[address]
        _discard(self._by_hostname, svc.hostname, key)
        return svc

    def find(self, key: ids.ServiceKey) -> workload.Service | None:
        return self._by_key.get(key)

    def find_by_vip(self, address: ids.IpAddress) -> workload.Service | None:
        key = self._by_vip.get(address)
        return self._by_key.get(key) if key is not None else None

    def find_by_hostname(self, hostname: str) -> list[workload.Service]:
        return sorted(
            (self._by_key[k] for k in self._by_hostname.get(hostname, ())), key=lambda s: s.key
        )


class PolicyStore:
    def __init__(self) -> None:
        self._by_key: dict[ids.PolicyKey, authorization.Authorization] = {}
        self._by_namespace: dict[str, set[ids.PolicyKey]] = collections.defaultdict(set)
        self._global: set[ids.PolicyKey] = set()

    def __len__(self) -> int:
        return len(self._by_key)

    def __iter__(self) -> Iterator[authorization.Authorization]:
        return iter(list(self._by_key.values()))

    def insert(self, policy: authorization.Authorization) -> None:
        self.remove(policy.key)
        self._by_key[policy.key] = policy
        if policy.scope is authorization.Scope.GLOBAL:
            self._global.add(policy.key)
        elif policy.scope is authorization.Scope.NAMESPACE:
            self._by_namespace[policy.namespace].add(policy.key)

    def remove(self, key: ids.PolicyKey) -> authorization.Authorization | None:
        policy = self._by_key.pop(key, None)
        if policy is None:
            return None
        self._global.discard(key)
        _discard(self._by_namespace, policy.namespace, key)
        return policy

    def find(self, key: ids.PolicyKey) -> authorization.Authorization | None:
        return self._by_key.get(key)

    def find_applicable(self, wl: workload.Workload) -> list[authorization.Authorization]:
        """Global, namespace and selector policies that apply to `wl`; unknown keys are skipped."""
        return self.find_for(wl.namespace, wl.authorization_policies)

    def find_for(
        self, namespace: str, listed: Iterable[ids.PolicyKey]
    ) -> list[authorization.Authorization]:
        """What ztunnel gathers for a destination in `namespace` whose workload lists `listed`."""
        keys: set[ids.PolicyKey] = set(self._global)
        keys |= self._by_namespace.get(namespace, set())
        keys |= {k for k in listed if k in self._by_key}
        return [self._by_key[k] for k in sorted(keys)]


def _discard(index: dict[K, set[V]], key: K, value: V) -> None:
    members = index.get(key)
    if members is None:
        return
    members.discard(value)
    if not members:
        del index[key]
