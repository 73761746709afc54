"""mesh-cni: the chained CNI plugin. Tells the node agent about pod sandboxes, nothing else.

The container runtime runs it once per pod network operation (CNI spec 1.0): the command and pod
coordinates in `CNI_*` environment variables, the network config (with the previous plugin's
result, `prevResult`) on stdin. It POSTs one JSON event to the agent's Unix socket and prints the
result, or a CNI error `{"cniVersion", "code", "msg", "details"}` and exits 1.

Failure policy:
- ADD fails closed: the pod must not start uncaptured, so any failure (agent unreachable:
  code 11 "try again later"; agent refusal: code 100 with the agent's message) fails the ADD and
  the runtime retries.
- DEL never fails on the agent's account: DEL must be idempotent and succeed when state is
  missing; problems are logged to stderr.
- A sandbox that is not a Kubernetes pod (no K8S_POD_NAME/K8S_POD_NAMESPACE in CNI_ARGS) is
  passed through without calling the agent, as istio-cni does: no mesh policy can name it.

Standard library only, and no imports from the rest of the project: this runs on every pod start.
The work is split as parse (`parse_invocation`, pure), plan (`build_event`, pure), act (`run`).
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TextIO

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")
DEFAULT_TIMEOUT = 10.0
# A network configuration with its prevResult is a few KiB; a runtime never sends megabytes.
MAX_CONFIG_BYTES = 1 << 20
AGENT_HOST = "agent"  # the Host header; the socket path is what matters

# CNI spec error codes.
ERR_INCOMPATIBLE_VERSION = 1
ERR_INVALID_ENV = 4
ERR_DECODE = 6
ERR_INVALID_CONFIG = 7
ERR_TRY_AGAIN = 11
ERR_NOT_AVAILABLE = 50
ERR_PLUGIN = 100

COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS")


class CniError(Exception):
    """Becomes the CNI error object on stdout (and exit status 1)."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(f"{msg}: {details}" if details else msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, cni_version: str) -> dict[str, Any]:
        return {
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        }


@dataclass(frozen=True)
class NetConf:
    cni_version: str
    name: str
    agent_socket: str
    timeout: float
    prev_result: Mapping[str, Any] | None


@dataclass(frozen=True)
class Invocation:
    command: str
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    # K8S_* values from CNI_ARGS.
    args: Mapping[str, str] = field(default_factory=dict)
    conf: NetConf | None = None

    @property
    def is_kubernetes_pod(self) -> bool:
        return bool(self.args.get("K8S_POD_NAME") and self.args.get("K8S_POD_NAMESPACE"))


def _parse_cni_args(raw: str) -> dict[str, str]:
    args: dict[str, str] = {}
    for pair in raw.split(";"):
        if not pair:
            continue
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CniError(ERR_INVALID_ENV, "invalid CNI_ARGS", f"pair {pair!r} is not KEY=VALUE")
        args[key] = value
    return args


def _require_env(env: Mapping[str, str], name: str, command: str) -> str:
    value = env.get(name, "")
    if not value:
        raise CniError(ERR_INVALID_ENV, f"{name} is required for {command}", f"{name} is not set")
    return value


def _parse_conf(stdin: bytes, command: str) -> NetConf:
    try:
        raw = json.loads(stdin.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CniError(ERR_DECODE, "failed to decode network configuration", str(exc)) from None
    if not isinstance(raw, dict):
        raise CniError(
            ERR_DECODE, "failed to decode network configuration", "stdin is not a JSON object"
        )
    version = raw.get("cniVersion")
    if version is None or version == "":
        raise CniError(ERR_INVALID_CONFIG, "invalid network configuration", "cniVersion is missing")
    if not isinstance(version, str):
        raise CniError(
            ERR_INVALID_CONFIG,
            "invalid network configuration",
            f"cniVersion must be a string, got {json.dumps(version)[:32]}",
        )
    if version not in SUPPORTED_VERSIONS:
        raise CniError(
            ERR_INCOMPATIBLE_VERSION,
            "incompatible CNI version",
            f"cniVersion {version!r} is not one of {', '.join(SUPPORTED_VERSIONS)}",
        )
    name = raw.get("name", "")
    if not isinstance(name, str):
        raise CniError(ERR_INVALID_CONFIG, "invalid network configuration", "name must be a string")
    agent_socket = raw.get("agentSocket")
    if not isinstance(agent_socket, str) or not agent_socket:
        raise CniError(
            ERR_INVALID_CONFIG,
            "invalid network configuration",
            "agentSocket (path of the node agent's event socket) is missing",
        )
    timeout = raw.get("timeoutSeconds", DEFAULT_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout < 3600:
        raise CniError(
            ERR_INVALID_CONFIG,
            "invalid network configuration",
            f"timeoutSeconds must be a number of seconds in (0, 3600), got {timeout!r}",
        )
    prev = raw.get("prevResult")
    if prev is not None and not isinstance(prev, dict):
        raise CniError(
            ERR_INVALID_CONFIG, "invalid network configuration", "prevResult must be an object"
        )
    if command == "ADD" and prev is None:
        raise CniError(
            ERR_INVALID_CONFIG,
            "invalid network configuration",
            "prevResult is missing: mesh-cni is a chained plugin and must follow one that "
            "creates the interface",
        )
    return NetConf(version, name, agent_socket, float(timeout), prev)


def parse_invocation(env: Mapping[str, str], stdin: bytes) -> Invocation:
    """Everything the runtime told us, validated. Raises CniError only."""
    command = env.get("CNI_COMMAND", "")
    if not command:
        raise CniError(ERR_INVALID_ENV, "CNI_COMMAND is required", "CNI_COMMAND is not set")
    if command not in COMMANDS:
        raise CniError(
            ERR_INVALID_ENV,
            "unknown CNI_COMMAND",
            f"CNI_COMMAND {command[:64]!r} is not one of {', '.join(COMMANDS)}",
        )
    if command == "VERSION":
        return Invocation(command)
    conf = _parse_conf(stdin, command)
    if command == "STATUS":
        return Invocation(command, conf=conf)
    container_id = _require_env(env, "CNI_CONTAINERID", command)
    ifname = _require_env(env, "CNI_IFNAME", command)
    # DEL may come without a netns (the sandbox is already gone).
    netns = (
        env.get("CNI_NETNS", "") if command == "DEL" else _require_env(env, "CNI_NETNS", command)
    )
    args = {
        k: v for k, v in _parse_cni_args(env.get("CNI_ARGS", "")).items() if k.startswith("K8S_")
    }
    return Invocation(command, container_id, netns, ifname, args, conf)


def _prev_result_ips(prev: Mapping[str, Any] | None) -> list[str]:
    if prev is None:
        return []
    ips = prev.get("ips", [])
    if not isinstance(ips, list):
        raise CniError(ERR_INVALID_CONFIG, "invalid prevResult", "prevResult.ips must be a list")
    found: list[str] = []
    for i, entry in enumerate(ips):
        address = entry.get("address") if isinstance(entry, dict) else None
        if not isinstance(address, str):
            raise CniError(
                ERR_INVALID_CONFIG, "invalid prevResult", f"prevResult.ips[{i}].address is missing"
            )
        try:
            found.append(str(ipaddress.ip_interface(address).ip))
        except ValueError:
            raise CniError(
                ERR_INVALID_CONFIG,
                "invalid prevResult",
                f"prevResult.ips[{i}].address {address[:64]!r} is not an address/prefix",
            ) from None
    return found


def build_event(inv: Invocation) -> dict[str, Any] | None:
    """The JSON body to POST to the agent's /cmd, or None when the agent is not involved."""
    if inv.command not in ("ADD", "DEL", "CHECK") or not inv.is_kubernetes_pod:
        return None
    assert inv.conf is not None  # parse_invocation always sets it for these commands
    event: dict[str, Any] = {
        "cmd": inv.command.lower(),
        "containerId": inv.container_id,
        "netns": inv.netns,
        "ifname": inv.ifname,
        "podName": inv.args.get("K8S_POD_NAME", ""),
        "podNamespace": inv.args.get("K8S_POD_NAMESPACE", ""),
        "podUid": inv.args.get("K8S_POD_UID", ""),
    }
    if inv.command != "DEL":
        event["ips"] = _prev_result_ips(inv.conf.prev_result)
    return event


# --- talking to the agent ----------------------------------------------------------------------


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__(AGENT_HOST, timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


@dataclass(frozen=True)
class AgentReply:
    status: int
    body: bytes


# (method, path, JSON body or None) -> reply. Raises OSError when the agent cannot be reached.
AgentCall = Callable[[str, str, "dict[str, Any] | None"], AgentReply]


def unix_agent(socket_path: str, timeout: float) -> AgentCall:
    def call(method: str, path: str, body: dict[str, Any] | None) -> AgentReply:
        conn = _UnixHTTPConnection(socket_path, timeout)
        try:
            payload = None if body is None else json.dumps(body).encode()
            headers = {"content-type": "application/json"} if payload is not None else {}
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            return AgentReply(response.status, response.read(64 * 1024))
        except http.client.HTTPException as exc:
            raise OSError(f"bad HTTP exchange with the agent: {exc!r}") from exc
        finally:
            conn.close()

    return call


def _agent_message(reply: AgentReply) -> str:
    try:
        decoded = json.loads(reply.body)
    except (ValueError, RecursionError):
        decoded = None
    if isinstance(decoded, dict) and isinstance(decoded.get("error"), str):
        return str(decoded["error"])
    return reply.body.decode("utf-8", "replace")[:500] or f"HTTP {reply.status}"


def _post(agent: AgentCall, inv: Invocation, event: dict[str, Any]) -> None:
    assert inv.conf is not None
    pod = f"{event['podNamespace']}/{event['podName']}"
    try:
        reply = agent("POST", "/cmd", event)
    except OSError as exc:
        raise CniError(
            ERR_TRY_AGAIN,
            f"node agent unreachable for {inv.command} of pod {pod}",
            f"{inv.conf.agent_socket}: {str(exc) or type(exc).__name__}",
        ) from None
    if reply.status != 200:
        raise CniError(
            ERR_PLUGIN,
            f"node agent refused {inv.command} of pod {pod}",
            _agent_message(reply),
        )


def execute(inv: Invocation, agent: AgentCall, stderr: TextIO) -> str:
    """Carry out the invocation; returns what to print on stdout. Raises CniError."""
    if inv.command == "VERSION":
        return json.dumps(
            {"cniVersion": SUPPORTED_VERSIONS[-1], "supportedVersions": list(SUPPORTED_VERSIONS)}
        )
    conf = inv.conf
    assert conf is not None
    if inv.command == "STATUS":
        try:
            reply = agent("GET", "/healthz", None)
        except OSError as exc:
            raise CniError(
                ERR_NOT_AVAILABLE, "node agent not available", f"{conf.agent_socket}: {exc}"
            ) from None
        if reply.status != 200:
            raise CniError(ERR_NOT_AVAILABLE, "node agent not healthy", _agent_message(reply))
        return ""
    event = build_event(inv)
    if event is None:
        print(
            f"mesh-cni: {inv.command} {inv.container_id}: not a Kubernetes pod; passing through",
            file=stderr,
        )
    elif inv.command == "DEL":
        try:
            _post(agent, inv, event)
        except CniError as exc:
            # DEL must succeed even when the agent is down or has no state for the pod.
            print(f"mesh-cni: DEL {inv.container_id}: ignoring: {exc}", file=stderr)
    else:
        _post(agent, inv, event)
    if inv.command == "ADD":
        return json.dumps({**(conf.prev_result or {}), "cniVersion": conf.cni_version})
    return ""


def run(
    env: Mapping[str, str],
    stdin: BinaryIO,
    stdout: TextIO,
    stderr: TextIO,
    agent_factory: Callable[[str, float], AgentCall] = unix_agent,
) -> int:
    """The whole plugin; returns the exit status."""
    cni_version = SUPPORTED_VERSIONS[-1]
    try:
        data = b"" if env.get("CNI_COMMAND") == "VERSION" else stdin.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise CniError(
                ERR_DECODE,
                "failed to decode network configuration",
                f"stdin is larger than {MAX_CONFIG_BYTES} bytes",
            )
        inv = parse_invocation(env, data)
        if inv.conf is not None:
            cni_version = inv.conf.cni_version
            agent = agent_factory(inv.conf.agent_socket, inv.conf.timeout)
        else:
            agent = agent_factory("", DEFAULT_TIMEOUT)
        output = execute(inv, agent, stderr)
    except CniError as exc:
        print(f"mesh-cni: {exc}", file=stderr)
        stdout.write(json.dumps(exc.to_json(cni_version)) + "\n")
        return 1
    if output:
        stdout.write(output + "\n")
    return 0


def main() -> None:
    sys.exit(run(os.environ, sys.stdin.buffer, sys.stdout, sys.stderr))
