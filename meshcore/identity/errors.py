"""The root of every error raised by meshcore.identity."""

from __future__ import annotations

from meshcore import errors


class IdentityError(errors.MeshError):
    """An identity, certificate, CSR, key or CA file is unusable; subclasses say which."""
