from __future__ import annotations

import json

import pytest

from meshctl.playground import cni_runtime

RT = cni_runtime.RuntimeConf(
    container_id="uid-1",
    netns="/var/run/netns/mt1-p-uid1",
    pod_namespace="shop",
    pod_name="web",
    pod_uid="uid-1",
)


def test_env_follows_the_spec() -> None:
    env = cni_runtime.build_env("ADD", RT, ["/usr/lib/cni", "/venv/bin"])
    assert env["CNI_COMMAND"] == "ADD"
    assert env["CNI_CONTAINERID"] == "uid-1"
    assert env["CNI_NETNS"] == "/var/run/netns/mt1-p-uid1"
    assert env["CNI_IFNAME"] == "eth0"
    assert env["CNI_PATH"] == "/usr/lib/cni:/venv/bin"
    assert env["CNI_ARGS"] == (
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web;"
        "K8S_POD_INFRA_CONTAINER_ID=uid-1;K8S_POD_UID=uid-1"
    )


def test_plugin_input_carries_name_version_and_prev_result() -> None:
    conflist = cni_runtime.build_playground_conflist("/state/nodes/node1", "10.244.0.0/24")
    bridge, mesh = conflist.plugins
    first = json.loads(cni_runtime.build_plugin_input(conflist, bridge, None))
    assert first["name"] == "playground"
    assert first["cniVersion"] == "1.0.0"
    assert "prevResult" not in first
    assert first["ipam"]["ranges"] == [[{"subnet": "10.244.0.0/24"}]]
    assert first["ipam"]["dataDir"] == "/state/nodes/node1/cni/networks"
    second = json.loads(cni_runtime.build_plugin_input(conflist, mesh, {"ips": []}))
    assert second["type"] == "mesh-cni"
    assert second["agentSocket"] == "/state/nodes/node1/cni.sock"
    assert second["prevResult"] == {"ips": []}


@pytest.mark.parametrize(
    ("returncode", "stdout", "stderr", "code", "msg", "details"),
    [
        pytest.param(
            1,
            b'{"cniVersion":"1.0.0","code":11,"msg":"node agent unreachable","details":"x.sock"}',
            b"",
            11,
            "node agent unreachable",
            "x.sock",
            id="spec-error-object",
        ),
        pytest.param(
            1, b'{"code":7,"msg":"bad config"}', b"", 7, "bad config", "", id="no-details"
        ),
        pytest.param(
            2,
            b"panic: boom",
            b"goroutine 1",
            0,
            "exited with status 2",
            "goroutine 1",
            id="no-json-uses-stderr",
        ),
        pytest.param(1, b"", b"", 0, "exited with status 1", "", id="silent"),
    ],
)
def test_plugin_errors_are_parsed(
    returncode: int, stdout: bytes, stderr: bytes, code: int, msg: str, details: str
) -> None:
    with pytest.raises(cni_runtime.CniError) as info:
        cni_runtime.parse_plugin_output("mesh-cni", "ADD", returncode, stdout, stderr)
    err = info.value
    assert (err.code, err.msg, err.plugin, err.details) == (code, msg, "mesh-cni", details)


def test_add_result_must_be_json_object() -> None:
    with pytest.raises(cni_runtime.CniError) as info:
        cni_runtime.parse_plugin_output("bridge", "ADD", 0, b"[]", b"")
    assert info.value.code == cni_runtime.CODE_DECODE
    assert cni_runtime.parse_plugin_output("bridge", "DEL", 0, b"", b"") is None


@pytest.mark.parametrize(
    ("result", "ip"),
    [
        pytest.param({"ips": [{"address": "10.244.0.5/24"}]}, "10.244.0.5", id="v4"),
        pytest.param(
            {"ips": [{"address": "fd00::5/64"}, {"address": "10.244.0.6/24"}]},
            "10.244.0.6",
            id="v6-first",
        ),
        pytest.param({}, None, id="none"),
    ],
)
def test_find_ip(result: dict[str, object], ip: str | None) -> None:
    assert cni_runtime.find_ip(result) == ip


def test_find_plugin_reports_search_path(tmp_path: object) -> None:
    with pytest.raises(cni_runtime.CniError, match='failed to find plugin "nope" in path'):
        cni_runtime.find_plugin("nope", [str(tmp_path)])
    with pytest.raises(cni_runtime.CniError, match="invalid plugin type"):
        cni_runtime.find_plugin("../bridge", ["/usr/lib/cni"])


def test_conflist_validation() -> None:
    with pytest.raises(cni_runtime.CniError, match="no plugins"):
        cni_runtime.NetworkConfigList.from_dict({"name": "x", "plugins": []})
    with pytest.raises(cni_runtime.CniError, match=r"plugins\[1\].type: Required value"):
        cni_runtime.NetworkConfigList.from_dict({"plugins": [{"type": "bridge"}, {}]})
