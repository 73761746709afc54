from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import pytest

from controller.sources.local import errors as local_errors
from controller.sources.local import kinds, persistence, store, watch
from meshcore.kube import errors, objects, resources, selectors


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def _store(**kwargs: Any) -> store.ObjectStore:
    return store.ObjectStore(kinds.build_registry(), **kwargs)


def _ns(name: str) -> dict[str, Any]:
    return {"metadata": {"name": name}}


def _node(name: str, ready: bool = True) -> dict[str, Any]:
    status = "True" if ready else "False"
    return {
        "metadata": {"name": name},
        "status": {"conditions": [{"type": "Ready", "status": status}]},
    }


def _pod(name: str, node: str = "", **spec: Any) -> dict[str, Any]:
    pod_spec: dict[str, Any] = {"containers": [{"name": "app", "command": ["sleep", "1"]}], **spec}
    if node:
        pod_spec["nodeName"] = node
    return {"metadata": {"name": name, "labels": {"app": name}}, "spec": pod_spec}


def _service(name: str, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"ports": [{"port": 80}], **spec}}


def _change(kind: str, new: dict[str, Any], old: dict[str, Any] | None = None) -> watch.Change:
    return watch.Change(kind, resources.PODS, new, old, 1)


ON_N1 = watch.WatchFilter(
    resources.PODS, field_selector=selectors.parse_field_selector("spec.nodeName=n1")
)
UNBOUND = {"metadata": {"name": "p"}, "spec": {}}
BOUND = {"metadata": {"name": "p"}, "spec": {"nodeName": "n1"}}
ELSEWHERE = {"metadata": {"name": "p"}, "spec": {"nodeName": "n2"}}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (_change("ADDED", BOUND), "ADDED"),
        (_change("ADDED", UNBOUND), None),
        (_change("MODIFIED", BOUND, UNBOUND), "ADDED"),
        (_change("MODIFIED", BOUND, BOUND), "MODIFIED"),
        (_change("MODIFIED", ELSEWHERE, BOUND), "DELETED"),
        (_change("MODIFIED", ELSEWHERE, UNBOUND), None),
        (_change("DELETED", BOUND), "DELETED"),
        (_change("DELETED", ELSEWHERE), None),
    ],
    ids=[
        "added",
        "added-elsewhere",
        "starts-matching",
        "still-matching",
        "stops-matching",
        "never-matching",
        "deleted",
        "deleted-elsewhere",
    ],
)
def test_filtered_watch_turns_transitions_into_added_and_deleted(
    change: watch.Change, expected: str | None
) -> None:
    event = ON_N1.build_event(change)
    assert (event.type if event else None) == expected


def test_server_fields_defaults_and_versions() -> None:
    clock = FakeClock()
    st = _store(clock=clock)
    st.create(resources.NAMESPACES, _ns("shop"))
    pod = st.create(resources.PODS, _pod("web"), "shop")
    meta = pod["metadata"]
    assert len(meta["uid"]) == 36
    assert meta["creationTimestamp"] == "2023-11-14T22:13:20Z"
    assert meta["namespace"] == "shop"
    # The scheduler's Unschedulable update (no nodes here) follows the create.
    assert int(meta["resourceVersion"]) == st.resource_version - 1
    assert pod["spec"]["serviceAccountName"] == "default"
    assert pod["spec"]["terminationGracePeriodSeconds"] == 30
    assert pod["status"] == {"phase": "Pending"}
    # Callers get copies: changing one does not change the store.
    pod["spec"]["containers"].clear()
    assert st.get(resources.PODS, "web", "shop")["spec"]["containers"]


def test_generate_name() -> None:
    st = _store()
    created = st.create(resources.NAMESPACES, {"metadata": {"generateName": "test-"}})
    assert objects.name(created).startswith("test-")
    assert len(objects.name(created)) == 10


def test_unchanged_write_keeps_the_version_and_sends_no_event() -> None:
    async def main() -> None:
        st = _store()
        ns = st.create(resources.NAMESPACES, {"metadata": {"name": "shop", "labels": {"a": "b"}}})
        sub = st.subscribe(resources.NAMESPACES)
        again = st.patch(resources.NAMESPACES, "shop", None, {"metadata": {"labels": {"a": "b"}}})
        assert again == ns
        st.patch(resources.NAMESPACES, "shop", None, {"metadata": {"labels": {"a": "c"}}})
        event = await anext(sub)
        assert event.type == "MODIFIED"
        assert objects.labels(event.object) == {"a": "c"}
        sub.close()

    asyncio.run(main())


def test_subscribe_from_a_version_replays_and_rejects_the_impossible() -> None:
    async def main() -> None:
        st = _store(history_size=3)
        start = st.resource_version
        for name in ("a", "b"):
            st.create(resources.NAMESPACES, _ns(name))
        sub = st.subscribe(resources.NAMESPACES, since=start)
        assert [objects.name((await anext(sub)).object) for _ in range(2)] == ["a", "b"]
        sub.close()
        for name in ("c", "d", "e"):
            st.create(resources.NAMESPACES, _ns(name))
        with pytest.raises(errors.GoneError, match="too old resource version"):
            st.subscribe(resources.NAMESPACES, since=start)
        with pytest.raises(errors.GoneError, match="too large resource version"):
            st.subscribe(resources.NAMESPACES, since=st.resource_version + 1)
        # The oldest change still kept can be resumed from the version before it.
        sub = st.subscribe(resources.NAMESPACES, since=st.resource_version - 3)
        names = [objects.name((await anext(sub)).object) for _ in range(3)]
        assert names == ["c", "d", "e"]
        sub.close()

    asyncio.run(main())


def test_a_subscriber_that_falls_behind_gets_410_and_ends() -> None:
    async def main() -> None:
        st = _store(history_size=2)
        sub = st.subscribe(resources.NAMESPACES)
        for name in ("a", "b", "c"):
            st.create(resources.NAMESPACES, _ns(name))
        event = await anext(sub)
        assert event.type == "ERROR"
        assert event.object["code"] == 410
        with pytest.raises(StopAsyncIteration):
            await anext(sub)

    asyncio.run(main())


def test_pending_pods_are_scheduled_when_a_ready_node_appears() -> None:
    st = _store()
    st.create(resources.NAMESPACES, _ns("shop"))
    pod = st.create(resources.PODS, _pod("web"), "shop")
    assert "nodeName" not in pod["spec"]
    st.create(resources.NODES, _node("n0", ready=False))
    assert "nodeName" not in st.get(resources.PODS, "web", "shop")["spec"]
    # The node turning Ready through its status takes the pending pod.
    st.patch(
        resources.NODES,
        "n0",
        None,
        {"status": {"conditions": [{"type": "Ready", "status": "True"}]}},
        subresource="status",
    )
    assert st.get(resources.PODS, "web", "shop")["spec"]["nodeName"] == "n0"
    # A pod no node fits waits until a node that fits is created.
    st.create(resources.PODS, _pod("api", nodeSelector={"zone": "b"}), "shop")
    assert "nodeName" not in st.get(resources.PODS, "api", "shop")["spec"]
    labelled = _node("n1")
    labelled["metadata"]["labels"] = {"zone": "b"}
    st.create(resources.NODES, labelled)
    assert st.get(resources.PODS, "api", "shop")["spec"]["nodeName"] == "n1"


def test_graceful_pod_deletion_uses_the_grace_period() -> None:
    clock = FakeClock()
    st = _store(clock=clock)
    st.create(resources.NAMESPACES, _ns("shop"))
    st.create(resources.PODS, _pod("web", "n1", terminationGracePeriodSeconds=10), "shop")
    marked = st.delete(resources.PODS, "web", "shop")
    assert marked["metadata"]["deletionTimestamp"] == "2023-11-14T22:13:30Z"
    assert marked["metadata"]["deletionGracePeriodSeconds"] == 10
    # Deleting again with a longer grace changes nothing; a shorter one shortens it.
    assert st.delete(resources.PODS, "web", "shop", grace_period_seconds=20) == marked
    shorter = st.delete(resources.PODS, "web", "shop", grace_period_seconds=2)
    assert shorter["metadata"]["deletionGracePeriodSeconds"] == 2
    with pytest.raises(errors.ConflictError, match="Precondition failed: UID in precondition"):
        st.delete(resources.PODS, "web", "shop", grace_period_seconds=0, precondition_uid="x")
    for bad in (-1, 10**12):
        with pytest.raises(errors.BadRequestError, match="gracePeriodSeconds must be between"):
            st.delete(resources.PODS, "web", "shop", grace_period_seconds=bad)
    st.delete(
        resources.PODS, "web", "shop", grace_period_seconds=0, precondition_uid=objects.uid(marked)
    )
    assert st.find(resources.PODS, "web", "shop") is None


def test_unscheduled_or_finished_pods_go_at_once() -> None:
    st = _store()
    st.create(resources.NAMESPACES, _ns("shop"))
    st.create(resources.PODS, _pod("pending"), "shop")
    st.delete(resources.PODS, "pending", "shop")
    assert st.find(resources.PODS, "pending", "shop") is None
    done = _pod("done", "n1")
    done["status"] = {"phase": "Succeeded"}
    st.create(resources.PODS, done, "shop")
    st.delete(resources.PODS, "done", "shop")
    assert st.find(resources.PODS, "done", "shop") is None


def test_deleting_a_node_removes_its_pods() -> None:
    st = _store()
    st.create(resources.NAMESPACES, _ns("shop"))
    st.create(resources.NODES, _node("n1"))
    st.create(resources.PODS, _pod("web"), "shop")
    st.delete(resources.NODES, "n1")
    assert st.list(resources.PODS).items == []


def test_cluster_ip_is_kept_immutable_and_released() -> None:
    st = _store(service_cidr="10.96.0.0/30")  # two usable addresses
    st.create(resources.NAMESPACES, _ns("shop"))
    web = st.create(resources.SERVICES, _service("web"), "shop")
    assert web["spec"]["clusterIP"] == "10.96.0.1"
    assert web["spec"]["clusterIPs"] == ["10.96.0.1"]
    replaced = st.replace(resources.SERVICES, _service("web", selector={"a": "b"}), "shop", "web")
    assert replaced["spec"]["clusterIP"] == "10.96.0.1"
    with pytest.raises(errors.InvalidError) as err:
        st.patch(resources.SERVICES, "web", "shop", {"spec": {"clusterIP": "10.96.0.2"}})
    assert str(err.value) == (
        'Service "web" is invalid: spec.clusterIP: Invalid value: "10.96.0.2": field is immutable'
    )
    st.create(resources.SERVICES, _service("api"), "shop")
    with pytest.raises(errors.InvalidError) as err:
        st.create(resources.SERVICES, _service("full"), "shop")
    assert str(err.value) == (
        'Service "full" is invalid: spec.clusterIP: Internal error: failed to allocate a '
        "serviceIP: range is full (10.96.0.0/30)"
    )
    st.delete(resources.SERVICES, "web", "shop")
    assert (
        st.create(resources.SERVICES, _service("full"), "shop")["spec"]["clusterIP"] == "10.96.0.1"
    )
    headless = st.create(resources.SERVICES, _service("db", clusterIP="None"), "shop")
    assert headless["spec"]["clusterIPs"] == ["None"]


def test_protected_and_terminating_namespaces() -> None:
    st = _store()
    with pytest.raises(errors.ForbiddenError, match="this namespace may not be deleted"):
        st.delete(resources.NAMESPACES, "default")
    st.create(resources.NAMESPACES, _ns("shop"))
    st.create(resources.PODS, _pod("web", "n1"), "shop")
    terminating = st.delete(resources.NAMESPACES, "shop")
    assert terminating["status"]["phase"] == "Terminating"
    with pytest.raises(errors.ForbiddenError) as err:
        st.create(resources.SERVICES, _service("web"), "shop")
    assert str(err.value) == (
        "unable to create new content in namespace shop because it is being terminated"
    )
    # A PUT cannot bring a terminating namespace back to Active.
    st.replace(resources.NAMESPACES, {"metadata": {"name": "shop"}, "status": {"phase": "Active"}})
    assert st.get(resources.NAMESPACES, "shop")["status"]["phase"] == "Terminating"
    st.delete(resources.PODS, "web", "shop", grace_period_seconds=0)
    assert st.find(resources.NAMESPACES, "shop") is None


def test_corrupt_store_file_is_a_startup_error_naming_it(tmp_path: Any) -> None:
    directory = str(tmp_path / "store")
    st = _store(store_persistence=persistence.FilePersistence(directory))
    st.create(resources.NAMESPACES, _ns("shop"))
    path = os.path.join(directory, "core", "namespaces", "_cluster", "shop.json")
    with open(path, "w") as f:
        f.write("{not json")
    with pytest.raises(local_errors.CorruptStoreError) as err:
        _store(store_persistence=persistence.FilePersistence(directory))
    assert err.value.path == path
    assert str(err.value).startswith(f"corrupt store file {path}: not valid JSON")
    with open(path, "w") as f:
        json.dump({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "other"}}, f)
    with pytest.raises(local_errors.CorruptStoreError, match=r"metadata\.name is 'other'"):
        _store(store_persistence=persistence.FilePersistence(directory))
    os.unlink(path)
    stray = os.path.join(directory, "core", "deployments")
    os.makedirs(stray)
    with pytest.raises(local_errors.CorruptStoreError, match="no served kind is stored here"):
        _store(store_persistence=persistence.FilePersistence(directory))


def test_interrupted_write_is_cleaned_up(tmp_path: Any) -> None:
    directory = str(tmp_path / "store")
    _store(store_persistence=persistence.FilePersistence(directory))
    leftover = os.path.join(directory, "core", "namespaces", "_cluster", ".shop.json.tmp")
    with open(leftover, "w") as f:
        f.write("{")
    st = _store(store_persistence=persistence.FilePersistence(directory))
    assert not os.path.exists(leftover)
    assert st.find(resources.NAMESPACES, "shop") is None


def test_the_counter_on_disk_is_written_once_per_block_and_never_behind(tmp_path: Any) -> None:
    """meta.json reserves resourceVersions in blocks: a write within the block touches only
    its object's file, yet no version handed out is ever beyond what the disk holds."""
    directory = str(tmp_path / "store")
    meta_path = os.path.join(directory, persistence.META_FILE)

    def on_disk() -> tuple[int, int]:
        with open(meta_path, "rb") as f:
            return json.load(f)["resourceVersion"], os.stat(meta_path).st_ino

    st = _store(store_persistence=persistence.FilePersistence(directory))
    first = st.create(resources.NAMESPACES, _ns("shop"))
    ceiling, inode = on_disk()
    versions = [int(objects.resource_version(first))]
    for n in range(20):
        patched = st.patch(
            resources.NAMESPACES, "shop", None, {"metadata": {"labels": {"n": str(n)}}}
        )
        versions.append(int(objects.resource_version(patched)))
    assert on_disk() == (ceiling, inode)  # rewritten files get a new inode (atomic rename)
    assert max(versions) <= ceiling < versions[0] + persistence.META_RESERVE

    # Past the block, the counter moves on before the version that needs it is handed out.
    for n in range(persistence.META_RESERVE):
        patched = st.patch(
            resources.NAMESPACES, "shop", None, {"metadata": {"labels": {"m": str(n)}}}
        )
    assert int(objects.resource_version(patched)) <= on_disk()[0]
    assert on_disk()[0] > ceiling

    # After a crash (no close), a restarted store continues beyond every version the old one
    # handed out.
    restarted = _store(store_persistence=persistence.FilePersistence(directory))
    assert restarted.get(resources.NAMESPACES, "shop")["metadata"]["labels"]["m"] == str(
        persistence.META_RESERVE - 1
    )
    later = restarted.create(resources.NAMESPACES, _ns("later"))
    assert int(objects.resource_version(later)) > int(objects.resource_version(patched))

    # A store that closed recorded its exact version: the next one resumes right there.
    restarted.close()
    assert on_disk()[0] == restarted.resource_version
    resumed = _store(store_persistence=persistence.FilePersistence(directory))
    assert resumed.resource_version == restarted.resource_version
