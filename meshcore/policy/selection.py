"""Which workloads a selector policy attaches to, as istiod decides it. Pure. (What ztunnel then
gathers for a destination is `meshcore.model.store.PolicyStore.find_for`.)"""

from __future__ import annotations

from collections.abc import Mapping


def selects(
    policy_namespace: str,
    selector: Mapping[str, str],
    namespace: str,
    labels: Mapping[str, str],
    *,
    root_namespace: str,
) -> bool:
    """A selector policy attaches to a workload of its own namespace (of every namespace, from
    the root namespace) whose labels include all of `selector`; an empty selector attaches to
    none."""
    if policy_namespace not in (namespace, root_namespace) or not selector:
        return False
    return all(labels.get(k) == v for k, v in selector.items())
