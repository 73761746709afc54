"""Where a playground keeps things under its state directory (docs/internals.md, "State
directory"): one place, so the supervisor, the CLI and the test fixtures agree."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from meshctl import errors

DEFAULT_STATE_DIR = "/var/lib/ambient-mesh"
MAX_UNIX_PATH = 107  # sun_path is 108 bytes including the terminating NUL


@dataclasses.dataclass(frozen=True, slots=True)
class Paths:
    state_dir: str

    @property
    def controller_dir(self) -> str:
        return os.path.join(self.state_dir, "controller")

    @property
    def api_socket(self) -> str:
        return os.path.join(self.controller_dir, "api.sock")

    @property
    def xds_socket(self) -> str:
        return os.path.join(self.controller_dir, "xds.sock")

    @property
    def token_secret(self) -> str:
        return os.path.join(self.controller_dir, "token-secret")

    @property
    def controller_log(self) -> str:
        return os.path.join(self.state_dir, "controller.log")

    @property
    def supervisor_log(self) -> str:
        return os.path.join(self.state_dir, "supervisor.log")

    @property
    def kube_api(self) -> str:
        return f"unix://{self.api_socket}"

    def node_dir(self, node: str) -> str:
        return os.path.join(self.state_dir, "nodes", node)

    def token(self, node: str) -> str:
        return os.path.join(self.node_dir(node), "token")

    def bpf_dir(self, node: str) -> str:
        """The node agent's BPF_PIN_DIR in eBPF mode: a bpf filesystem of its own."""
        return os.path.join(self.node_dir(node), "bpf")

    def cni_socket(self, node: str) -> str:
        return os.path.join(self.node_dir(node), "cni.sock")

    def zds_socket(self, node: str) -> str:
        return os.path.join(self.node_dir(node), "ztunnel.sock")

    def log(self, component: str, node: str | None) -> str:
        if node is None:
            return (
                self.controller_log
                if component == "controller"
                else os.path.join(self.state_dir, f"{component}.log")
            )
        return os.path.join(self.node_dir(node), f"{component}.log")

    def check_socket_lengths(self, nodes: Sequence[str]) -> None:
        longest = [self.api_socket, self.xds_socket]
        longest += [p for n in nodes for p in (self.cni_socket(n), self.zds_socket(n))]
        for path in longest:
            if len(path.encode()) > MAX_UNIX_PATH:
                raise errors.UsageError(
                    f"state directory {self.state_dir} is too long: the Unix socket path {path}"
                    f" would exceed {MAX_UNIX_PATH} bytes; use a shorter --state-dir"
                )
