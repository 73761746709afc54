"""The policy status controller against a real ObjectStore persisted in a temporary directory:
every AuthorizationPolicy gets its ZtunnelAccepted condition, kept up to date with its spec,
written through the status subresource and only when it changes.

Waiting is on the store's own watch with a deadline. That the controller does not write in a
loop is shown by ordering: it handles events in order, so once it has answered a later change,
it has finished with the earlier ones, and their resourceVersions must not have moved.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from controller.sources.local import kinds, persistence, policystatus, store
from meshcore.kube import objects, resources
from tests.direct import store_harness

NS = "shop"
AP = kinds.AUTHORIZATION_POLICIES
TIMEOUT = 10.0
FRONTEND = "cluster.local/ns/default/sa/frontend"


@pytest.fixture
def state_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="polstat-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def policy(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": NS},
        "spec": spec,
    }


ALLOW = {"action": "ALLOW", "rules": [{"from": [{"source": {"principals": [FRONTEND]}}]}]}
HTTP_ALLOW = {"rules": [{"to": [{"operation": {"methods": ["GET"], "ports": ["80"]}}]}]}
WAYPOINT = {"targetRefs": [{"kind": "Service", "name": "web"}]}


def open_store(
    directory: str, store_persistence: persistence.Persistence | None = None
) -> store.ObjectStore:
    st = store.ObjectStore(
        kinds.build_registry(),
        store_persistence=store_persistence or persistence.FilePersistence(directory),
    )
    if st.find(resources.NAMESPACES, NS) is None:
        st.create(resources.NAMESPACES, {"metadata": {"name": NS}})
    return st


def running(
    st: store.ObjectStore, controller: policystatus.PolicyStatusController | None = None
) -> contextlib.AbstractAsyncContextManager[policystatus.PolicyStatusController]:
    return store_harness.running(controller or policystatus.PolicyStatusController(st), TIMEOUT)


async def until(st: store.ObjectStore, what: str, predicate: Callable[[], bool]) -> None:
    await store_harness.until(st, what, predicate, timeout=TIMEOUT)


def condition(st: store.ObjectStore, name: str) -> dict[str, Any] | None:
    found = st.get(AP, name, NS)
    for c in found.get("status", {}).get("conditions", []):
        if c.get("type") == "ZtunnelAccepted":
            assert isinstance(c, dict)
            return c
    return None


def has(st: store.ObjectStore, name: str, status: str, reason: str, generation: int = 1) -> bool:
    c = condition(st, name) or {}
    found = (c.get("status"), c.get("reason"), c.get("observedGeneration"))
    return found == (status, reason, generation)


def version(st: store.ObjectStore, name: str) -> str:
    return objects.resource_version(st.get(AP, name, NS))


def test_every_policy_gets_its_condition_and_it_follows_the_spec(state_dir: str) -> None:
    async def main() -> None:
        st = open_store(state_dir)
        st.create(AP, policy("before", ALLOW))  # exists when the controller starts: resync
        async with running(st):
            await until(st, "the resynced policy", lambda: has(st, "before", "True", "Accepted"))
            c = condition(st, "before")
            assert c is not None
            assert c["message"] == "attached to ztunnel"
            accepted_at = c["lastTransitionTime"]

            st.create(AP, policy("http", HTTP_ALLOW))
            await until(st, "UnsupportedValue", lambda: has(st, "http", "True", "UnsupportedValue"))
            c = condition(st, "http")
            assert c is not None
            assert c["message"].startswith("ztunnel does not support HTTP attributes (found: ")

            st.create(AP, policy("waypoint", WAYPOINT))
            await until(st, "Ignored", lambda: has(st, "waypoint", "False", "Ignored"))

            # A spec change: a new generation, then a new verdict.
            st.patch(AP, "before", NS, {"spec": HTTP_ALLOW})
            await until(
                st, "generation 2", lambda: has(st, "before", "True", "UnsupportedValue", 2)
            )
            c = condition(st, "before")
            assert c is not None
            assert c["lastTransitionTime"] == accepted_at  # still True: no transition
            st.patch(AP, "before", NS, {"spec": WAYPOINT})
            await until(st, "generation 3", lambda: has(st, "before", "False", "Ignored", 3))

    asyncio.run(main())


class TickingClock:
    """Every reading is one second later: a needless rewrite would change the timestamp, so
    the store could not mistake it for no change."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        self.now += 1
        return self.now


def test_the_controller_does_not_write_in_a_loop(state_dir: str) -> None:
    async def main() -> None:
        st = open_store(state_dir)
        controller = policystatus.PolicyStatusController(st, clock=TickingClock())
        async with running(st, controller):
            st.create(AP, policy("first", ALLOW))
            await until(st, "first status", lambda: has(st, "first", "True", "Accepted"))
            settled = version(st, "first")
            # A label change is a MODIFIED event the controller handles, with nothing to write.
            st.patch(AP, "first", NS, {"metadata": {"labels": {"team": "a"}}})
            labelled = version(st, "first")
            assert labelled != settled
            # Events are handled in order: once "second" has its status, the label event of
            # "first" and the controller's own status write before it were handled too.
            st.create(AP, policy("second", ALLOW))
            await until(st, "second status", lambda: has(st, "second", "True", "Accepted"))
            assert version(st, "first") == labelled

    asyncio.run(main())


def test_status_survives_a_restart_without_a_rewrite(state_dir: str) -> None:
    async def main() -> None:
        st = open_store(state_dir)
        async with running(st):
            st.create(AP, policy("p", ALLOW))
            await until(st, "status", lambda: has(st, "p", "True", "Accepted"))
        before = version(st, "p")
        st.close()
        again = open_store(state_dir)
        async with running(again):
            # synced: the resync reconciled "p" (synchronously) and found nothing to write.
            assert version(again, "p") == before
            assert has(again, "p", "True", "Accepted")
        again.close()

    asyncio.run(main())


def test_user_writes_to_status_are_put_right(state_dir: str) -> None:
    async def main() -> None:
        st = open_store(state_dir)
        async with running(st):
            st.create(AP, policy("p", ALLOW))
            await until(st, "status", lambda: has(st, "p", "True", "Accepted"))
            body = st.get(AP, "p", NS)
            body["status"] = {"conditions": [{"type": "ZtunnelAccepted", "status": "False"}]}
            st.replace(AP, body, NS, "p", subresource="status")
            await until(st, "status restored", lambda: has(st, "p", "True", "Accepted"))

    asyncio.run(main())


class FlakyPersistence(persistence.FilePersistence):
    """Fails the first `failures` policy writes, as a full disk would."""

    def __init__(self, directory: str, failures: int) -> None:
        super().__init__(directory)
        self.failures = failures

    def save_object(
        self, rtype: resources.ResourceType, obj: dict[str, Any], resource_version: int
    ) -> None:
        if rtype == AP and "status" in obj and self.failures > 0:
            self.failures -= 1
            raise OSError(28, "No space left on device")
        super().save_object(rtype, obj, resource_version)


def test_a_failed_status_write_is_retried(state_dir: str) -> None:
    async def main() -> None:
        flaky = FlakyPersistence(state_dir, failures=2)
        st = open_store(state_dir, flaky)
        controller = policystatus.PolicyStatusController(st, initial_retry=0.01, max_retry=0.05)
        async with running(st, controller):
            st.create(AP, policy("p", ALLOW))
            # No other event comes: only the retry timer can write the status.
            await until(st, "status after retries", lambda: has(st, "p", "True", "Accepted"))
            assert flaky.failures == 0

    asyncio.run(main())
