"""Reading a component's environment into its frozen Config, with errors that name the variable.

Each component keeps its own `ConfigError` (its package's error root); `Env` raises that type.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from meshcore import digits

# Values shared by a component and whoever starts it (the playground, the manifests):
# the node agent's REDIRECT_MODE, how it captures pods (the first is the default).
REDIRECT_MODES = ("iptables", "ebpf")
# POD_NAMESPACE of ztunnel and the node agent: the mesh's system namespace, where they run.
DEFAULT_SYSTEM_NAMESPACE = "istio-system"


class Env:
    def __init__(self, env: Mapping[str, str], error: type[Exception]) -> None:
        self._env = env
        self._error = error

    def fail(self, message: str) -> Exception:
        return self._error(message)

    def optional(self, name: str, default: str = "") -> str:
        return self._env.get(name, "").strip() or default

    def required(self, name: str) -> str:
        value = self.optional(name)
        if not value:
            raise self.fail(f"environment variable {name} is required")
        return value

    def seconds(self, name: str, default: float) -> float:
        raw = self.optional(name)
        if not raw:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise self.fail(f"{name}={raw!r} is not a number of seconds") from None
        if value <= 0:
            raise self.fail(f"{name}={raw!r} must be positive")
        return value

    def count(self, name: str, default: int, *, maximum: int | None = None) -> int:
        """A positive whole number, e.g. a stream limit."""
        raw = self.optional(name)
        if not raw:
            return default
        if (
            not digits.is_digits(raw)
            or int(raw) < 1
            or (maximum is not None and int(raw) > maximum)
        ):
            bound = f" (1..{maximum})" if maximum is not None else ""
            raise self.fail(f"{name}={raw!r} must be a positive whole number{bound}")
        return int(raw)

    def host_port(self, name: str, default: tuple[str, int]) -> tuple[str, int]:
        raw = self.optional(name)
        if not raw:
            return default
        host, sep, port = raw.rpartition(":")
        if not sep or not digits.is_digits(port) or not 0 < int(port) < 65536:
            raise self.fail(f"{name}={raw!r} must be host:port")
        return (host.strip("[]") or "0.0.0.0", int(port))

    def log_level(self, name: str = "LOG_LEVEL", default: str = "info") -> str:
        level = self.optional(name, default).lower()
        if level.upper() not in logging.getLevelNamesMapping():
            raise self.fail(f"{name}={level!r} is not a log level (debug, info, warning, error)")
        return level
