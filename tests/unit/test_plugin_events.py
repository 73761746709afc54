"""What the node agent accepts on its plugin event socket, and `netns.check_netns`."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from cni.agent import plugin_server
from meshcore import netns

ADD = {
    "cmd": "add",
    "containerId": "c1",
    "netns": "/var/run/netns/cni-1",
    "ifname": "eth0",
    "podName": "web",
    "podNamespace": "shop",
    "podUid": "u1",
    "ips": ["10.244.0.5"],
}


def _parse(**changes: Any) -> plugin_server.PluginEvent:
    return plugin_server.parse_event(json.dumps({**ADD, **changes}).encode())


def test_a_well_formed_add() -> None:
    event = _parse()
    assert isinstance(event, plugin_server.PodAddEvent)
    assert (event.netns, event.ips) == ("/var/run/netns/cni-1", ("10.244.0.5",))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"netns": "netns/cni-1"}, "netns: must be an absolute path, got 'netns/cni-1'"),
        ({"netns": "/var/run/netns/\0x"}, "netns: contains a NUL character"),
        ({"podName": "web\ud800"}, "podName: is not valid Unicode text"),
        ({"ips": [1]}, "ips[0]: '1' is not an IP address"),
        ({"ips": ["10.0.0.300"]}, "ips[0]: '10.0.0.300' is not an IP address"),
    ],
    ids=["relative-netns", "nul", "surrogate", "ip-as-number", "bad-ip"],
)
def test_malformed_fields_are_refused_by_name(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(plugin_server.InvalidEventError) as err:
        _parse(**changes)
    assert str(err.value) == message


def test_a_del_may_come_without_a_netns() -> None:
    assert isinstance(_parse(cmd="del", netns=""), plugin_server.PodDelEvent)


def test_check_netns_accepts_only_network_namespaces(tmp_path: Any) -> None:
    netns.check_netns(f"/proc/{os.getpid()}/ns/net")
    with pytest.raises(netns.NetnsError, match="is not a network namespace"):
        netns.check_netns(f"/proc/{os.getpid()}/ns/mnt")
    plain = tmp_path / "file"
    plain.write_text("")
    with pytest.raises(netns.NetnsError, match=f"{plain} is not a network namespace"):
        netns.check_netns(str(plain))
    with pytest.raises(netns.NetnsError, match="No such file"):
        netns.check_netns(str(tmp_path / "missing"))
    with pytest.raises(netns.NetnsError, match="embedded null"):
        netns.check_netns("/var/run/netns/\0x")
