"""Errors of the local source that are not API answers (those are `meshcore.kube.errors`)."""

from __future__ import annotations


class LocalSourceError(Exception):
    """Root of the local source's own errors."""


class CorruptStoreError(LocalSourceError):
    """A persisted file cannot be loaded; the store refuses to start rather than drop it."""

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(f"corrupt store file {path}: {detail}")
        self.path = path
        self.detail = detail


class AllocationError(LocalSourceError):
    """A ClusterIP cannot be allocated or reserved; `detail` says why."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class ServerStartError(LocalSourceError):
    """The API server cannot listen where it was asked to."""
