"""Root exception of the shared kernel; each subpackage derives its own errors from it."""

from __future__ import annotations


class MeshError(Exception):
    """Base class for every error raised by meshcore."""
