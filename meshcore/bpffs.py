"""The BPF filesystem: where eBPF maps are pinned so that they outlive the process that made them.

A node agent in eBPF mode pins its map of captured connections there (`cni/redirect/ebpf.py`), so
that a restarted agent's programs go on guarding connections captured before the restart. In a
cluster that is the host's /sys/fs/bpf (a hostPath in the DaemonSet); the playground mounts one
per node under its state directory and unmounts it at teardown.
"""

from __future__ import annotations

import os

from meshcore import mounts

DEFAULT_PIN_DIR = "/sys/fs/bpf/ambient-mesh"  # the node agent's BPF_PIN_DIR
BPF_FS_MAGIC = 0xCAFE4A11  # statfs f_type of a bpf filesystem (linux/magic.h)


def is_bpffs(path: str) -> bool:
    return mounts.filesystem_type(path) == BPF_FS_MAGIC


def mount(path: str) -> None:
    """Mount a fresh bpf filesystem on the directory `path` (created if missing), unless it
    already is one (a playground restarted after a crash finds its own)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    if is_bpffs(path):
        return
    mounts.mount("bpf", path, 0, fstype="bpf")


def unmount(path: str) -> bool:
    """Detach the bpf filesystem mounted on `path`; the maps pinned there are freed once no
    program holds them. False when `path` is not a bpf mount point (nothing to do)."""
    if not os.path.ismount(path) or not is_bpffs(path):
        return False
    mounts.unmount(path, mounts.MNT_DETACH)
    return True
