"""Running ``ip`` and friends, with their errors turned into exceptions that say what failed.

The playground drives the network with the iproute2 and iptables commands rather than netlink
from Python: the commands are what an operator would type to inspect or repair the result, their
error text ("RTNETLINK answers: File exists") is what the user needs to see, and ``ip -n NAME``
never creates a namespace by accident (pyroute2's defaults do).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

from meshctl import errors

DEFAULT_TIMEOUT = 30.0
# Minimal environment for the tools: they need nothing from ours, and a clean one keeps locale
# and proxy variables from changing their output.
TOOL_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


class CommandError(errors.MeshctlError):
    """A command exited non-zero (or could not run); carries argv and its stderr."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        detail = stderr.strip() or f"exit code {returncode}"
        super().__init__(f"`{' '.join(argv)}` failed: {detail}")
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stderr = stderr


def ip_argv(args: Sequence[str], netns: str | None = None) -> list[str]:
    return ["ip", *(["-n", netns] if netns else []), *args]


def run(
    argv: Sequence[str],
    *,
    stdin: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    env: Mapping[str, str] | None = None,
) -> str:
    """Run `argv` to completion; its stdout, or CommandError."""
    try:
        done = subprocess.run(
            list(argv),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(env if env is not None else TOOL_ENV),
            check=False,
        )
    except FileNotFoundError as exc:
        raise CommandError(argv, 127, f"{argv[0]}: command not found") from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandError(argv, -1, f"timed out after {timeout:g}s") from exc
    if done.returncode != 0:
        raise CommandError(argv, done.returncode, done.stderr)
    return done.stdout


def ip(*args: str, netns: str | None = None) -> str:
    return run(ip_argv(args, netns))


def ip_json(*args: str, netns: str | None = None) -> list[dict[str, Any]]:
    out = run(ip_argv(["-j", *args], netns))
    parsed = json.loads(out) if out.strip() else []
    return parsed if isinstance(parsed, list) else []


async def arun(
    argv: Sequence[str],
    *,
    stdin: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    env: Mapping[str, str] | None = None,
) -> str:
    """Async twin of `run`, for code running inside an event loop."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env if env is not None else TOOL_ENV),
        )
    except FileNotFoundError as exc:
        raise CommandError(argv, 127, f"{argv[0]}: command not found") from exc
    try:
        out, err = await asyncio.wait_for(
            proc.communicate(stdin.encode() if stdin is not None else None), timeout
        )
    except TimeoutError as exc:
        proc.kill()
        await proc.wait()
        raise CommandError(argv, -1, f"timed out after {timeout:g}s") from exc
    except asyncio.CancelledError:
        if proc.returncode is None:
            proc.kill()
            await asyncio.shield(proc.wait())
        raise
    if proc.returncode != 0:
        raise CommandError(argv, proc.returncode or -1, err.decode(errors="replace"))
    return out.decode(errors="replace")


async def aip(*args: str, netns: str | None = None) -> str:
    return await arun(ip_argv(args, netns))


def is_missing(exc: CommandError) -> bool:
    """True when a delete failed only because the thing is already gone."""
    text = exc.stderr.lower()
    return any(
        s in text
        for s in (
            "cannot find device",
            "no such file or directory",
            "does not exist",
            "not found",
            "no such process",
        )
    )
