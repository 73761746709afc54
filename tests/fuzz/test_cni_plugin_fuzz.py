"""mesh-cni's parsing on arbitrary input, in-process: only CniError may come out."""

from __future__ import annotations

import io
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from cni.plugin import main as plugin

_COMMANDS = st.sampled_from(["ADD", "DEL", "CHECK", "VERSION", "STATUS", "", "add", "FROB"])
_ENV_VALUES = st.one_of(st.none(), st.text(max_size=40))
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)


@st.composite
def _confs(draw: st.DrawFn) -> bytes:
    """Mostly plausible network configs with random holes and wrong types."""
    conf: dict[str, Any] = {
        "cniVersion": draw(st.sampled_from(["1.0.0", "0.4.0", "0.3.1", "0.1.0", ""]) | _json),
        "name": draw(st.text(max_size=10) | _json),
        "type": "mesh-cni",
        "agentSocket": draw(st.just("/nonexistent/cni.sock") | _json),
        "prevResult": draw(
            st.fixed_dictionaries(
                {"ips": st.lists(st.fixed_dictionaries({"address": _json}), max_size=3) | _json}
            )
            | _json
        ),
    }
    for key in draw(st.lists(st.sampled_from(sorted(conf)), max_size=3)):
        conf.pop(key, None)
    if draw(st.booleans()):
        conf["timeoutSeconds"] = draw(_json)
    return json.dumps(conf).encode()


_stdin = st.one_of(st.binary(max_size=300), _confs(), _json.map(lambda v: json.dumps(v).encode()))


@st.composite
def _envs(draw: st.DrawFn) -> dict[str, str]:
    env = {"CNI_COMMAND": draw(_COMMANDS)}
    for name in ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS"):
        value = draw(_ENV_VALUES)
        if value is not None:
            env[name] = value
    if draw(st.booleans()):
        env["CNI_ARGS"] = "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web"
    return env


@settings(max_examples=500)
@given(_envs(), _stdin)
def test_parsing_raises_only_cni_errors(env: dict[str, str], stdin: bytes) -> None:
    error: plugin.CniError | None = None
    event: dict[str, Any] | None = None
    try:
        event = plugin.build_event(plugin.parse_invocation(env, stdin))
    except plugin.CniError as exc:
        error = exc
    if error is not None:
        assert error.code in (1, 4, 6, 7)
        assert error.msg
    elif event is not None:
        json.dumps(event)  # what would be POSTed is plain JSON
        assert event["cmd"] in ("add", "del", "check")


def _unreachable(socket_path: str, timeout: float) -> plugin.AgentCall:
    def call(method: str, path: str, body: dict[str, Any] | None) -> plugin.AgentReply:
        raise ConnectionRefusedError(f"nothing listens on {socket_path}")

    return call


@settings(max_examples=300)
@given(_envs(), _stdin)
def test_run_always_prints_a_result_or_a_cni_error(env: dict[str, str], stdin: bytes) -> None:
    out, err = io.StringIO(), io.StringIO()
    status = plugin.run(env, io.BytesIO(stdin), out, err, agent_factory=_unreachable)
    printed = out.getvalue()
    if status == 0:
        assert printed == "" or isinstance(json.loads(printed), dict)
    else:
        assert status == 1
        error = json.loads(printed)
        assert set(error) == {"cniVersion", "code", "msg", "details"}
