"""meshctl's root exception and its specific subclasses.

The CLI maps every `MeshctlError` to one ``error: ...`` line and exit code 1 in exactly one place
(`meshctl.cli.main`); nothing below it prints tracebacks for expected failures.
"""

from __future__ import annotations

from meshcore import errors


class MeshctlError(errors.MeshError):
    """Base class for every error meshctl reports to its user."""


class UsageError(MeshctlError):
    """The command line is wrong (exit code 2)."""


class NotRunningError(MeshctlError):
    """No playground is running where the command expected one."""


class ManifestError(MeshctlError):
    """A manifest file could not be read, parsed or resolved; nothing was applied."""
