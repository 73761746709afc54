"""PodContext.find_workload: the pod's xDS record, remembered until the state changes."""

from __future__ import annotations

import dataclasses
import ipaddress
import typing

from meshcore.identity import spiffe
from meshcore.model import ids, workload
from meshcore.wire import zds
from meshcore.xds import resources, types
from ztunnel.inpod import pod_network
from ztunnel.proxy.inputs import PodContext
from ztunnel.state import proxy_state

WEB = workload.Workload(
    uid=ids.pod_uid("shop", "web"),
    name="web",
    namespace="shop",
    addresses=(ipaddress.ip_address("10.244.1.2"),),
    node="n1",
    service_account="web",
)


def _pod() -> PodContext:
    return PodContext(
        uid="u1",
        info=zds.WorkloadInfo("web", "shop", "web"),
        identity=spiffe.SpiffeId.for_workload("shop", "web"),
        node="n1",
        network=typing.cast(pod_network.PodNetwork, None),  # lookups never touch it
    )


def test_an_xds_update_is_seen_at_the_next_lookup() -> None:
    state, pod = proxy_state.ProxyState(), _pod()
    assert pod.find_workload(state) is None
    assert state.apply(types.ADDRESS, [resources.address_resource(WEB)], []) == ()
    assert pod.find_workload(state) == WEB
    v2 = dataclasses.replace(WEB, canonical_revision="v2")
    assert state.apply(types.ADDRESS, [resources.address_resource(v2)], []) == ()
    assert pod.find_workload(state) == v2
    assert state.apply(types.ADDRESS, [], [WEB.uid]) == ()
    assert pod.find_workload(state) is None


def test_a_store_changed_in_place_is_seen_too() -> None:
    state, pod = proxy_state.ProxyState(), _pod()
    state.workloads.insert(WEB)
    assert pod.find_workload(state) is WEB
    v2 = dataclasses.replace(WEB, canonical_revision="v2")
    state.workloads.insert(v2)  # no xDS batch: the generation stays
    assert pod.find_workload(state) is v2
    state.workloads.remove(WEB.uid)
    assert pod.find_workload(state) is None
