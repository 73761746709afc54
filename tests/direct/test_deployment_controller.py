"""The deployment controller against a real ObjectStore persisted in a temporary directory.

The tests play the kubelet's part by hand (marking pods Ready, finishing terminating pods), so
each step of a scale or rollout can be checked. Waiting is on the store's own watch with a
deadline: every change the controller makes is a store event.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from controller.sources.local import deployments, kinds, persistence, store
from meshcore.kube import errors, objects, resources
from tests.direct import store_harness

NS = "shop"
DEPLOYMENTS = kinds.DEPLOYMENTS
TIMEOUT = 10.0


class TickingClock:
    """Every reading is one second later: creation times are distinct and ordered."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        self.now += 1
        return self.now


def deployment(name: str = "web", replicas: int = 3, command: str = "infinity") -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "app", "command": ["sleep", command]}]},
            },
        },
    }


@pytest.fixture
def state_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="deploy-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def open_store(directory: str, clock: TickingClock, *, with_node: bool = True) -> store.ObjectStore:
    st = store.ObjectStore(
        kinds.build_registry(),
        store_persistence=persistence.FilePersistence(directory),
        clock=clock,
    )
    if st.find(resources.NAMESPACES, NS) is None:
        st.create(resources.NAMESPACES, {"metadata": {"name": NS}})
    if with_node and st.find(resources.NODES, "n1") is None:
        st.create(
            resources.NODES,
            {
                "metadata": {"name": "n1"},
                "status": {"conditions": [{"type": "Ready", "status": "True"}]},
            },
        )
    return st


def running(
    st: store.ObjectStore, controller: deployments.DeploymentController | None = None
) -> contextlib.AbstractAsyncContextManager[deployments.DeploymentController]:
    return store_harness.running(controller or deployments.DeploymentController(st), TIMEOUT)


def pods(st: store.ObjectStore, *, terminating: bool = False) -> list[dict[str, Any]]:
    """The pods in NS; without `terminating`, only those not on their way out."""
    return [
        p for p in st.list(resources.PODS, NS).items if terminating or not objects.is_terminating(p)
    ]


def names(items: list[dict[str, Any]]) -> list[str]:
    return sorted(objects.name(p) for p in items)


def template_hash(st: store.ObjectStore, name: str = "web") -> str:
    return deployments.build_template_hash(st.get(DEPLOYMENTS, name, NS)["spec"]["template"])


def status(st: store.ObjectStore, name: str = "web") -> dict[str, Any]:
    found = st.get(DEPLOYMENTS, name, NS)
    return {"generation": found["metadata"]["generation"], **found.get("status", {})}


def is_settled(st: store.ObjectStore, name: str = "web") -> bool:
    """The controller has recorded a status for the current spec that matches the pods."""
    dep = st.get(DEPLOYMENTS, name, NS)
    current = dep.get("status", {})
    mine = [p for p in pods(st) if objects.labels(p).get("app") == name]
    return bool(
        current.get("observedGeneration") == dep["metadata"]["generation"]
        and current.get("replicas") == len(mine)
        and current.get("readyReplicas") == sum(deployments.is_pod_ready(p) for p in mine)
    )


async def until(st: store.ObjectStore, what: str, predicate: Callable[[], bool]) -> None:
    await store_harness.until(
        st,
        what,
        predicate,
        describe=lambda: f"pods: {names(pods(st, terminating=True))}",
        timeout=TIMEOUT,
    )


def make_ready(st: store.ObjectStore, name: str) -> None:
    st.patch(
        resources.PODS,
        name,
        NS,
        {
            "status": {
                "phase": "Running",
                "conditions": [{"type": "Ready", "status": "True"}],
            }
        },
        subresource="status",
    )


def finish_terminating(st: store.ObjectStore) -> list[str]:
    """What the kubelet does once a deleted pod's containers stopped."""
    done = []
    for pod in pods(st, terminating=True):
        if objects.is_terminating(pod):
            st.delete(resources.PODS, objects.name(pod), NS, grace_period_seconds=0)
            done.append(objects.name(pod))
    return sorted(done)


def test_pods_are_named_labelled_owned_and_scheduled(state_dir: str) -> None:
    async def main() -> None:
        st = open_store(state_dir, TickingClock())
        async with running(st):
            created = st.create(DEPLOYMENTS, deployment(replicas=3))
            await until(
                st, "3 pods and their status", lambda: len(pods(st)) == 3 and is_settled(st)
            )
            hash_ = template_hash(st)
            for pod in pods(st):
                assert re.fullmatch(rf"web-{hash_}-[a-z0-9]{{5}}", objects.name(pod))
                assert objects.labels(pod) == {"app": "web", "pod-template-hash": hash_}
                assert pod["metadata"]["ownerReferences"] == [
                    {
                        "apiVersion": "apps/v1",
                        "kind": "Deployment",
                        "name": "web",
                        "uid": created["metadata"]["uid"],
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ]
                # Through the normal path: defaulted and bound by the store's scheduler.
                assert pod["spec"]["nodeName"] == "n1"
                assert pod["spec"]["restartPolicy"] == "Always"
            assert status(st) == {
                "generation": 1,
                "observedGeneration": 1,
                "replicas": 3,
                "updatedReplicas": 3,
                "readyReplicas": 0,
                "availableReplicas": 0,
                "unavailableReplicas": 3,
            }
            for pod in pods(st):
                make_ready(st, objects.name(pod))
            await until(st, "3 ready", lambda: status(st).get("readyReplicas") == 3)
            assert status(st)["availableReplicas"] == 3
            assert status(st)["unavailableReplicas"] == 0

    asyncio.run(main())


def test_scale_up_and_down_converges(state_dir: str) -> None:
    async def main() -> None:
        st = open_store(state_dir, TickingClock())
        async with running(st):
            st.create(DEPLOYMENTS, deployment(replicas=2))
            await until(st, "2 pods", lambda: len(pods(st)) == 2 and is_settled(st))
            first = names(pods(st))

            st.patch(DEPLOYMENTS, "web", NS, {"spec": {"replicas": 5}})
            await until(st, "5 pods", lambda: len(pods(st)) == 5 and is_settled(st))
            assert set(first) < set(names(pods(st)))
            assert status(st)["observedGeneration"] == 2

            st.patch(DEPLOYMENTS, "web", NS, {"spec": {"replicas": 1}})
            await until(st, "1 pod", lambda: len(pods(st)) == 1 and is_settled(st))
            assert len(finish_terminating(st)) == 4
            assert len(pods(st, terminating=True)) == 1
            await until(st, "status of 1", lambda: is_settled(st))
            assert status(st)["replicas"] == 1

            st.patch(DEPLOYMENTS, "web", NS, {"spec": {"replicas": 0}})
            await until(st, "no pods", lambda: not pods(st) and is_settled(st))
            finish_terminating(st)
            assert pods(st, terminating=True) == []
            assert status(st)["replicas"] == 0

    asyncio.run(main())


def test_many_replicas_come_in_bursts_while_the_store_stays_answerable(state_dir: str) -> None:
    """Found by an audit: 1,500 replicas were created in one go (each create also re-ran the
    reconcile through its own event), and the API did not answer for minutes."""
    wanted = deployments.BURST_REPLICAS * 2 + 30
    seen: list[int] = []  # pod counts observed between the controller's turns

    async def main() -> None:
        st = open_store(state_dir, TickingClock())
        async with running(st):
            st.create(DEPLOYMENTS, deployment(replicas=wanted))
            for _ in range(10_000):  # loop turns, not time: the controller takes one per turn
                seen.append(len(pods(st)))
                if seen[-1] == wanted:
                    break
                await asyncio.sleep(0)
            await until(st, f"{wanted} pods", lambda: is_settled(st))

    asyncio.run(main())
    assert seen[-1] == wanted
    # Other work ran between the bursts, and no burst was larger than allowed.
    assert [n for n in seen if 0 < n < wanted]
    assert all(b - a <= deployments.BURST_REPLICAS for a, b in itertools.pairwise(seen))


def test_scale_down_removes_pods_not_ready_first_then_newest(state_dir: str) -> None:
    async def main() -> None:
        st = open_store(state_dir, TickingClock())
        async with running(st):
            st.create(DEPLOYMENTS, deployment(replicas=3))
            await until(st, "3 pods", lambda: len(pods(st)) == 3)
            by_age = sorted(pods(st), key=lambda p: p["metadata"]["creationTimestamp"])
            oldest, middle, newest = (objects.name(p) for p in by_age)
            make_ready(st, oldest)
            make_ready(st, newest)

            st.patch(DEPLOYMENTS, "web", NS, {"spec": {"replicas": 2}})
            await until(st, "2 pods", lambda: len(pods(st)) == 2)
            assert names(pods(st)) == sorted([oldest, newest]), "the unready pod goes first"

            st.patch(DEPLOYMENTS, "web", NS, {"spec": {"replicas": 1}})
            await until(st, "1 pod", lambda: len(pods(st)) == 1)
            assert names(pods(st)) == [oldest], "then the newest"
            await until(st, "settled", lambda: is_settled(st))
            assert finish_terminating(st) == sorted([middle, newest])

    asyncio.run(main())


def test_template_change_rolls_without_losing_ready_pods(state_dir: str) -> None:
    async def main() -> None:
        st = open_store(state_dir, TickingClock())
        async with running(st):
            st.create(DEPLOYMENTS, deployment(replicas=2))
            await until(st, "2 pods", lambda: len(pods(st)) == 2)
            for pod in pods(st):
                make_ready(st, objects.name(pod))
            old_hash = template_hash(st)
            old = names(pods(st))

            changed = copy.deepcopy(st.get(DEPLOYMENTS, "web", NS))
            changed["spec"]["template"]["spec"]["containers"][0]["command"] = ["sleep", "1d"]
            st.replace(DEPLOYMENTS, changed, NS, "web")
            new_hash = template_hash(st)
            assert new_hash != old_hash

            def of(hash_: str) -> list[str]:
                return names(
                    [p for p in pods(st) if objects.labels(p)["pod-template-hash"] == hash_]
                )

            def ready_count() -> int:
                return sum(deployments.is_pod_ready(p) for p in pods(st))

            # One surge pod; the old ones stay until it is Ready.
            await until(st, "a surge pod", lambda: len(of(new_hash)) == 1 and is_settled(st))
            assert of(old_hash) == old
            assert ready_count() == 2
            assert status(st)["updatedReplicas"] == 1

            make_ready(st, of(new_hash)[0])
            await until(st, "one old retired", lambda: len(of(old_hash)) == 1)
            await until(st, "the second new pod", lambda: len(of(new_hash)) == 2)
            assert ready_count() == 2
            assert len(finish_terminating(st)) == 1

            second = next(
                n
                for n in of(new_hash)
                if not deployments.is_pod_ready(st.get(resources.PODS, n, NS))
            )
            assert ready_count() == 2
            make_ready(st, second)
            await until(st, "the last old retired", lambda: not of(old_hash))
            assert ready_count() == 2
            assert len(finish_terminating(st)) == 1
            await until(st, "settled", lambda: is_settled(st))
            assert len(pods(st, terminating=True)) == 2
            assert status(st) == {
                "generation": 2,
                "observedGeneration": 2,
                "replicas": 2,
                "updatedReplicas": 2,
                "readyReplicas": 2,
                "availableReplicas": 2,
                "unavailableReplicas": 0,
            }

    asyncio.run(main())


def test_deleting_the_deployment_deletes_its_pods(state_dir: str) -> None:
    async def main() -> None:
        st = open_store(state_dir, TickingClock())
        bare = {
            "metadata": {"name": "bare", "labels": {"app": "web"}},
            "spec": {"containers": [{"name": "app", "command": ["sleep", "1"]}]},
        }
        st.create(resources.PODS, bare, NS)
        async with running(st):
            st.create(DEPLOYMENTS, deployment(replicas=2))
            st.create(DEPLOYMENTS, deployment("other", replicas=1))
            await until(st, "4 pods", lambda: len(pods(st)) == 4)
            st.delete(DEPLOYMENTS, "web", NS)
            await until(st, "web's pods terminating", lambda: len(pods(st)) == 2)
            assert len(finish_terminating(st)) == 2
            # Another deployment's pods and a pod with no owner (even with matching labels) stay.
            left = names(pods(st, terminating=True))
            assert "bare" in left
            assert all(n == "bare" or n.startswith("other-") for n in left)

            # A new Deployment with the old name does not adopt an old incarnation's pods.
            first = st.get(DEPLOYMENTS, "other", NS)
            old_pod = next(n for n in left if n.startswith("other-"))
            st.delete(DEPLOYMENTS, "other", NS)
            st.create(DEPLOYMENTS, deployment("other", replicas=1))
            second = st.get(DEPLOYMENTS, "other", NS)
            assert first["metadata"]["uid"] != second["metadata"]["uid"]
            await until(
                st,
                "the old incarnation's pod to go",
                lambda: old_pod not in names(pods(st)) and len(pods(st)) == 2,
            )
            replacement = next(n for n in names(pods(st)) if n.startswith("other-"))
            owner = st.get(resources.PODS, replacement, NS)["metadata"]["ownerReferences"][0]
            assert owner["uid"] == second["metadata"]["uid"]

    asyncio.run(main())


def test_a_deleted_pod_is_replaced(state_dir: str) -> None:
    async def main() -> None:
        st = open_store(state_dir, TickingClock())
        async with running(st):
            st.create(DEPLOYMENTS, deployment(replicas=2))
            await until(st, "2 pods", lambda: len(pods(st)) == 2)
            victim = names(pods(st))[0]
            st.delete(resources.PODS, victim, NS)  # graceful: terminating first
            await until(
                st, "a replacement", lambda: len(pods(st)) == 2 and victim not in names(pods(st))
            )
            finish_terminating(st)
            assert len(pods(st, terminating=True)) == 2

    asyncio.run(main())


def test_restart_creates_nothing_extra_and_catches_up(state_dir: str) -> None:
    async def main() -> None:
        clock = TickingClock()
        st = open_store(state_dir, clock)
        async with running(st):
            st.create(DEPLOYMENTS, deployment(replicas=3))
            st.create(DEPLOYMENTS, deployment("gone", replicas=1))
            await until(st, "4 pods", lambda: len(pods(st)) == 4 and is_settled(st))
        before = names(pods(st))
        st.close()

        # A restart with nothing changed: the same pods, nothing created or deleted.
        st = open_store(state_dir, clock)
        version = st.resource_version
        async with running(st):
            assert names(pods(st)) == before
            assert st.resource_version == version, "the resync wrote something"
        st.close()

        # Changes made while no controller ran are picked up on start.
        st = open_store(state_dir, clock)
        st.patch(DEPLOYMENTS, "web", NS, {"spec": {"replicas": 1}})
        st.delete(DEPLOYMENTS, "gone", NS)
        async with running(st):
            assert len(pods(st)) == 1, "reconciled during the start, before `synced`"
            assert not [n for n in names(pods(st)) if n.startswith("gone-")]
            assert set(names(pods(st))) < set(before)
            await until(st, "settled", lambda: is_settled(st))
            assert status(st)["replicas"] == 1

    asyncio.run(main())


class FlakyPersistence(persistence.FilePersistence):
    """Fails the first `failures` pod writes, as a full disk would."""

    def __init__(self, directory: str, failures: int) -> None:
        super().__init__(directory)
        self.failures = failures

    def save_object(
        self, rtype: resources.ResourceType, obj: dict[str, Any], resource_version: int
    ) -> None:
        if rtype == resources.PODS and self.failures > 0:
            self.failures -= 1
            raise OSError(28, "No space left on device")
        super().save_object(rtype, obj, resource_version)


def test_a_failed_write_is_retried(state_dir: str) -> None:
    async def main() -> None:
        flaky = FlakyPersistence(state_dir, failures=2)
        st = store.ObjectStore(kinds.build_registry(), store_persistence=flaky)
        st.create(resources.NAMESPACES, {"metadata": {"name": NS}})
        controller = deployments.DeploymentController(st, initial_retry=0.01, max_retry=0.05)
        async with running(st, controller):
            st.create(DEPLOYMENTS, deployment(replicas=2))
            # No other event comes: only the retry timer can finish the job.
            await until(st, "2 pods after retries", lambda: len(pods(st)) == 2 and is_settled(st))
            assert flaky.failures == 0

    asyncio.run(main())


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(
            lambda d: d["spec"]["template"]["metadata"].update(labels={"app": "other"}),
            'Deployment "web" is invalid: spec.template.metadata.labels: Invalid value: '
            '{"app": "other"}: `selector` does not match template `labels`',
            id="selector-mismatch",
        ),
        pytest.param(
            lambda d: d["spec"].update(replicas=-1),
            'Deployment "web" is invalid: spec.replicas: Invalid value: -1: must be greater '
            "than or equal to 0",
            id="negative-replicas",
        ),
        pytest.param(
            lambda d: d["spec"]["template"]["spec"]["containers"][0].pop("command"),
            'Deployment "web" is invalid: spec.template.spec.containers[0].command: Required value',
            id="pod-spec",
        ),
    ],
)
def test_invalid_deployments_are_rejected_with_field_paths(
    state_dir: str, body: Callable[[dict[str, Any]], None], message: str
) -> None:
    st = open_store(state_dir, TickingClock(), with_node=False)
    bad = deployment()
    body(bad)
    with pytest.raises(errors.InvalidError) as created:
        st.create(DEPLOYMENTS, bad)
    assert created.value.message == message
    assert st.find(DEPLOYMENTS, "web", NS) is None

    # The same check on an update; the stored object is untouched.
    st.create(DEPLOYMENTS, deployment())
    with pytest.raises(errors.InvalidError) as replaced:
        st.replace(DEPLOYMENTS, bad, NS, "web")
    assert replaced.value.message == message
    assert st.get(DEPLOYMENTS, "web", NS)["metadata"]["generation"] == 1


def test_generation_grows_with_spec_changes_only(state_dir: str) -> None:
    st = open_store(state_dir, TickingClock(), with_node=False)
    created = st.create(
        DEPLOYMENTS, {**deployment(), "metadata": {"name": "web", "namespace": NS, "generation": 9}}
    )
    assert created["metadata"]["generation"] == 1
    assert created["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 30
    st.patch(DEPLOYMENTS, "web", NS, {"metadata": {"labels": {"team": "a"}}})
    st.patch(DEPLOYMENTS, "web", NS, {"status": {"replicas": 0}}, subresource="status")
    assert st.get(DEPLOYMENTS, "web", NS)["metadata"]["generation"] == 1
    st.patch(DEPLOYMENTS, "web", NS, {"spec": {"replicas": 4}, "metadata": {"generation": 1}})
    assert st.get(DEPLOYMENTS, "web", NS)["metadata"]["generation"] == 2
    # Restating a default is no change of spec.
    st.patch(DEPLOYMENTS, "web", NS, {"spec": {"template": {"spec": {"restartPolicy": "Always"}}}})
    assert st.get(DEPLOYMENTS, "web", NS)["metadata"]["generation"] == 2
