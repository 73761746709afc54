"""A pod's sandbox on disk: its directory, hosts and resolv.conf files, and ``sandbox.json``.

Layout (``<node state>/pods/<uid>/``): ``hosts`` and ``resolv.conf`` (bind-mounted over the
container's /etc files), ``sandbox.json`` (the netns and container PIDs, read by ``meshctl
exec``), ``<container>.log``.

`sandbox.json` is written *before* the pod's network namespace is created, so a namespace made by
this node's kubelet is always findable from its own pods directory (the namespace name holds
only 8 characters of the uid, and other nodes' kubelets share the prefix).

The builders here are pure: they turn API objects into file contents and process environments.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from typing import Any

from meshcore import files, netns
from meshcore.kube import serviceentries as kube_entries
from meshctl import errors, podfields

SANDBOX_FILE = "sandbox.json"
CLUSTER_DOMAIN = "cluster.local"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# fieldRef paths the playground can answer (the ones the demo and the mesh need).
_FIELD_PATHS = {
    "metadata.name",
    "metadata.namespace",
    "metadata.uid",
    "status.podIP",
    "status.hostIP",
    "spec.nodeName",
    "spec.serviceAccountName",
}
_LABEL_REF = re.compile(r"^metadata\.(labels|annotations)\['([^']+)'\]$")
_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


class ContainerConfigError(errors.MeshctlError):
    """The container spec asks for something the playground cannot provide (field named)."""


@dataclasses.dataclass(frozen=True, slots=True)
class ServiceName:
    namespace: str
    name: str
    cluster_ip: str
    # A ServiceEntry host: answered as this one name, in every namespace.
    host: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class ContainerRecord:
    pid: int
    start_time: int


@dataclasses.dataclass(frozen=True, slots=True)
class SandboxRecord:
    uid: str
    namespace: str
    name: str
    netns: str  # namespace name under /var/run/netns
    ip: str = ""
    containers: Mapping[str, ContainerRecord] = dataclasses.field(default_factory=dict)

    @property
    def netns_path(self) -> str:
        return netns.path_for(self.netns)

    def to_json(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "namespace": self.namespace,
            "name": self.name,
            "netns": self.netns,
            "netnsPath": self.netns_path,
            "ip": self.ip,
            "containers": {
                name: {"pid": c.pid, "startTime": c.start_time}
                for name, c in sorted(self.containers.items())
            },
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SandboxRecord:
        conts = data.get("containers") or {}
        return cls(
            uid=str(data["uid"]),
            namespace=str(data["namespace"]),
            name=str(data["name"]),
            netns=str(data["netns"]),
            ip=str(data.get("ip", "")),
            containers={
                str(k): ContainerRecord(int(v["pid"]), int(v["startTime"]))
                for k, v in conts.items()
            },
        )


def netns_name(prefix: str, uid: str) -> str:
    return f"{prefix}-p-{uid.replace('-', '')[:8]}"


class PodDir:
    """Paths and files of one pod under ``<node state>/pods/<uid>``."""

    def __init__(self, node_state_dir: str, uid: str) -> None:
        if not uid or "/" in uid or uid in (".", ".."):
            raise ContainerConfigError(f"invalid pod uid {uid!r}")
        self.path = os.path.join(node_state_dir, "pods", uid)
        self.hosts = os.path.join(self.path, "hosts")
        self.resolv = os.path.join(self.path, "resolv.conf")
        self.record = os.path.join(self.path, SANDBOX_FILE)

    def log_path(self, container: str) -> str:
        return os.path.join(self.path, f"{container}.log")

    def exists(self) -> bool:
        return os.path.isdir(self.path)

    def load(self) -> SandboxRecord | None:
        try:
            with open(self.record, encoding="utf-8") as f:
                return SandboxRecord.from_json(json.load(f))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self, rec: SandboxRecord) -> None:
        files.write_atomic(self.record, json.dumps(rec.to_json(), indent=2).encode())

    def write_file(self, path: str, text: str) -> bool:
        """Write `text` keeping the inode (bind mounts follow inodes); True if it changed."""
        os.makedirs(self.path, exist_ok=True)
        data = text.encode()
        try:
            with open(path, "r+b") as f:
                if f.read() == data:
                    return False
                f.seek(0)
                f.write(data)
                f.truncate()
                return True
        except FileNotFoundError:
            with open(path, "wb") as f:
                f.write(data)
            return True

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def find_pod_dirs(node_state_dir: str) -> list[str]:
    """uids that have a directory on this node."""
    try:
        return sorted(os.listdir(os.path.join(node_state_dir, "pods")))
    except FileNotFoundError:
        return []


def _entry_names(entries: Iterable[Mapping[str, Any]]) -> list[ServiceName]:
    """A ServiceEntry's hosts at their first IPv4 address, as Istio's DNS proxy answers with
    auto-allocation; hosts without one (wildcards, not allocated yet) are not listed."""
    out = []
    for entry in entries:
        meta = entry.get("metadata") or {}
        namespace, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
        for host, addresses in kube_entries.find_host_addresses(entry).items():
            ipv4 = [a for a in addresses if a.version == 4]
            if ipv4:
                out.append(ServiceName(namespace, name, str(ipv4[0]), host=host))
    return out


def build_service_names(
    services: Iterable[Mapping[str, Any]],
    pods: Iterable[Mapping[str, Any]] = (),
    entries: Iterable[Mapping[str, Any]] = (),
) -> list[ServiceName]:
    """Name -> address entries: a service's ClusterIP, or for a headless service the IP of each
    serving pod it selects (what cluster DNS would answer); and ServiceEntry hosts."""
    out: list[ServiceName] = _entry_names(entries)
    pod_list = list(pods)
    for svc in services:
        meta = svc.get("metadata") or {}
        if not isinstance(meta, Mapping):
            continue
        namespace, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
        if podfields.is_headless(svc):
            members = podfields.find_service_members(svc, pod_list)
            ips = sorted({podfields.pod_ip(p) for p in members}, key=ipaddress.ip_address)
            out.extend(ServiceName(namespace, name, ip) for ip in ips)
        elif ip := podfields.cluster_ip(svc):
            out.append(ServiceName(namespace, name, ip))
    return sorted(out, key=lambda s: (s.namespace, s.name, s.host))


def build_hosts_file(
    pod_namespace: str, pod_name: str, pod_ip: str, services: Iterable[ServiceName]
) -> str:
    """The pod's /etc/hosts: resolution is by this file (the playground has no cluster DNS)."""
    lines = [
        "# Kubernetes-managed hosts file (playground kubelet): services resolve here.",
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        "fe00::0\tip6-localnet",
        "fe00::1\tip6-allnodes",
        "fe00::2\tip6-allrouters",
    ]
    if pod_ip:
        lines.append(f"{pod_ip}\t{pod_name}")
    for svc in services:
        if svc.host:
            lines.append(f"{svc.cluster_ip}\t{svc.host}")
            continue
        names = [
            f"{svc.name}.{svc.namespace}.svc.{CLUSTER_DOMAIN}",
            f"{svc.name}.{svc.namespace}.svc",
            f"{svc.name}.{svc.namespace}",
        ]
        if svc.namespace == pod_namespace:
            names.append(svc.name)
        lines.append(f"{svc.cluster_ip}\t{' '.join(names)}")
    return "\n".join(lines) + "\n"


def build_resolv_conf(pod_namespace: str) -> str:
    return (
        "# Playground pod: names resolve through /etc/hosts; there is no cluster DNS server.\n"
        f"search {pod_namespace}.svc.{CLUSTER_DOMAIN} svc.{CLUSTER_DOMAIN} {CLUSTER_DOMAIN}\n"
        "options ndots:5\n"
    )


def build_field_value(pod: Mapping[str, Any], field_path: str, host_ip: str) -> str:
    meta = pod.get("metadata") or {}
    match = _LABEL_REF.match(field_path)
    if match:
        values = meta.get(match.group(1)) or {}
        return str(values.get(match.group(2), "")) if isinstance(values, Mapping) else ""
    if field_path not in _FIELD_PATHS:
        raise ContainerConfigError(f"unsupported fieldRef.fieldPath {field_path!r}")
    if field_path == "status.podIP":
        return podfields.pod_ip(pod)
    if field_path == "status.hostIP":
        return host_ip
    if field_path == "spec.nodeName":
        return podfields.node_name(pod)
    if field_path == "spec.serviceAccountName":
        return podfields.service_account(pod)
    return str(meta.get(field_path.removeprefix("metadata."), ""))


def expand_vars(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: defined variables are replaced, ``$$`` escapes."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR_REF.sub(sub, text)


def build_container_env(
    pod: Mapping[str, Any], container: Mapping[str, Any], *, host_ip: str, bin_dir: str
) -> dict[str, str]:
    """PATH (with our venv's bin, where mesh-demo-app lives), HOSTNAME, then the spec's env."""
    env = {
        "PATH": f"{bin_dir}:{SYSTEM_PATH}",
        "HOSTNAME": str((pod.get("metadata") or {}).get("name", "")),
        "HOME": "/root",
    }
    name = str(container.get("name", ""))
    for i, var in enumerate(container.get("env") or []):
        where = f"spec.containers[{name}].env[{i}]"
        if not isinstance(var, Mapping) or not isinstance(var.get("name"), str):
            raise ContainerConfigError(f"{where}.name: Required value")
        if "value" in var:
            env[var["name"]] = expand_vars(str(var["value"]), env)
            continue
        source = var.get("valueFrom")
        field_ref = source.get("fieldRef") if isinstance(source, Mapping) else None
        if isinstance(field_ref, Mapping) and isinstance(field_ref.get("fieldPath"), str):
            try:
                env[var["name"]] = build_field_value(pod, field_ref["fieldPath"], host_ip)
            except ContainerConfigError as exc:
                raise ContainerConfigError(f"{where}.valueFrom: {exc}") from exc
        elif source:
            raise ContainerConfigError(
                f"{where}.valueFrom: only fieldRef is supported in the playground"
            )
        else:
            env[var["name"]] = ""
    return env


def build_container_argv(container: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
    command = container.get("command") or []
    args = container.get("args") or []
    argv = [expand_vars(str(a), env) for a in [*command, *args]]
    if not argv:
        raise ContainerConfigError(
            f"spec.containers[{container.get('name', '')}].command: Required value (the"
            " playground runs commands, not images)"
        )
    return argv
