"""The pods ztunnel must serve, as the reconciler keeps them and every ZDS snapshot lists them.

A pod is in the table from just before its AddWorkload until its redirection has been removed
(see the invariants in `reconciler`), so a ztunnel that (re)connects at any moment is told about
every pod whose traffic is, or is about to be, redirected to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cni.agent import zds_server
from cni.redirect import iptables
from meshcore.wire import zds


@dataclass(frozen=True)
class Capture:
    """A pod ztunnel serves and whose traffic is (being) redirected to it.

    `options` None: restored after an agent restart; the rules found in place have not been
    re-applied with the current options yet.
    """

    uid: str
    info: zds.WorkloadInfo
    netns: str
    options: iptables.RedirectOptions | None

    @property
    def pod_ref(self) -> str:
        return f"{self.info.namespace}/{self.info.name}"


class CaptureTable:
    """The pods ztunnel must serve; its `snapshot` feeds every (re)connecting ztunnel."""

    def __init__(self) -> None:
        self._captures: dict[str, Capture] = {}

    def find(self, uid: str) -> Capture | None:
        return self._captures.get(uid)

    def put(self, capture: Capture) -> None:
        self._captures[capture.uid] = capture

    def pop(self, uid: str) -> Capture | None:
        return self._captures.pop(uid, None)

    def uids(self) -> frozenset[str]:
        return frozenset(self._captures)

    def __len__(self) -> int:
        return len(self._captures)

    def snapshot(self) -> Sequence[zds_server.SnapshotEntry]:
        return [zds_server.SnapshotEntry(c.uid, c.info, c.netns) for c in self._captures.values()]
