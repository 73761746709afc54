"""`meshctl up` / `meshctl down` through the real CLI, and what is left after a crash: nothing."""

from __future__ import annotations

import json
import os
import pathlib
import secrets
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from meshcore import bpffs
from meshctl.playground import paths, teardown
from meshctl.playground import record as pg_record
from tests.netns import mesh_helpers as mh

pytestmark = pytest.mark.netns


class Leftovers:
    """Everything a playground with `prefix` could leave in the root namespace."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def netns(self) -> list[str]:
        return sorted(n for n in os.listdir("/var/run/netns") if n.startswith(f"{self.prefix}-"))

    def links(self) -> list[str]:
        out = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True, check=True)
        return [line.split()[0] for line in out.stdout.splitlines() if line.startswith(self.prefix)]

    def addresses(self) -> list[str]:
        out = subprocess.run(["ip", "-br", "addr"], capture_output=True, text=True, check=True)
        return [line for line in out.stdout.splitlines() if line.startswith(self.prefix)]

    def everything(self) -> dict[str, list[str]]:
        return {"netns": self.netns(), "links": self.links(), "addresses": self.addresses()}

    def is_clean(self) -> bool:
        return not any(self.everything().values())


@pytest.fixture
def names() -> Iterator[tuple[str, str]]:
    token = secrets.token_hex(3)
    prefix, state = f"mt{token}", f"/tmp/mt-{token}"
    try:
        yield prefix, state
    finally:
        # Belt and braces: a failing test must not leak into the next one.
        subprocess.run(
            [sys.executable, "-m", "meshctl", "--state-dir", state, "down"],
            capture_output=True,
            timeout=120,
            check=False,
        )
        shutil.rmtree(state, ignore_errors=True)


def _meshctl(state: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshctl", "--state-dir", state, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _recorded_pids(state: str) -> list[int]:
    rec = pg_record.RecordFile(state).load()
    assert rec is not None
    pids = [p.pid for p in rec.processes]
    if rec.supervisor is not None:
        pids.append(rec.supervisor.pid)
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_up_then_down_leaves_nothing(names: tuple[str, str]) -> None:
    prefix, state = names
    leftovers = Leftovers(prefix)
    up = _meshctl(state, "up", "--prefix", prefix)
    assert up.returncode == 0, up.stderr + up.stdout
    assert leftovers.netns(), "up created no namespaces"
    assert leftovers.links(), "up created no host link"
    pids = _recorded_pids(state)
    assert len(pids) >= 5  # supervisor, controller, agent, ztunnel, kubelet
    status = _meshctl(state, "status")
    assert status.returncode == 0
    assert "ready" in status.stdout

    again = _meshctl(state, "up", "--prefix", prefix)
    assert again.returncode == 1
    assert "already running" in again.stderr

    down = _meshctl(state, "down")
    assert down.returncode == 0, down.stderr
    assert leftovers.is_clean(), leftovers.everything()
    assert not [p for p in pids if _alive(p)]


def test_down_after_the_supervisor_was_killed(names: tuple[str, str]) -> None:
    prefix, state = names
    leftovers = Leftovers(prefix)
    up = _meshctl(state, "up", "--prefix", prefix, "--no-host-access")
    assert up.returncode == 0, up.stderr + up.stdout
    pids = _recorded_pids(state)
    rec = pg_record.RecordFile(state).load()
    assert rec is not None
    assert rec.supervisor is not None
    supervisor = rec.supervisor.pid
    os.kill(supervisor, signal.SIGKILL)
    mh.wait_until(lambda: not _alive(supervisor), what="the supervisor to die")

    down = _meshctl(state, "down")
    assert down.returncode == 0, down.stderr
    assert leftovers.is_clean(), leftovers.everything()
    assert not [p for p in pids if _alive(p)]


def test_a_killed_test_leaves_nothing(names: tuple[str, str]) -> None:
    """A test process that dies without running its finalizers takes its playground with it."""
    prefix, state = names
    leftovers = Leftovers(prefix)
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {os.getcwd()!r})
        from tests.netns.playground_fixtures import Playground
        pg = Playground({prefix!r})
        pg.state_dir = {state!r}
        from meshctl.playground import paths
        pg.paths = paths.Paths(pg.state_dir)
        pg.start()
        print(json.dumps({{"ready": True}}), flush=True)
        sys.stdin.read()  # wait to be killed
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert json.loads(line) == {"ready": True}
        assert leftovers.netns()
        pids = _recorded_pids(state)
        proc.kill()  # SIGKILL: no finalizer runs
        proc.wait()
        mh.wait_until(leftovers.is_clean, timeout=90, what="the orphaned playground to go away")
        mh.wait_until(
            lambda: not [p for p in pids if _alive(p)],
            timeout=30,
            what="every playground process to exit",
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_teardown_unmounts_the_nodes_bpf_filesystems_even_without_a_record(
    tmp_path: pathlib.Path,
) -> None:
    """eBPF mode's per-node bpf filesystems are found in mountinfo, not in the record (which a
    crash may have lost), and unmounted; a name mountinfo escapes (a space) is no obstacle."""
    state = str(tmp_path / "state dir")
    where = paths.Paths(state)
    mount_points = [where.bpf_dir("node1"), where.bpf_dir("node 2")]
    try:
        for mount_point in mount_points:
            bpffs.mount(mount_point)
        assert sorted(teardown.bpf_mounts(state)) == sorted(mount_points)
        assert teardown.remove_runtime_state(state) == ()
        assert not any(os.path.ismount(m) for m in mount_points)
    finally:
        for mount_point in mount_points:
            bpffs.unmount(mount_point)
