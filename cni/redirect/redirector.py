"""Install and remove the in-pod redirection (spec 3.2) in a pod's network namespace.

Two modes, chosen per node (the agent's REDIRECT_MODE): `iptables`, the rules of spec 3.2 (the
default, what Istio installs), and `ebpf`, tc programs with the same effect and no netfilter in
the pod (`cni.redirect.ebpf`). Whichever mode installs also clears what the other left in the
pod, and removal clears both, so switching a node's mode never leaves a pod captured twice.

`install` is all or nothing: the ip rule/route first (harmless without the rules), then the
iptables transaction; if iptables fails, whatever it committed (it commits per table) and the
routing are removed again before the error is raised, so a pod is never left half-captured.
After a failed install the pod is NOT captured, even if it was before.

The iptables tools run as subprocesses that enter the pod netns between fork and exec
(`meshcore.netns.preexec_enter`). Plain `iptables-restore`/`iptables-save` are used so the
distribution's alternatives pick the variant (nft or legacy) the host uses.

These calls block (subprocesses, netlink); the agent runs them in a worker thread.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

from cni.redirect import ebpf, iptables, netlink
from meshcore import bpffs, envconfig, log, netns

logger = logging.getLogger("cni.redirect")

RedirectError = iptables.RedirectError
RedirectOptions = iptables.RedirectOptions
MODES = envconfig.REDIRECT_MODES


@dataclass(frozen=True)
class IptablesTools:
    """The commands to run (argv prefixes); a seam for other variants and for tests."""

    restore: tuple[str, ...] = ("iptables-restore",)
    save: tuple[str, ...] = ("iptables-save",)
    timeout: float = 30.0


class Redirector:
    def __init__(
        self,
        *,
        mode: str = "iptables",
        tools: IptablesTools | None = None,
        programs: ebpf.Programs | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"redirect mode {mode!r} must be one of {', '.join(MODES)}")
        self.mode = mode
        self._tools = tools or IptablesTools()
        self._programs = programs or ebpf.Programs(bpffs.DEFAULT_PIN_DIR)

    def prepare(self) -> None:
        """Load what the mode needs before the first pod (eBPF: compile the programs), so that
        a node that cannot do it fails at start, naming the cause."""
        if self.mode == "ebpf":
            self._programs.load()

    def install(self, netns_path: str, options: iptables.RedirectOptions) -> None:
        if self.mode == "ebpf":
            ebpf.check_options(options, netns_path)
        started = time.monotonic()
        fd = _open(netns_path)
        try:
            existing = self._find_state(fd, netns_path)
            netlink.add_routing(fd)
            try:
                if self.mode == "ebpf":
                    ebpf.attach(fd, self._programs, options)
                    self._restore(fd, netns_path, iptables.remove_rules(existing))
                else:
                    self._restore(fd, netns_path, iptables.install_rules(options, existing))
                    ebpf.detach(fd)
            except RedirectError:
                self._undo(fd, netns_path)
                raise
        finally:
            os.close(fd)
        logger.info(
            "in-pod redirection installed",
            extra=log.fields(
                netns=netns_path,
                mode=self.mode,
                dns_capture=options.dns_capture and self.mode == "iptables",
                inbound_capture=options.inbound_capture,
                duration_ms=round((time.monotonic() - started) * 1000, 1),
            ),
        )

    def remove(self, netns_path: str) -> None:
        """Remove our rules, then the ip rule/route. Fine on a pod that was never captured and
        on a namespace that no longer exists."""
        try:
            fd = _open(netns_path)
        except _NetnsGoneError:
            logger.info("netns already gone; nothing to remove", extra=log.fields(netns=netns_path))
            return
        try:
            ebpf.detach(fd)
            state = self._find_state(fd, netns_path)
            self._restore(fd, netns_path, iptables.remove_rules(state))
            netlink.remove_routing(fd)
        finally:
            os.close(fd)
        logger.info("in-pod redirection removed", extra=log.fields(netns=netns_path))

    def watch_links(self, netns_path: str) -> netlink.LinkWatch | None:
        """eBPF mode: a watch on the pod's links, to be reinstalled when one appears (the
        programs are attached per link). None in iptables mode, whose rules cover every link."""
        if self.mode != "ebpf":
            return None
        fd = _open(netns_path)
        try:
            return netlink.LinkWatch.open(fd)
        finally:
            os.close(fd)

    def is_installed(self, netns_path: str) -> bool:
        """Whether the pod is captured the way this mode captures."""
        if self.mode == "ebpf":
            return self.find_ebpf_state(netns_path).is_capturing
        return self.find_state(netns_path).is_capturing

    def find_ebpf_state(self, netns_path: str) -> ebpf.EbpfState:
        """Our tc filters in the pod netns."""
        fd = _open(netns_path)
        try:
            return ebpf.find_state(fd)
        finally:
            os.close(fd)

    def find_state(self, netns_path: str) -> iptables.InstalledState:
        """Our chains and jumps as `iptables-save` shows them in the pod netns."""
        fd = _open(netns_path)
        try:
            return self._find_state(fd, netns_path)
        finally:
            os.close(fd)

    def _undo(self, fd: int, netns_path: str) -> None:
        """Best effort after a failed install; a failure here is logged, the original raised."""

        def remove_rules() -> None:
            state = self._find_state(fd, netns_path)
            self._restore(fd, netns_path, iptables.remove_rules(state))

        steps: tuple[tuple[str, Callable[[], None]], ...] = (
            ("detach the eBPF filters", lambda: ebpf.detach(fd)),
            ("remove partial iptables rules", remove_rules),
            ("remove the ip rule/route", lambda: netlink.remove_routing(fd)),
        )
        for what, step in steps:
            try:
                step()
            except RedirectError as exc:
                logger.error(
                    f"could not {what}", extra=log.fields(netns=netns_path, error=str(exc))
                )

    def _find_state(self, fd: int, netns_path: str) -> iptables.InstalledState:
        return iptables.parse_saved(self._run(fd, netns_path, self._tools.save, None))

    def _restore(self, fd: int, netns_path: str, text: str) -> None:
        if text:
            self._run(fd, netns_path, (*self._tools.restore, "--noflush"), text)

    def _run(self, fd: int, netns_path: str, argv: tuple[str, ...], stdin: str | None) -> str:
        try:
            done = subprocess.run(
                argv,
                input=stdin,
                capture_output=True,
                text=True,
                timeout=self._tools.timeout,
                preexec_fn=netns.preexec_enter(fd),
                check=False,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise RedirectError(f"{argv[0]} in {netns_path}: {exc}") from exc
        if done.returncode != 0:
            raise RedirectError(
                f"{' '.join(argv)} in {netns_path} exited {done.returncode}: "
                f"{done.stderr.strip() or '(no stderr)'}"
            )
        return done.stdout


class _NetnsGoneError(RedirectError):
    pass


def _open(netns_path: str) -> int:
    try:
        return netns.open_netns(netns_path)
    except netns.NetnsError as exc:
        if exc.errno == errno.ENOENT:
            raise _NetnsGoneError(str(exc)) from exc
        raise RedirectError(str(exc)) from exc
