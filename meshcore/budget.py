"""A ceiling on something held at once (connections, TLS handshakes), for a server that must
refuse new work rather than run out of file descriptors or memory."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable


@dataclasses.dataclass
class Budget:
    """At most `limit` held at once. A refusal sets `is_exhausted` and the next acquire that
    succeeds clears it, so that a spell of refusals is said once in the log, not per refusal."""

    limit: int
    pending: int = 0
    is_exhausted: bool = False

    def try_acquire(self, on_exhausted: Callable[[], None]) -> bool:
        """Take one; False when all are taken (`on_exhausted` is called at the first refusal
        of a spell)."""
        if self.pending >= self.limit:
            if not self.is_exhausted:
                self.is_exhausted = True
                on_exhausted()
            return False
        self.is_exhausted = False
        self.pending += 1
        return True

    def release(self) -> None:
        self.pending -= 1
