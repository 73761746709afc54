from __future__ import annotations

import io

import pytest

from meshctl import cli
from meshctl.playground import control, paths, supervisor, topology


def run(*argv: str, env: dict[str, str] | None = None, stdin: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.run(list(argv), env or {}, out, err, io.StringIO(stdin))
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize(
    ("argv", "front", "command"),
    [
        pytest.param(
            ["exec", "-n", "shop", "client", "--", "curl", "-s", "http://x/--"],
            ["exec", "-n", "shop", "client"],
            ["curl", "-s", "http://x/--"],
            id="command-after-dashes",
        ),
        pytest.param(["get", "pods"], ["get", "pods"], [], id="no-dashes"),
        pytest.param(["exec", "p", "--"], ["exec", "p"], [], id="empty-command"),
    ],
)
def test_split_exec_command(argv: list[str], front: list[str], command: list[str]) -> None:
    assert cli.split_exec_command(argv) == (front, command)


def test_usage_errors_exit_2_without_traceback() -> None:
    code, _, err = run("get")
    assert code == 2
    assert "Traceback" not in err
    code, _, err = run("--state-dir", "/nonexistent", "exec", "-n", "shop", "client")
    assert code == 2
    assert err == "error: you must specify the command after --: meshctl exec POD -- CMD\n"


def test_commands_need_a_running_playground(tmp_path: object) -> None:
    state = str(tmp_path)
    code, _, err = run("--state-dir", state, "get", "foo")
    # No playground: the API check comes first and says how to start one.
    assert code == 1
    assert err.startswith(f"error: no playground is running in {state}")
    assert "meshctl up" in err


def test_state_dir_from_environment(tmp_path: object) -> None:
    code, _, err = run("get", "pods", env={"MESH_STATE_DIR": str(tmp_path)})
    assert code == 1
    assert f"no playground is running in {tmp_path}" in err


def test_status_without_playground(tmp_path: object) -> None:
    code, _, err = run("--state-dir", str(tmp_path), "status")
    assert code == 1
    assert err == f"error: no playground is running (nothing recorded in {tmp_path})\n"


def test_apply_unreadable_file(tmp_path: object) -> None:
    code, _, err = run("--state-dir", str(tmp_path), "apply", "-f", "/nonexistent.yaml")
    assert code == 1
    assert err.startswith('error: the path "/nonexistent.yaml" cannot be read')


def test_state_dir_too_long_for_unix_sockets() -> None:
    long_dir = "/tmp/" + "x" * 90
    with pytest.raises(Exception, match="too long"):
        paths.Paths(long_dir).check_socket_lengths(["node1"])


def test_supervisor_component_environment_contract() -> None:
    config = supervisor.Config.from_args(
        ["--state-dir", "/tmp/mt-abc", "--nodes", "2", "--prefix", "mt1"], {"PATH": "/usr/bin"}
    )
    where = paths.Paths(config.state_dir)
    controller = supervisor.build_controller_spec(config, where)
    assert controller.netns is None
    assert controller.env["LOCAL_API_SOCKET"] == "/tmp/mt-abc/controller/api.sock"
    assert controller.env["XDS_LISTEN"] == "unix:///tmp/mt-abc/controller/xds.sock"
    assert controller.env["CONTROLLER_STATE_DIR"] == "/tmp/mt-abc/controller"
    node = topology.build_node_record("mt1", "node2", 1, topology.DEFAULT_SUBNET)
    agent, zt, kubelet = supervisor.build_node_specs(config, where, node)
    assert {agent.netns, zt.netns, kubelet.netns} == {"mt1-node2"}
    assert agent.env["CNI_EVENT_UDS"] == "/tmp/mt-abc/nodes/node2/cni.sock"
    assert agent.env["ZTUNNEL_UDS"] == zt.env["INPOD_UDS"] == "/tmp/mt-abc/nodes/node2/ztunnel.sock"
    assert zt.env["XDS_TOKEN_FILE"] == "/tmp/mt-abc/nodes/node2/token"
    assert zt.env["INSTANCE_IP"] == "172.30.0.11"
    assert kubelet.env["POD_CIDR"] == "10.244.1.0/24"
    assert kubelet.env["NETNS_PREFIX"] == "mt1"
    assert (
        kubelet.env["KUBE_API"] == agent.env["KUBE_API"] == "unix:///tmp/mt-abc/controller/api.sock"
    )
    assert kubelet.log == "/tmp/mt-abc/nodes/node2/kubelet.log"
    assert all(s.env["PATH"].endswith(":/usr/bin") for s in (controller, agent, zt, kubelet))
    assert agent.env["REDIRECT_MODE"] == "iptables"


def test_redirect_mode_goes_from_meshctl_up_to_every_node_agent() -> None:
    args = cli.build_parser({}).parse_args(["up", "--redirect-mode", "ebpf"])
    assert args.redirect_mode == "ebpf"
    assert cli.build_parser({}).parse_args(["up"]).redirect_mode == "iptables"
    opts = control.UpOptions(
        state_dir="/tmp/mt-abc",
        nodes=1,
        prefix="mt1",
        host_access=False,
        timeout=60,
        redirect_mode="ebpf",
    )
    argv = control.build_supervisor_argv(opts)
    config = supervisor.Config.from_args(argv[3:], {"PATH": "/usr/bin"})
    node = topology.build_node_record("mt1", "node1", 0, topology.DEFAULT_SUBNET)
    agent, _, _ = supervisor.build_node_specs(config, paths.Paths(config.state_dir), node)
    assert agent.env["REDIRECT_MODE"] == "ebpf"
    # Each node's agent pins its map in a bpf filesystem of its own (mounted by the supervisor).
    assert agent.env["BPF_PIN_DIR"] == "/tmp/mt-abc/nodes/node1/bpf"


def test_an_unknown_redirect_mode_is_a_usage_error() -> None:
    with pytest.raises(SystemExit):
        cli.build_parser({}).parse_args(["up", "--redirect-mode", "tproxy"])


@pytest.mark.parametrize(
    ("failures", "delay"),
    [
        pytest.param(0, 0.0, id="first-crash"),
        pytest.param(2, 4.0, id="third"),
        pytest.param(9, 30.0, id="cap"),
    ],
)
def test_restart_delay(failures: int, delay: float) -> None:
    assert supervisor.restart_delay(failures) == delay


def test_supervisor_argv_from_up_options() -> None:
    argv = control.build_supervisor_argv(
        control.UpOptions(state_dir="/s", nodes=2, prefix="p", host_access=False, timeout=60)
    )
    assert argv[1:3] == ["-m", "meshctl.playground.supervisor"]
    assert argv[argv.index("--nodes") + 1] == "2"
    assert "--host-access" not in argv


def test_check_usage_errors_come_before_any_api_call() -> None:
    code, _, err = run("--state-dir", "/nonexistent", "check", "-n", "shop", "client", "server")
    assert code == 2
    assert "must be NAME:PORT" in err
    code, _, err = run("--state-dir", "/nonexistent", "check", "client", "deploy/web:80")
    assert code == 2
    assert "use pod/NAME or svc/NAME" in err


def test_up_max_pods_reaches_the_options() -> None:
    args = cli.build_parser({}).parse_args(["up", "--max-pods", "5"])
    assert args.max_pods == 5
    assert cli.build_parser({}).parse_args(["up"]).max_pods == 110
