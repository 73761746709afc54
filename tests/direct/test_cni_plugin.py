"""mesh-cni as the runtime runs it (a subprocess) against a real PluginEventServer in-process."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from cni.agent import plugin_server

NETNS = "/var/run/netns/cni-test-pod"
CNI_ARGS = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1;K8S_POD_UID=0b1d-uid"
PREV_RESULT: dict[str, Any] = {
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "eth0", "mac": "0a:58:0a:f4:00:05", "sandbox": NETNS}],
    "ips": [{"address": "10.244.0.5/24", "gateway": "10.244.0.1", "interface": 0}],
    "routes": [{"dst": "0.0.0.0/0"}],
    "dns": {},
}
DEADLINE = 20.0


def plugin_argv() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "mesh-cni")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "cni.plugin"]


@dataclass
class RecordingEvents:
    """A PluginEventHandler that records events; `refuse` makes on_add raise with that text."""

    refuse: str = ""
    events: list[object] = field(default_factory=list)
    release: asyncio.Event | None = None  # when set, on_add waits for it (to provoke a timeout)

    async def on_add(self, event: plugin_server.PodAddEvent) -> None:
        self.events.append(event)
        if self.release is not None:
            await self.release.wait()
        if self.refuse:
            raise RuntimeError(self.refuse)

    async def on_del(self, event: plugin_server.PodDelEvent) -> None:
        self.events.append(event)

    async def on_check(self, event: plugin_server.PodCheckEvent) -> None:
        self.events.append(event)


@dataclass(frozen=True)
class Outcome:
    status: int
    stdout: str
    stderr: str

    @property
    def json(self) -> Any:
        return json.loads(self.stdout)


@pytest.fixture
def sock_dir() -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix="mt-cni-", dir="/tmp")
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def conf(agent_socket: str, **extra: Any) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "mesh-cni",
        "agentSocket": agent_socket,
        "prevResult": PREV_RESULT,
        **extra,
    }


async def run_plugin(command: str, stdin: bytes | dict[str, Any], **env: str) -> Outcome:
    full_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "c0ffee",
        "CNI_NETNS": NETNS,
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": CNI_ARGS,
        "CNI_PATH": "/usr/lib/cni",
    }
    full_env.update(env)
    for key in [k for k, v in full_env.items() if v == ""]:
        del full_env[key]
    data = stdin if isinstance(stdin, bytes) else json.dumps(stdin).encode()
    proc = await asyncio.create_subprocess_exec(
        *plugin_argv(),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=full_env,
    )
    async with asyncio.timeout(DEADLINE):
        out, err = await proc.communicate(data)
    assert proc.returncode is not None
    return Outcome(proc.returncode, out.decode(), err.decode())


def run_with_server(sock_dir: str, handler: RecordingEvents, test: Any) -> None:
    path = os.path.join(sock_dir, "cni.sock")

    async def main() -> None:
        server = plugin_server.PluginEventServer(path, handler)
        await server.start()
        try:
            await test(path)
        finally:
            if handler.release is not None:
                handler.release.set()
            await server.close()
        assert asyncio.all_tasks() == {asyncio.current_task()}

    asyncio.run(main())
    assert not os.path.exists(path)  # close() removed its socket file


def assert_cni_error(outcome: Outcome, code: int, *fragments: str) -> None:
    assert outcome.status == 1, outcome
    error = outcome.json
    assert error["code"] == code, error
    assert set(error) == {"cniVersion", "code", "msg", "details"}
    text = f"{error['msg']}: {error['details']}"
    for fragment in fragments:
        assert fragment in text, error


def test_add_passes_prev_result_through_and_tells_the_agent(sock_dir: str) -> None:
    handler = RecordingEvents()

    async def test(path: str) -> None:
        assert os.stat(path).st_mode & 0o777 == 0o600
        outcome = await run_plugin("ADD", conf(path))
        assert outcome.status == 0, outcome
        assert outcome.json == PREV_RESULT
        older = await run_plugin("ADD", conf(path, cniVersion="0.4.0"))
        assert older.json == {**PREV_RESULT, "cniVersion": "0.4.0"}

    run_with_server(sock_dir, handler, test)
    expected = plugin_server.PodAddEvent(
        container_id="c0ffee",
        netns=NETNS,
        ifname="eth0",
        pod_name="web-1",
        pod_namespace="shop",
        pod_uid="0b1d-uid",
        ips=("10.244.0.5",),
    )
    assert handler.events == [expected, expected]


def test_agent_refusal_fails_the_add_with_its_message(sock_dir: str) -> None:
    handler = RecordingEvents(refuse="no ztunnel connection")

    async def test(path: str) -> None:
        outcome = await run_plugin("ADD", conf(path))
        assert_cni_error(outcome, 100, "shop/web-1", "no ztunnel connection")

    run_with_server(sock_dir, handler, test)


def test_agent_too_slow_is_try_again_later(sock_dir: str) -> None:
    handler = RecordingEvents(release=asyncio.Event())

    async def test(path: str) -> None:
        outcome = await run_plugin("ADD", conf(path, timeoutSeconds=0.5))
        assert_cni_error(outcome, 11, "unreachable", "timed out")

    run_with_server(sock_dir, handler, test)


def test_del_and_check_reach_the_agent(sock_dir: str) -> None:
    handler = RecordingEvents()

    async def test(path: str) -> None:
        deleted = await run_plugin("DEL", conf(path), CNI_NETNS="")
        assert (deleted.status, deleted.stdout) == (0, "")
        checked = await run_plugin("CHECK", conf(path))
        assert (checked.status, checked.stdout) == (0, "")
        status = await run_plugin("STATUS", conf(path))
        assert (status.status, status.stdout) == (0, "")

    run_with_server(sock_dir, handler, test)
    assert handler.events == [
        plugin_server.PodDelEvent("c0ffee", "", "eth0", "web-1", "shop", "0b1d-uid"),
        plugin_server.PodCheckEvent(
            "c0ffee", NETNS, "eth0", "web-1", "shop", "0b1d-uid", ("10.244.0.5",)
        ),
    ]


def test_not_a_kubernetes_pod_is_passed_through(sock_dir: str) -> None:
    handler = RecordingEvents()

    async def test(path: str) -> None:
        outcome = await run_plugin("ADD", conf(path), CNI_ARGS="IgnoreUnknown=1")
        assert outcome.status == 0, outcome
        assert outcome.json == PREV_RESULT
        assert "not a Kubernetes pod" in outcome.stderr

    run_with_server(sock_dir, handler, test)
    assert handler.events == []


def test_without_an_agent(sock_dir: str) -> None:
    missing = os.path.join(sock_dir, "missing.sock")

    async def test() -> None:
        add = await run_plugin("ADD", conf(missing))
        assert_cni_error(add, 11, "unreachable", missing)
        # DEL must succeed when state (or the agent) is missing; it only logs.
        deleted = await run_plugin("DEL", conf(missing))
        assert (deleted.status, deleted.stdout) == (0, "")
        assert "ignoring" in deleted.stderr
        status = await run_plugin("STATUS", conf(missing))
        assert_cni_error(status, 50, "not available")

    asyncio.run(test())


@pytest.mark.parametrize(
    ("command", "stdin", "env", "code", "fragment"),
    [
        pytest.param("ADD", b"{not json", {}, 6, "decode", id="malformed-json"),
        pytest.param("ADD", b"[1, 2]", {}, 6, "not a JSON object", id="not-an-object"),
        pytest.param("ADD", b"\xff\xfe", {}, 6, "decode", id="not-utf8"),
        pytest.param("ADD", b" " * (2 << 20), {}, 6, "larger than 1048576", id="huge-stdin"),
        pytest.param("ADD", None, {"CNI_NETNS": ""}, 4, "CNI_NETNS", id="missing-netns"),
        pytest.param("ADD", None, {"CNI_CONTAINERID": ""}, 4, "CNI_CONTAINERID", id="no-id"),
        pytest.param("DEL", None, {"CNI_IFNAME": ""}, 4, "CNI_IFNAME", id="del-no-ifname"),
        pytest.param("ADD", None, {"CNI_ARGS": "K8S_POD_NAME"}, 4, "CNI_ARGS", id="bad-args"),
        pytest.param("FROB", None, {}, 4, "FROB", id="unknown-command"),
        pytest.param("", None, {}, 4, "CNI_COMMAND", id="missing-command"),
    ],
)
def test_invalid_invocations(
    sock_dir: str,
    command: str,
    stdin: bytes | None,
    env: dict[str, str],
    code: int,
    fragment: str,
) -> None:
    body: bytes | dict[str, Any] = stdin if stdin is not None else conf(sock_dir + "/x.sock")
    outcome = asyncio.run(run_plugin(command, body, **env))
    assert_cni_error(outcome, code, fragment)


@pytest.mark.parametrize(
    ("changes", "code", "fragment"),
    [
        pytest.param({"prevResult": None}, 7, "prevResult", id="no-prev-result"),
        pytest.param({"agentSocket": None}, 7, "agentSocket", id="no-agent-socket"),
        pytest.param({"cniVersion": "2.0.0"}, 1, "2.0.0", id="unsupported-version"),
        pytest.param({"cniVersion": 1}, 7, "cniVersion must be a string, got 1", id="number"),
        pytest.param({"cniVersion": None}, 7, "cniVersion is missing", id="no-version"),
        pytest.param({"timeoutSeconds": "soon"}, 7, "timeoutSeconds", id="bad-timeout"),
        pytest.param(
            {"prevResult": {"ips": [{"address": "10.0.0.300/24"}]}},
            7,
            "prevResult.ips[0].address",
            id="bad-prev-result-address",
        ),
    ],
)
def test_invalid_network_config(
    sock_dir: str, changes: dict[str, Any], code: int, fragment: str
) -> None:
    body = conf(sock_dir + "/x.sock")
    for key, value in changes.items():
        if value is None:
            del body[key]
        else:
            body[key] = value
    assert_cni_error(asyncio.run(run_plugin("ADD", body)), code, fragment)


def test_version() -> None:
    outcome = asyncio.run(run_plugin("VERSION", b'{"cniVersion": "1.0.0"}'))
    assert outcome.status == 0
    assert outcome.json == {
        "cniVersion": "1.0.0",
        "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"],
    }


async def http_exchange(path: str, request: bytes) -> tuple[int, dict[str, Any]]:
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(DEADLINE):
            raw = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_event_server_rejects_malformed_requests(sock_dir: str) -> None:
    handler = RecordingEvents()

    def post(body: bytes) -> bytes:
        return (
            b"POST /cmd HTTP/1.1\r\nhost: agent\r\nconnection: close\r\n"
            + f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )

    async def test(path: str) -> None:
        status, reply = await http_exchange(path, post(b'{"cmd": "add", "netns": "/x"}'))
        assert (status, reply) == (400, {"error": "containerId: required"})
        status, reply = await http_exchange(
            path,
            post(
                b'{"cmd": "add", "containerId": "c", "netns": "/x", "podName": "p", '
                b'"podNamespace": "n", "ips": ["nope"]}'
            ),
        )
        assert (status, reply) == (400, {"error": "ips[0]: 'nope' is not an IP address"})
        status, reply = await http_exchange(path, post(b'{"cmd": "reboot"}'))
        assert status == 400
        assert "cmd" in reply["error"]
        status, reply = await http_exchange(path, b"garbage\r\n\r\n")
        assert status == 400
        status, reply = await http_exchange(
            path, b"GET /healthz HTTP/1.1\r\nhost: agent\r\nconnection: close\r\n\r\n"
        )
        assert (status, reply) == (200, {})
        status, _ = await http_exchange(
            path, b"GET /cmd HTTP/1.1\r\nhost: agent\r\nconnection: close\r\n\r\n"
        )
        assert status == 405

    run_with_server(sock_dir, handler, test)
    assert handler.events == []
