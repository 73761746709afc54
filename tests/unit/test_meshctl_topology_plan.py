from __future__ import annotations

import ipaddress

import pytest

from meshctl.playground import record, topology

N = ipaddress.IPv4Network


@pytest.mark.parametrize(
    ("occupied", "expected"),
    [
        pytest.param([], "172.30.0.0/24", id="free"),
        pytest.param([N("0.0.0.0/0"), N("192.0.2.0/24")], "172.30.0.0/24", id="default-ignored"),
        pytest.param([N("172.30.0.0/24")], "172.30.1.0/24", id="first-taken"),
        pytest.param([N("172.30.0.0/23")], "172.30.2.0/24", id="wider-route"),
        pytest.param([N("172.30.0.7/32")], "172.30.1.0/24", id="host-route"),
        pytest.param([N("172.16.0.0/12")], None, id="everything-covered"),
    ],
)
def test_choose_fabric_subnet(occupied: list[ipaddress.IPv4Network], expected: str | None) -> None:
    if expected is None:
        with pytest.raises(topology.SubnetExhaustedError, match="no free /24"):
            topology.choose_fabric_subnet(occupied)
    else:
        assert str(topology.choose_fabric_subnet(occupied)) == expected


@pytest.mark.parametrize(
    ("index", "address", "pod_cidr"),
    [
        pytest.param(0, "172.30.0.10", "10.244.0.0/24", id="first"),
        pytest.param(1, "172.30.0.11", "10.244.1.0/24", id="second"),
        pytest.param(20, "172.30.0.30", "10.244.20.0/24", id="twenty-first"),
    ],
)
def test_node_record(index: int, address: str, pod_cidr: str) -> None:
    node = topology.build_node_record("mt1", f"node{index + 1}", index, N("172.30.0.0/24"))
    assert node == record.NodeRecord(
        name=f"node{index + 1}",
        netns=f"mt1-node{index + 1}",
        address=address,
        pod_cidr=pod_cidr,
        fabric_link=f"v-node{index + 1}",
    )


@pytest.mark.parametrize(
    "prefix",
    [
        pytest.param("", id="empty"),
        pytest.param("with-dash", id="dash"),
        pytest.param("Upper", id="upper"),
        pytest.param("abcdefghijk", id="too-long"),
        pytest.param("1abc", id="digit-first"),
    ],
)
def test_invalid_prefixes(prefix: str) -> None:
    with pytest.raises(topology.TopologyError, match="invalid prefix"):
        topology.validate_prefix(prefix)


def test_record_round_trip() -> None:
    rec = record.PlaygroundRecord(
        prefix="mt1",
        state_dir="/tmp/mt-1",
        phase=record.PHASE_READY,
        supervisor=record.ProcessRecord("supervisor", 10, 99, "/tmp/mt-1/supervisor.log"),
        topology=record.TopologyRecord(
            prefix="mt1",
            fabric_netns="mt1-fabric",
            bridge="fabric0",
            subnet="172.30.0.0/24",
            host_link="mt1-host",
            host_address="172.30.0.1/24",
            nodes=(topology.build_node_record("mt1", "node1", 0, N("172.30.0.0/24")),),
            netns=("mt1-fabric", "mt1-node1"),
            links=("mt1-host",),
        ),
        processes=(record.ProcessRecord("kubelet", 11, 100, "/k.log", node="node1", restarts=2),),
    ).with_message("hello", now=1.0)
    assert record.decode(record.encode(rec)) == rec


def test_with_process_replaces_same_component() -> None:
    rec = record.PlaygroundRecord(prefix="mt1", state_dir="/s")
    first = record.ProcessRecord("agent", 1, 1, "/a.log", node="node1")
    second = record.ProcessRecord("agent", 2, 2, "/a.log", node="node1", restarts=1)
    other = record.ProcessRecord("agent", 3, 3, "/b.log", node="node2")
    rec = rec.with_process(first).with_process(other).with_process(second)
    assert rec.processes == (other, second)
    assert rec.find_process("agent", "node1") == second
