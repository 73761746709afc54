"""The BPF filesystem: where eBPF maps are pinned so that they outlive the process that made them.

A node agent in eBPF mode pins its map of captured connections there (`cni/redirect/ebpf.py`), so
that a restarted agent's programs go on guarding connections captured before the restart. In a
cluster that is the host's /sys/fs/bpf (a hostPath in the DaemonSet); the playground mounts one
per node under its state directory and unmounts it at teardown.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

DEFAULT_PIN_DIR = "/sys/fs/bpf/ambient-mesh"  # the node agent's BPF_PIN_DIR
BPF_FS_MAGIC = 0xCAFE4A11  # statfs f_type of a bpf filesystem (linux/magic.h)
MNT_DETACH = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.statfs.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def filesystem_type(path: str) -> int:
    """statfs(2)'s f_type for `path` (the first field of struct statfs on Linux)."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    if _libc.statfs(os.fsencode(path), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"statfs {path}: {os.strerror(err)}", path)
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def is_bpffs(path: str) -> bool:
    return filesystem_type(path) == BPF_FS_MAGIC


def mount(path: str) -> None:
    """Mount a fresh bpf filesystem on the directory `path` (created if missing), unless it
    already is one (a playground restarted after a crash finds its own)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    if is_bpffs(path):
        return
    if _libc.mount(b"bpf", os.fsencode(path), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount -t bpf bpf {path}: {os.strerror(err)}", path)


def unmount(path: str) -> bool:
    """Detach the bpf filesystem mounted on `path`; the maps pinned there are freed once no
    program holds them. False when `path` is not a bpf mount point (nothing to do)."""
    if not os.path.ismount(path) or not is_bpffs(path):
        return False
    if _libc.umount2(os.fsencode(path), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {path}: {os.strerror(err)}", path)
    return True
