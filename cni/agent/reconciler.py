"""The node agent's reconciler: decides which pods of this node are captured and keeps each one
either fully captured or not captured at all (DESIGN "fail closed", spec 3.6 and 7).

Inputs: CNI ADD/DEL/CHECK from mesh-cni (`on_add`/`on_del`/`on_check`), and two informers:
every namespace, and the pods with `spec.nodeName=<this node>`. Per pod the reconciler computes
the target (captured in netns N with options O, or not captured) from the pod, its namespace
(`enrollment.build_decision`) and the netns recorded at CNI ADD (`netns_cache`), compares it with
what is in place (`CaptureTable`), and performs the difference:

- enroll:  ZDS AddWorkload (waits for ztunnel's Ack, so its listeners exist before any packet is
           redirected), then the in-pod redirection; if that fails, DelWorkload undoes the Add.
- release: the in-pod redirection is removed first (nothing is redirected to a ztunnel that no
           longer listens), then DelWorkload.
- then the pod annotation `ambient.istio.io/redirection` follows the result. A failed PATCH is
  retried; it never undoes a capture or a release.

Invariants:
- One operation at a time per pod uid: each uid has a slot with at most one worker task. A
  request coming in while the worker runs replaces the queued state (the newest pod object wins)
  and the worker runs once more; different pods proceed concurrently.
- The CaptureTable lists every pod ztunnel must serve: captured pods, and pods between their
  AddWorkload and the end of the redirection install. A ztunnel (re)connecting in that window
  receives the pod in its snapshot and does not drop the proxy the rules are about to rely on.
  A pod leaves the table only after its rules are gone (release) or were never completed.
- A pod whose redirection cannot be removed stays in the table and keeps its ztunnel proxy;
  the release is retried. Removing the proxy first would black-hole the pod's traffic.
- Failures are retried per pod with backoff (0.5 s doubling to 30 s), and at once when a ztunnel
  connects. A CNI ADD never waits for a retry: it fails, and the runtime retries the ADD.
- Stopping the agent releases nothing: ztunnel keeps serving, and a restarted agent rebuilds the
  table from the netns cache and the rules it finds in place (`restore`).
- Where the redirection is per link (eBPF mode), each captured pod's links are watched from
  before its install until its release: a link that appears in the meantime (a secondary
  network attached after the CNI ADD) gets the redirection by a reinstall, so it never carries
  the app's traffic past ztunnel for longer than that takes.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from cni.agent import captures, enrollment, netns_cache, plugin_server, zds_server
from cni.redirect import iptables
from meshcore import envconfig, errors, log, netns
from meshcore.aio import tasks
from meshcore.kube import client as kube_client
from meshcore.kube import errors as kube_errors
from meshcore.kube import informer, objects, resources
from meshcore.wire import zds

logger = logging.getLogger("cni.reconciler")

INITIAL_RETRY = 0.5
MAX_RETRY = 30.0
# How long stopping waits for operations in flight before cancelling them.
DRAIN_TIMEOUT = 5.0


class AgentError(errors.MeshError):
    """Root of the reconciler's errors."""


class ReconcileError(AgentError):
    """Bringing one pod to its target failed; `is_retryable` says whether trying again can help."""

    verb = "reconcile"

    def __init__(self, pod_ref: str, reason: str, *, is_retryable: bool = True) -> None:
        super().__init__(f"cannot {self.verb} pod {pod_ref}: {reason}")
        self.pod_ref = pod_ref
        self.reason = reason
        self.is_retryable = is_retryable


class CaptureError(ReconcileError):
    verb = "capture"


class ReleaseError(ReconcileError):
    verb = "release"


class ShuttingDownError(AgentError):
    def __init__(self) -> None:
        super().__init__("the node agent is shutting down")


class ZtunnelLink(Protocol):
    """What the reconciler needs of `zds_server.ZdsServer`."""

    @property
    def is_connected(self) -> bool: ...

    async def wait_connected(self, timeout: float) -> None: ...

    async def wait_disconnected(self) -> None: ...

    async def add_workload(self, uid: str, info: zds.WorkloadInfo, netns_path: str) -> None: ...

    async def del_workload(self, uid: str) -> None: ...


class LinkWatch(Protocol):
    """`cni.redirect.netlink.LinkWatch`: readable when the pod's links change."""

    def fileno(self) -> int: ...

    def drain(self) -> bool: ...

    def close(self) -> None: ...


class PodRedirector(Protocol):
    """`cni.redirect.redirector.Redirector`; blocking, so it is called from a worker thread."""

    def install(self, netns_path: str, options: iptables.RedirectOptions) -> None: ...

    def remove(self, netns_path: str) -> None: ...

    def is_installed(self, netns_path: str) -> bool: ...

    def watch_links(self, netns_path: str) -> LinkWatch | None: ...


@dataclass(frozen=True)
class Outcome:
    """Where one reconcile round left a pod. `is_settled` False: something (the annotation)
    still has to be retried, although the capture itself is as intended."""

    is_captured: bool
    decision: enrollment.EnrollmentDecision
    is_settled: bool = True


class _PodSlot:
    """Per-uid queue of length one (see the module invariants)."""

    def __init__(self, uid: str) -> None:
        self.uid = uid
        self.pod: dict[str, Any] | None = None  # the newest object seen; None if never seen
        self.is_gone = False  # the pod was deleted: release, then forget
        self.is_dirty = False
        self.waiters: list[asyncio.Future[Outcome]] = []
        self.task: asyncio.Task[None] | None = None
        self.retry: asyncio.TimerHandle | None = None
        self.failures = 0
        self.has_reported_missing_netns = False
        # Why the captured pod's redirection must be installed again (a link appeared, or a
        # CNI CHECK found it missing); None when it need not be.
        self.reinstall_reason: str | None = None

    @property
    def pod_ref(self) -> str:
        if self.pod is None:
            return self.uid
        return f"{objects.namespace(self.pod)}/{objects.name(self.pod)}"


_MESSAGES = {
    ("enroll", "enrolled"): "pod enrolled",
    ("enroll", "updated"): "pod redirection updated",
    ("enroll", "refused"): "pod not enrolled",
    ("enroll", "failed"): "pod enrollment failed",
    ("release", "released"): "pod released",
    ("release", "failed"): "pod release failed",
}


def _pod_ref(pod: Mapping[str, Any]) -> str:
    return f"{objects.namespace(pod)}/{objects.name(pod)}"


def _is_running(pod: Mapping[str, Any]) -> bool:
    status = pod.get("status")
    if not isinstance(status, Mapping):
        return False
    return bool(status.get("podIP")) or status.get("phase") == "Running"


def _elapsed_ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)


class Reconciler:
    def __init__(
        self,
        *,
        node_name: str,
        api: kube_client.ApiClient,
        zds: ZtunnelLink,
        redirector: PodRedirector,
        cache: netns_cache.NetnsCache,
        capture_table: captures.CaptureTable,
        dns_capture: bool = False,
        initial_retry: float = INITIAL_RETRY,
        max_retry: float = MAX_RETRY,
        drain_timeout: float = DRAIN_TIMEOUT,
        check_netns: Callable[[str], None] = netns.check_netns,
        system_namespace: str = envconfig.DEFAULT_SYSTEM_NAMESPACE,
    ) -> None:
        self._node_name = node_name
        self._api = api
        self._zds = zds
        self._redirector = redirector
        self._cache = cache
        self._captures = capture_table
        self._dns_capture = dns_capture
        self._initial_retry = initial_retry
        self._max_retry = max_retry
        self._drain_timeout = drain_timeout
        self._check_netns = check_netns  # raises NetnsError unless a network namespace
        self._system_namespace = system_namespace  # where ztunnel's own pods run
        self._namespaces = informer.Informer(
            api, resources.NAMESPACES, handler=self._on_namespace_event
        )
        self._pods = informer.Informer(
            api,
            resources.PODS,
            field_selector=f"spec.nodeName={node_name}",
            handler=self._on_pod_event,
        )
        self._slots: dict[str, _PodSlot] = {}
        self._link_watches: dict[str, tuple[str, LinkWatch]] = {}  # uid -> (netns, watch)
        self._workers = tasks.TaskSet()
        self._synced = asyncio.Event()
        self._is_closing = False

    @property
    def is_synced(self) -> bool:
        """Both informers have listed and every pod of the node has been queued once."""
        return self._synced.is_set()

    async def wait_synced(self) -> None:
        await self._synced.wait()

    @property
    def is_idle(self) -> bool:
        """No pod operation is running (retries may be scheduled)."""
        return len(self._workers) == 0

    def find_retrying(self) -> frozenset[str]:
        """Uids of the pods waiting for a retry after a failure."""
        return frozenset(uid for uid, slot in self._slots.items() if slot.retry is not None)

    # -- lifecycle -----------------------------------------------------------------------------

    async def restore(self) -> None:
        """Rebuild the CaptureTable from the netns cache; run before the ZDS server starts.

        Entries whose netns is gone are dropped. A pod whose rules are still installed is put
        back into the table, so the first ztunnel to connect keeps serving it; whether it should
        stay captured is decided once the informers have synced (`run`). Needs no API server.
        """
        try:
            gone = self._cache.prune()
        except netns_cache.NetnsCacheError as exc:
            gone = []
            logger.error("cannot update the netns cache", extra=log.fields(error=str(exc)))
        for entry in gone:
            logger.info(
                "forgetting a pod whose network namespace is gone",
                extra=log.fields(pod=entry.pod_ref, uid=entry.uid, netns=entry.netns),
            )
        for entry in self._cache.entries():
            try:
                installed = await asyncio.to_thread(self._redirector.is_installed, entry.netns)
            except (iptables.RedirectError, OSError) as exc:
                # Unknown counts as captured: keeping ztunnel's proxy for a pod that turns out
                # not to be redirected costs nothing, dropping one that is black-holes the pod.
                installed = True
                logger.warning(
                    "cannot tell whether a pod's redirection is installed; assuming it is",
                    extra=log.fields(pod=entry.pod_ref, uid=entry.uid, error=str(exc)),
                )
            if installed:
                info = zds.WorkloadInfo(entry.name, entry.namespace, entry.service_account)
                self._captures.put(captures.Capture(entry.uid, info, entry.netns, None))
        logger.info(
            "restored captures from the netns cache",
            extra=log.fields(
                path=self._cache.path,
                known=len(self._cache.entries()),
                captured=len(self._captures),
            ),
        )

    async def run(self) -> None:
        """Watch and reconcile until cancelled; then stop the workers (`close`)."""
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._namespaces.run(), name="namespace-informer")
                group.create_task(self._pods.run(), name="pod-informer")
                group.create_task(self._follow_ztunnel(), name="ztunnel-follower")
                await self._namespaces.wait_synced()
                await self._pods.wait_synced()
                self._resync_all()
                self._synced.set()
                logger.info(
                    "reconciler synced",
                    extra=log.fields(node=self._node_name, pods=len(self._pods.items())),
                )
        finally:
            await self.close()

    async def close(self) -> None:
        """Let operations in flight finish (up to the drain timeout), then cancel the rest.
        Captured pods stay captured."""
        self._is_closing = True
        for slot in self._slots.values():
            if slot.retry is not None:
                slot.retry.cancel()
                slot.retry = None
        if len(self._workers):
            try:
                async with asyncio.timeout(self._drain_timeout):
                    await self._workers.wait_all()
            except TimeoutError:
                logger.warning("cancelling pod operations still running at shutdown")
        self._workers.cancel_all()
        await self._workers.wait_all()
        for slot in self._slots.values():
            _fail(slot.waiters, ShuttingDownError())
            slot.waiters = []
        for uid in list(self._link_watches):
            self._unwatch_links(uid)

    def on_ztunnel_ready(self) -> None:
        """A ztunnel connected: retry every failed pod now instead of at its backoff."""
        retrying = [slot for slot in self._slots.values() if slot.retry is not None]
        if retrying:
            logger.info(
                "ztunnel connected; retrying pods now", extra=log.fields(pods=len(retrying))
            )
        for slot in retrying:
            self._kick(slot)

    async def _follow_ztunnel(self) -> None:
        while True:
            try:
                await self._zds.wait_connected(3600.0)
            except zds_server.ZtunnelTimeoutError:
                continue
            self.on_ztunnel_ready()
            await self._zds.wait_disconnected()

    # -- CNI plugin events ---------------------------------------------------------------------

    async def on_add(self, event: plugin_server.PodAddEvent) -> None:
        """Record the pod's netns; capture it now if it should be. Raises (failing the ADD, so
        the runtime retries) whenever a pod that should be captured is not."""
        started = time.monotonic()
        ref = f"{event.pod_namespace}/{event.pod_name}"
        if self._is_closing:
            raise CaptureError(ref, "the node agent is shutting down")
        try:
            # Before anything is recorded or released: an ADD naming something that is not a
            # network namespace must leave the pod's current sandbox and capture alone.
            self._check_netns(event.netns)
        except netns.NetnsError as exc:
            raise CaptureError(ref, str(exc), is_retryable=False) from exc
        pod = await self._fetch_pod_for_cni(event.pod_namespace, event.pod_name, event.pod_uid, ref)
        uid = objects.uid(pod)
        info = enrollment.build_workload_info(pod)
        entry = netns_cache.NetnsEntry(
            uid, event.netns, info.namespace, info.name, info.service_account, event.container_id
        )
        try:
            self._cache.record(entry)
        except netns_cache.NetnsCacheError as exc:
            raise CaptureError(ref, f"cannot record its network namespace: {exc}") from exc
        waiter = self._submit(uid, pod, wait=True)
        assert waiter is not None
        try:
            outcome = await waiter
        except ShuttingDownError as exc:
            raise CaptureError(ref, str(exc)) from exc
        if outcome.decision.is_enrolled and not outcome.is_captured:
            raise CaptureError(ref, "it should be captured but is not")  # defensive: see above
        if not outcome.decision.is_enrolled:
            self._log_operation("enroll", ref, uid, "refused", started, outcome.decision.reason)

    async def on_del(self, event: plugin_server.PodDelEvent) -> None:
        """Forget the sandbox's netns and release the pod. Best effort: never raises."""
        entry = self._cache.find(event.pod_uid) if event.pod_uid else None
        if entry is None:
            entry = self._cache.find_by_container(event.container_id)
        if (
            entry is not None
            and entry.container_id
            and event.container_id
            and entry.container_id != event.container_id
        ):
            # A late DEL for an earlier sandbox of the same pod: the current one stays.
            logger.info(
                "ignoring CNI DEL for a replaced sandbox",
                extra=log.fields(pod=entry.pod_ref, uid=entry.uid, container=event.container_id),
            )
            return
        uid = entry.uid if entry is not None else event.pod_uid
        if entry is not None:
            try:
                self._cache.forget(entry.uid)
            except netns_cache.NetnsCacheError as exc:
                logger.warning("cannot update the netns cache", extra=log.fields(error=str(exc)))
        if not uid or (self._captures.find(uid) is None and uid not in self._slots):
            return
        if self._is_closing:
            return
        waiter = self._submit(uid, None, wait=True)
        assert waiter is not None
        try:
            await waiter
        except AgentError as exc:
            logger.warning(
                "release after CNI DEL failed; retrying in the background",
                extra=log.fields(uid=uid, error=str(exc)),
            )

    async def on_check(self, event: plugin_server.PodCheckEvent) -> None:
        """Raise if the pod should be captured in this netns and is not, also when its
        redirection has gone from the namespace (which is then reinstalled)."""
        ref = f"{event.pod_namespace}/{event.pod_name}"
        pod = await self._fetch_pod_for_cni(event.pod_namespace, event.pod_name, event.pod_uid, ref)
        namespace = await self._fetch_namespace(objects.namespace(pod), ref)
        decision = enrollment.build_decision(pod, namespace, self._system_namespace)
        if not decision.is_enrolled:
            return
        uid = objects.uid(pod)
        capture = self._captures.find(uid)
        if capture is None or capture.netns != event.netns:
            raise CaptureError(ref, f"it should be captured ({decision.reason}) but is not")
        try:
            installed = await asyncio.to_thread(self._redirector.is_installed, capture.netns)
        except (iptables.RedirectError, OSError) as exc:
            raise CaptureError(ref, f"cannot inspect its redirection: {exc}") from exc
        if not installed:
            self._request_reinstall(uid, "its redirection was missing (CNI CHECK)")
            raise CaptureError(
                ref, "its redirection is missing from its network namespace; reinstalling"
            )

    # -- informer events -----------------------------------------------------------------------

    async def _on_pod_event(self, event: objects.WatchEvent) -> None:
        uid = objects.uid(event.object)
        if not uid or self._is_closing:
            return
        self._submit(uid, event.object, gone=event.type == objects.DELETED)

    async def _on_namespace_event(self, event: objects.WatchEvent) -> None:
        if self._is_closing:
            return
        name = objects.name(event.object)
        for pod in self._pods.items():
            uid = objects.uid(pod)
            if uid and objects.namespace(pod) == name:
                self._submit(uid, pod)

    def _resync_all(self) -> None:
        """After the first sync: every pod of the node, and every pod known only from the netns
        cache (the reconcile asks the API whether it still exists)."""
        listed: set[str] = set()
        for pod in self._pods.items():
            uid = objects.uid(pod)
            if uid:
                listed.add(uid)
                self._submit(uid, pod)
        known = {entry.uid for entry in self._cache.entries()} | self._captures.uids()
        for uid in known - listed:
            self._submit(uid, None)

    # -- per-pod queue -------------------------------------------------------------------------

    def _submit(
        self, uid: str, pod: dict[str, Any] | None, *, gone: bool = False, wait: bool = False
    ) -> asyncio.Future[Outcome] | None:
        slot = self._slot(uid)
        if pod is not None:
            slot.pod = pod
        if gone:
            slot.is_gone = True
        waiter: asyncio.Future[Outcome] | None = None
        if wait:
            waiter = asyncio.get_running_loop().create_future()
            if self._is_closing:
                waiter.set_exception(ShuttingDownError())
                return waiter
            slot.waiters.append(waiter)
        self._kick(slot)
        return waiter

    def _slot(self, uid: str) -> _PodSlot:
        slot = self._slots.get(uid)
        if slot is None:
            slot = self._slots[uid] = _PodSlot(uid)
        return slot

    def _kick(self, slot: _PodSlot) -> None:
        if slot.retry is not None:
            slot.retry.cancel()
            slot.retry = None
        slot.is_dirty = True
        if slot.task is None and not self._is_closing:
            slot.task = self._workers.spawn(self._drive(slot))

    def _schedule_retry(self, slot: _PodSlot) -> None:
        if self._is_closing:
            return
        slot.failures += 1
        delay = min(self._initial_retry * 2 ** min(slot.failures - 1, 16), self._max_retry)
        if slot.retry is not None:
            slot.retry.cancel()
        slot.retry = asyncio.get_running_loop().call_later(delay, self._retry, slot.uid)

    def _retry(self, uid: str) -> None:
        slot = self._slots.get(uid)
        if slot is not None and not self._is_closing:
            slot.retry = None
            self._kick(slot)

    async def _drive(self, slot: _PodSlot) -> None:
        """The slot's worker: runs rounds until no newer request is queued."""
        waiters: list[asyncio.Future[Outcome]] = []
        try:
            while slot.is_dirty and not self._is_closing:
                slot.is_dirty = False
                waiters, slot.waiters = slot.waiters, []
                try:
                    outcome = await self._reconcile(slot)
                except ReconcileError as exc:
                    _fail(waiters, exc)
                    if exc.is_retryable:
                        self._schedule_retry(slot)
                    continue
                except Exception as exc:
                    # A bug must not stop this pod from being retried or the ADD from answering.
                    logger.exception("pod reconcile failed", extra=log.fields(uid=slot.uid))
                    _fail(waiters, ReconcileError(slot.pod_ref, f"internal error: {exc!r}"))
                    self._schedule_retry(slot)
                    continue
                finally:
                    waiters = [w for w in waiters if not w.done()]
                for waiter in waiters:
                    waiter.set_result(outcome)
                waiters = []
                if outcome.is_settled:
                    slot.failures = 0
                else:
                    self._schedule_retry(slot)
        finally:
            slot.task = None
            # Waiters of an interrupted round (cancelled at shutdown) must still get an answer.
            leftover = [w for w in waiters if not w.done()]
            if self._is_closing:
                leftover += slot.waiters
                slot.waiters = []
            _fail(leftover, ShuttingDownError())
            if slot.is_gone and not slot.is_dirty and slot.retry is None and not slot.waiters:
                self._slots.pop(slot.uid, None)

    # -- one round -----------------------------------------------------------------------------

    async def _reconcile(self, slot: _PodSlot) -> Outcome:
        uid = slot.uid
        entry = self._cache.find(uid)
        current = self._captures.find(uid)
        if slot.pod is None and not slot.is_gone and entry is not None:
            # Known only from the netns cache (agent restart): does the pod still exist?
            found = await self._fetch_pod(entry.namespace, entry.name, entry.pod_ref)
            if found is None or objects.uid(found) != uid:
                slot.is_gone = True
            elif slot.pod is None:
                slot.pod = found
        pod = slot.pod
        ref = slot.pod_ref if pod is not None or entry is None else entry.pod_ref
        # Any install below covers every link; a failed one leaves the pod to a full enroll.
        reinstall_reason, slot.reinstall_reason = slot.reinstall_reason, None

        if slot.is_gone:
            decision = enrollment.EnrollmentDecision(False, "pod deleted")
        elif pod is None:
            decision = enrollment.EnrollmentDecision(False, "pod unknown to the node agent")
        else:
            namespace = await self._fetch_namespace(objects.namespace(pod), ref)
            decision = enrollment.build_decision(pod, namespace, self._system_namespace)

        target: captures.Capture | None = None
        if decision.is_enrolled and pod is not None:
            if entry is None:
                self._report_missing_netns(slot, pod, decision)
            else:
                slot.has_reported_missing_netns = False
                try:
                    options = enrollment.build_redirect_options(pod, dns_capture=self._dns_capture)
                except iptables.InvalidOptionsError as exc:
                    # Retrying cannot help; the next change to the pod triggers a new round. A
                    # captured pod keeps the rules it has rather than run uncaptured.
                    self._log_operation("enroll", ref, uid, "failed", time.monotonic(), str(exc))
                    raise CaptureError(ref, str(exc), is_retryable=False) from exc
                info = enrollment.build_workload_info(pod)
                target = captures.Capture(uid, info, entry.netns, options)

        if target is None:
            if current is not None:
                await self._release(current, decision.reason)
            if slot.is_gone or (pod is not None and objects.is_terminating(pod)):
                # Its sandbox is going away for good: the netns must not be used again.
                self._forget(uid)
            if slot.is_gone:
                return Outcome(False, decision)
            settled = await self._sync_annotation(slot, enabled=False)
            return Outcome(False, decision, settled)

        if current is None:
            await self._enroll(target, decision.reason)
        elif (current.netns, current.info) != (target.netns, target.info):
            await self._release(current, "pod sandbox replaced")
            await self._enroll(target, decision.reason)
        elif current.options != target.options or reinstall_reason is not None:
            await self._reinstall(target, reinstall_reason or decision.reason)
        settled = await self._sync_annotation(slot, enabled=True)
        return Outcome(True, decision, settled)

    async def _enroll(self, target: captures.Capture, reason: str) -> None:
        started = time.monotonic()
        uid, ref = target.uid, target.pod_ref
        assert target.options is not None
        self._captures.put(target)  # before the Add: see the invariants
        try:
            await self._zds.add_workload(uid, target.info, target.netns)
        except (zds_server.ZdsServerError, netns.NetnsError) as exc:
            self._captures.pop(uid)
            gone = isinstance(exc, netns.NetnsError) and exc.errno == errno.ENOENT
            why = "its network namespace no longer exists" if gone else str(exc)
            entry = self._cache.find(uid)
            if gone and entry is not None and entry.netns == target.netns:
                # The sandbox is gone: retrying on every pod event would only fail again. A new
                # sandbox comes with a new CNI ADD.
                self._forget(uid)
            self._log_operation("enroll", ref, uid, "failed", started, why)
            raise CaptureError(ref, why, is_retryable=not gone) from exc
        try:
            await self._watch_links(target)
            await asyncio.to_thread(self._redirector.install, target.netns, target.options)
        except (iptables.RedirectError, OSError) as exc:
            self._captures.pop(uid)
            self._unwatch_links(uid)
            why = f"cannot install the redirection: {exc}"
            await self._undo_add(uid, ref)
            self._log_operation("enroll", ref, uid, "failed", started, why)
            raise CaptureError(ref, why) from exc
        self._log_operation("enroll", ref, uid, "enrolled", started, reason)

    async def _reinstall(self, target: captures.Capture, reason: str) -> None:
        """Re-apply the rules with new options (or after a restart). A failed install leaves the
        pod uncaptured (Redirector contract), so ztunnel lets go of it as well."""
        started = time.monotonic()
        uid, ref = target.uid, target.pod_ref
        assert target.options is not None
        try:
            await self._watch_links(target)
            await asyncio.to_thread(self._redirector.install, target.netns, target.options)
        except (iptables.RedirectError, OSError) as exc:
            self._captures.pop(uid)
            self._unwatch_links(uid)
            why = f"cannot update the redirection: {exc}"
            await self._undo_add(uid, ref)
            self._log_operation("enroll", ref, uid, "failed", started, why)
            raise CaptureError(ref, why) from exc
        self._captures.put(target)
        self._log_operation("enroll", ref, uid, "updated", started, reason)

    async def _undo_add(self, uid: str, ref: str) -> None:
        try:
            await self._zds.del_workload(uid)
        except zds_server.ZdsServerError as exc:
            # A failed exchange closed that connection; its ztunnel drops the pod when it
            # reconnects, because the snapshot no longer lists it.
            logger.warning(
                "cannot undo AddWorkload", extra=log.fields(pod=ref, uid=uid, error=str(exc))
            )

    async def _release(self, current: captures.Capture, reason: str) -> None:
        started = time.monotonic()
        uid, ref = current.uid, current.pod_ref
        try:
            await asyncio.to_thread(self._remove_rules, current.netns)
        except (iptables.RedirectError, OSError) as exc:
            why = f"cannot remove the redirection: {exc}"
            self._log_operation("release", ref, uid, "failed", started, why)
            raise ReleaseError(ref, why) from exc
        self._unwatch_links(uid)
        self._captures.pop(uid)
        try:
            await self._zds.del_workload(uid)
        except zds_server.ZdsServerError as exc:
            logger.warning(
                "ztunnel did not confirm DelWorkload; it drops the pod at its next snapshot",
                extra=log.fields(pod=ref, uid=uid, error=str(exc)),
            )
        self._log_operation("release", ref, uid, "released", started, reason)

    async def _watch_links(self, target: captures.Capture) -> None:
        """Start watching the pod's links (before the install lists them), unless watched."""
        watched = self._link_watches.get(target.uid)
        if watched is not None and watched[0] == target.netns:
            return
        self._unwatch_links(target.uid)
        watch = await asyncio.to_thread(self._redirector.watch_links, target.netns)
        if watch is None:
            return
        self._link_watches[target.uid] = (target.netns, watch)
        asyncio.get_running_loop().add_reader(watch.fileno(), self._on_links, target.uid)

    def _unwatch_links(self, uid: str) -> None:
        watched = self._link_watches.pop(uid, None)
        if watched is not None:
            asyncio.get_running_loop().remove_reader(watched[1].fileno())
            watched[1].close()

    def _on_links(self, uid: str) -> None:
        watched = self._link_watches.get(uid)
        if watched is None:
            return
        try:
            announced = watched[1].drain()
        except OSError as exc:
            # Reinstall, which opens a new watch: harmless, where missing a new link is not.
            announced = True
            self._unwatch_links(uid)
            logger.warning(
                "cannot read a pod's link changes", extra=log.fields(uid=uid, error=str(exc))
            )
        if announced:
            self._request_reinstall(uid, "a link appeared in the pod")

    def _request_reinstall(self, uid: str, reason: str) -> None:
        if self._is_closing:
            return
        slot = self._slot(uid)
        slot.reinstall_reason = reason
        self._kick(slot)

    def _remove_rules(self, netns_path: str) -> None:
        """Worker thread. A netns that is gone took its rules with it."""
        if os.path.exists(netns_path):
            self._redirector.remove(netns_path)

    def _forget(self, uid: str) -> None:
        self._unwatch_links(uid)
        try:
            self._cache.forget(uid)
        except netns_cache.NetnsCacheError as exc:
            logger.warning("cannot update the netns cache", extra=log.fields(error=str(exc)))

    async def _sync_annotation(self, slot: _PodSlot, *, enabled: bool) -> bool:
        """Make the pod's redirection annotation say what is in place; False: retry later."""
        pod = slot.pod
        if pod is None or slot.is_gone:
            return True
        want = enrollment.REDIRECTION_ENABLED if enabled else None
        if objects.annotations_of(pod).get(enrollment.REDIRECTION_ANNOTATION) == want:
            return True
        # metadata.uid makes the patch apply to this incarnation of the name only: the uid is
        # immutable, so Kubernetes rejects the patch (Invalid) when the name was reused.
        patch = {
            "metadata": {"uid": slot.uid, "annotations": {enrollment.REDIRECTION_ANNOTATION: want}}
        }
        try:
            updated = await self._api.patch(
                resources.PODS, objects.name(pod), objects.namespace(pod), patch
            )
        except (kube_errors.NotFoundError, kube_errors.ConflictError, kube_errors.InvalidError):
            return True  # the pod is gone or was replaced: nothing left to annotate
        except kube_errors.KubeError as exc:
            logger.warning(
                "cannot update the pod's redirection annotation; will retry",
                extra=log.fields(pod=slot.pod_ref, uid=slot.uid, error=str(exc)),
            )
            return False
        if slot.pod is pod:
            slot.pod = updated
        return True

    def _report_missing_netns(
        self, slot: _PodSlot, pod: Mapping[str, Any], decision: enrollment.EnrollmentDecision
    ) -> None:
        if slot.has_reported_missing_netns:
            return
        slot.has_reported_missing_netns = True
        fields = log.fields(pod=_pod_ref(pod), uid=slot.uid, reason=decision.reason)
        if _is_running(pod):
            logger.warning(
                "pod should be captured but its network namespace is unknown (this agent saw "
                "no CNI ADD for it); it stays uncaptured until its sandbox is re-created",
                extra=fields,
            )
        else:
            logger.info("pod will be captured at its CNI ADD", extra=fields)

    def _log_operation(
        self, action: str, ref: str, uid: str, outcome: str, started: float, reason: str
    ) -> None:
        """The one log line per enroll/release (fixed key set, asserted on by tests)."""
        level = logging.WARNING if outcome == "failed" else logging.INFO
        logger.log(
            level,
            _MESSAGES.get((action, outcome), f"pod {action}: {outcome}"),
            extra=log.fields(
                pod=ref,
                uid=uid,
                action=action,
                outcome=outcome,
                duration_ms=_elapsed_ms(started),
                reason=reason,
            ),
        )

    # -- lookups -------------------------------------------------------------------------------

    async def _fetch_namespace(self, name: str, ref: str) -> dict[str, Any] | None:
        """From the informer cache, else from the API (the cache may lag); None if it does not
        exist."""
        found = self._namespaces.find(name)
        if found is not None:
            return found
        try:
            return await self._api.get(resources.NAMESPACES, name)
        except kube_errors.NotFoundError:
            return None
        except kube_errors.KubeError as exc:
            raise CaptureError(
                ref, f"cannot read namespace {name} from the Kubernetes API: {exc}"
            ) from exc

    async def _fetch_pod(self, namespace: str, name: str, ref: str) -> dict[str, Any] | None:
        try:
            return await self._api.get(resources.PODS, name, namespace)
        except kube_errors.NotFoundError:
            return None
        except kube_errors.KubeError as exc:
            raise CaptureError(ref, f"cannot read the pod from the Kubernetes API: {exc}") from exc

    async def _fetch_pod_for_cni(
        self, namespace: str, name: str, uid: str, ref: str
    ) -> dict[str, Any]:
        cached = self._pods.find(name, namespace)
        if cached is not None and (not uid or objects.uid(cached) == uid):
            return cached
        pod = await self._fetch_pod(namespace, name, ref)
        if pod is None:
            raise CaptureError(ref, "the pod does not exist in the Kubernetes API")
        if uid and objects.uid(pod) != uid:
            raise CaptureError(
                ref,
                f"the runtime's pod uid {uid} does not match uid {objects.uid(pod)} in the "
                "Kubernetes API (the pod was replaced)",
            )
        return pod


def _fail(waiters: list[asyncio.Future[Outcome]], exc: BaseException) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_exception(exc)
