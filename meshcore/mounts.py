"""mount(2), umount2(2) and statfs(2) through libc: the playground's container bind mounts and
the bpf filesystems of eBPF mode. Safe to call between fork and exec (no locks, no logging)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

MS_BIND = 0x1000
MS_REC = 0x4000
MS_SLAVE = 1 << 19
MNT_DETACH = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.statfs.argtypes = [ctypes.c_char_p, ctypes.c_void_p]


def mount(source: str | None, target: str, flags: int, fstype: str | None = None) -> None:
    src = source.encode() if source is not None else None
    kind = fstype.encode() if fstype is not None else None
    if _libc.mount(src, os.fsencode(target), kind, flags, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} -> {target}: {os.strerror(err)}", target)


def unmount(target: str, flags: int = 0) -> None:
    if _libc.umount2(os.fsencode(target), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {target}: {os.strerror(err)}", target)


def filesystem_type(path: str) -> int:
    """statfs(2)'s f_type for `path` (the first field of struct statfs on Linux)."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    if _libc.statfs(os.fsencode(path), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"statfs {path}: {os.strerror(err)}", path)
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF
