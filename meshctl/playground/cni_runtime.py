"""A small libcni: run a CNI plugin chain (ADD in order, DEL in reverse, CHECK) the way
container runtimes do, per the CNI 1.0 specification.

The pure parts (`build_plugin_input`, `build_env`, `parse_plugin_output`, `find_plugin`,
`build_playground_conflist`) decide what to run; `CniRuntime` runs it. ADD results are cached
on disk (like libcni's ``/var/lib/cni/results``) because DEL and CHECK must receive the result
of ADD as ``prevResult``, even from a kubelet that restarted in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from meshcore import files
from meshctl import errors

CNI_VERSION = "1.0.0"
DEBIAN_CNI_DIR = "/usr/lib/cni"
DEFAULT_TIMEOUT = 60.0
PLUGIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Codes the runtime itself reports (the spec reserves 1-99 for plugins' well-known errors and
# leaves 0 unused, so 0 says "the runtime failed to run the plugin, no code from it").
CODE_RUNTIME = 0
CODE_IO_FAILURE = 5
CODE_DECODE = 6

ADD, DEL, CHECK = "ADD", "DEL", "CHECK"


class CniError(errors.MeshctlError):
    """A plugin failed: its ``{"code", "msg", "details"}``, or the runtime's own reason."""

    def __init__(self, code: int, msg: str, plugin: str, details: str = "") -> None:
        text = f"plugin {plugin} failed (code {code}): {msg}"
        if details:
            text += f": {details}"
        super().__init__(text)
        self.code = code
        self.msg = msg
        self.plugin = plugin
        self.details = details


@dataclasses.dataclass(frozen=True, slots=True)
class NetworkConfigList:
    name: str
    cni_version: str
    plugins: tuple[Mapping[str, Any], ...]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NetworkConfigList:
        plugins = data.get("plugins")
        if not isinstance(plugins, list) or not plugins:
            raise CniError(CODE_RUNTIME, "conflist has no plugins", "<conflist>")
        for i, plugin in enumerate(plugins):
            if not isinstance(plugin, Mapping) or not isinstance(plugin.get("type"), str):
                raise CniError(CODE_RUNTIME, f"plugins[{i}].type: Required value", "<conflist>")
        return cls(
            name=str(data.get("name", "")),
            cni_version=str(data.get("cniVersion", CNI_VERSION)),
            plugins=tuple(plugins),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"cniVersion": self.cni_version, "name": self.name, "plugins": list(self.plugins)}


@dataclasses.dataclass(frozen=True, slots=True)
class RuntimeConf:
    """What the runtime knows about the sandbox: the CNI_* variables' values."""

    container_id: str
    netns: str  # path, e.g. /var/run/netns/mesh-p-1a2b3c4d
    pod_namespace: str
    pod_name: str
    pod_uid: str
    ifname: str = "eth0"

    def cni_args(self) -> str:
        return (
            f"IgnoreUnknown=1;K8S_POD_NAMESPACE={self.pod_namespace};"
            f"K8S_POD_NAME={self.pod_name};K8S_POD_INFRA_CONTAINER_ID={self.container_id};"
            f"K8S_POD_UID={self.pod_uid}"
        )


def build_playground_conflist(node_state_dir: str, pod_cidr: str) -> NetworkConfigList:
    """The kubelet's chain: Debian's bridge + host-local, then mesh-cni (Istio's chained plugin)."""
    return NetworkConfigList(
        name="playground",
        cni_version=CNI_VERSION,
        plugins=(
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": True,
                "hairpinMode": True,
                "ipMasq": False,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": pod_cidr}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": os.path.join(node_state_dir, "cni", "networks"),
                },
            },
            {"type": "mesh-cni", "agentSocket": os.path.join(node_state_dir, "cni.sock")},
        ),
    )


def default_bin_dirs() -> tuple[str, ...]:
    """Debian's plugins plus the directory holding our ``mesh-cni`` (next to the interpreter)."""
    return (DEBIAN_CNI_DIR, os.path.dirname(sys.executable))


def find_plugin(plugin_type: str, bin_dirs: Sequence[str]) -> str:
    if "/" in plugin_type or not plugin_type:
        raise CniError(CODE_RUNTIME, f"invalid plugin type {plugin_type!r}", plugin_type)
    for d in bin_dirs:
        path = os.path.join(d, plugin_type)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise CniError(
        CODE_RUNTIME, f'failed to find plugin "{plugin_type}" in path {list(bin_dirs)}', plugin_type
    )


def build_plugin_input(
    conflist: NetworkConfigList, plugin: Mapping[str, Any], prev_result: Mapping[str, Any] | None
) -> bytes:
    """The stdin of one plugin: its own config plus the list's name and version, and prevResult."""
    conf = dict(plugin)
    conf["name"] = conflist.name
    conf["cniVersion"] = conflist.cni_version
    if prev_result is not None:
        conf["prevResult"] = dict(prev_result)
    else:
        conf.pop("prevResult", None)
    return json.dumps(conf).encode()


def build_env(command: str, rt: RuntimeConf, bin_dirs: Sequence[str]) -> dict[str, str]:
    return {
        "PATH": PLUGIN_PATH,
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": rt.container_id,
        "CNI_NETNS": rt.netns,
        "CNI_IFNAME": rt.ifname,
        "CNI_ARGS": rt.cni_args(),
        "CNI_PATH": os.pathsep.join(bin_dirs),
    }


def parse_plugin_output(
    plugin: str, command: str, returncode: int, stdout: bytes, stderr: bytes
) -> dict[str, Any] | None:
    """The plugin's result (ADD), None (DEL/CHECK success), or CniError with its code and msg."""
    text = stdout.decode(errors="replace").strip()
    if returncode != 0:
        raise build_plugin_error(plugin, returncode, text, stderr.decode(errors="replace"))
    if command != ADD:
        return None
    try:
        result = json.loads(text)
    except ValueError as exc:
        raise CniError(CODE_DECODE, f"cannot decode result: {exc}", plugin, text[:500]) from exc
    if not isinstance(result, dict):
        raise CniError(CODE_DECODE, "result is not a JSON object", plugin, text[:500])
    return result


def build_plugin_error(plugin: str, returncode: int, stdout: str, stderr: str) -> CniError:
    """The spec's error object on stdout if there is one, else the exit status and stderr."""
    try:
        err = json.loads(stdout) if stdout else None
    except ValueError:
        err = None
    if isinstance(err, dict) and "msg" in err:
        code = err.get("code")
        return CniError(
            code if isinstance(code, int) else CODE_RUNTIME,
            str(err["msg"]),
            plugin,
            str(err.get("details", "")),
        )
    detail = (stderr.strip() or stdout)[-2000:]
    return CniError(CODE_RUNTIME, f"exited with status {returncode}", plugin, detail)


def find_ip(result: Mapping[str, Any], family: int = 4) -> str | None:
    """The first address of `family` in a 1.0 result, without prefix length."""
    for entry in result.get("ips", []):
        addr = str(entry.get("address", ""))
        ip = addr.split("/", 1)[0]
        if ip and (":" in ip) == (family == 6):
            return ip
    return None


class CniRuntime:
    """Runs conflists for sandboxes; results cached under `cache_dir`."""

    def __init__(
        self,
        bin_dirs: Sequence[str],
        cache_dir: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.bin_dirs = tuple(bin_dirs)
        self.cache_dir = cache_dir
        self.timeout = timeout

    # -- cache --------------------------------------------------------------------------------

    def _cache_path(self, conflist: NetworkConfigList, rt: RuntimeConf) -> str:
        return os.path.join(self.cache_dir, f"{conflist.name}-{rt.container_id}-{rt.ifname}.json")

    def find_cached_result(
        self, conflist: NetworkConfigList, rt: RuntimeConf
    ) -> dict[str, Any] | None:
        try:
            with open(self._cache_path(conflist, rt), encoding="utf-8") as f:
                entry = json.load(f)
        except (OSError, ValueError):
            return None
        result = entry.get("result") if isinstance(entry, dict) else None
        return result if isinstance(result, dict) else None

    def _store(
        self, conflist: NetworkConfigList, rt: RuntimeConf, result: Mapping[str, Any]
    ) -> None:
        os.makedirs(self.cache_dir, exist_ok=True)
        path = self._cache_path(conflist, rt)
        entry = {
            "kind": "cniCacheV1",
            "containerId": rt.container_id,
            "ifName": rt.ifname,
            "networkName": conflist.name,
            "netns": rt.netns,
            "config": conflist.to_dict(),
            "result": dict(result),
        }
        files.write_atomic(path, json.dumps(entry).encode())

    def forget(self, conflist: NetworkConfigList, rt: RuntimeConf) -> None:
        """Drop the cached ADD result (after giving up on a DEL that keeps failing)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._cache_path(conflist, rt))

    # -- operations ---------------------------------------------------------------------------

    async def add(self, conflist: NetworkConfigList, rt: RuntimeConf) -> dict[str, Any]:
        """ADD every plugin in order, each seeing the previous result; returns the final one.

        On failure nothing is undone here: like libcni, the caller runs DEL to clean up.
        """
        prev: dict[str, Any] | None = None
        for plugin in conflist.plugins:
            result = await self._exec(ADD, conflist, plugin, rt, prev)
            assert result is not None
            prev = result
        assert prev is not None
        self._store(conflist, rt, prev)
        return prev

    async def delete(self, conflist: NetworkConfigList, rt: RuntimeConf) -> None:
        """DEL every plugin in reverse order, with the cached ADD result as prevResult.

        Every plugin gets its DEL even if an earlier one failed (so an IP is released even when
        the mesh agent is down); the first failure is raised afterwards.
        """
        prev = self.find_cached_result(conflist, rt)
        first: CniError | None = None
        for plugin in reversed(conflist.plugins):
            try:
                await self._exec(DEL, conflist, plugin, rt, prev)
            except CniError as exc:
                first = first or exc
        if first is not None:
            raise first
        self.forget(conflist, rt)

    async def check(self, conflist: NetworkConfigList, rt: RuntimeConf) -> None:
        prev = self.find_cached_result(conflist, rt)
        if prev is None:
            raise CniError(
                CODE_RUNTIME, f"no cached ADD result for container {rt.container_id}", "<runtime>"
            )
        for plugin in conflist.plugins:
            await self._exec(CHECK, conflist, plugin, rt, prev)

    async def _exec(
        self,
        command: str,
        conflist: NetworkConfigList,
        plugin: Mapping[str, Any],
        rt: RuntimeConf,
        prev: Mapping[str, Any] | None,
    ) -> dict[str, Any] | None:
        name = str(plugin["type"])
        path = find_plugin(name, self.bin_dirs)
        stdin = build_plugin_input(conflist, plugin, prev)
        try:
            proc = await asyncio.create_subprocess_exec(
                path,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=build_env(command, rt, self.bin_dirs),
            )
        except OSError as exc:
            raise CniError(CODE_IO_FAILURE, f"cannot execute {path}: {exc}", name) from exc
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), self.timeout)
        except TimeoutError as exc:
            proc.kill()
            await proc.wait()
            raise CniError(
                CODE_RUNTIME, f"{command} timed out after {self.timeout:g}s", name
            ) from exc
        except asyncio.CancelledError:
            if proc.returncode is None:
                proc.kill()
                await asyncio.shield(proc.wait())
            raise
        return parse_plugin_output(name, command, proc.returncode or 0, out, err)
