from __future__ import annotations

from typing import Any

from meshcore.kube import informer, objects


def _pod(name: str, version: str, namespace: str = "shop") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace, "resourceVersion": version}}


def test_relist_events_against_the_cache() -> None:
    cache = {
        ("shop", "same"): _pod("same", "1"),
        ("shop", "changed"): _pod("changed", "2"),
        ("shop", "gone"): _pod("gone", "3"),
        ("other", "same"): _pod("same", "4", "other"),
    }
    listed = [
        _pod("same", "1"),
        _pod("changed", "9"),
        _pod("new", "10"),
        _pod("same", "4", "other"),
    ]
    events = informer.build_relist_events(cache, listed)
    assert [(e.type, objects.key(e.object)) for e in events] == [
        (objects.ADDED, ("shop", "changed")),
        (objects.ADDED, ("shop", "new")),
        (objects.DELETED, ("shop", "gone")),
    ]
    # The DELETED event carries the last state the cache knew.
    assert events[-1].object is cache[("shop", "gone")]


def test_relist_of_empty_cache_adds_everything_and_empty_list_deletes_everything() -> None:
    listed = [_pod("a", "1"), _pod("b", "2")]
    assert [e.type for e in informer.build_relist_events({}, listed)] == ["ADDED", "ADDED"]
    cache = {objects.key(p): p for p in listed}
    assert [e.type for e in informer.build_relist_events(cache, [])] == ["DELETED", "DELETED"]
    assert informer.build_relist_events(cache, listed) == []
