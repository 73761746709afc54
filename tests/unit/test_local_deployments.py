"""The deployment controller's pure parts (hash, names, pods, plans, watch keys) and the
Deployment schema's errors."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

import pytest

from controller.sources.local import deployments, kinds, schemas, validation
from meshcore.kube import objects

TEMPLATE: dict[str, Any] = {
    "metadata": {"labels": {"app": "web"}, "annotations": {"note": "x"}},
    "spec": {"containers": [{"name": "app", "command": ["sleep", "infinity"]}]},
}


def _deployment(replicas: int = 2, template: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "shop", "uid": "dep-uid", "generation": 3},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "web"}},
            "template": copy.deepcopy(template or TEMPLATE),
        },
    }


CURRENT = deployments.build_template_hash(TEMPLATE)
OLD = "oldhash"


def _pod(
    name: str,
    *,
    hash_: str = CURRENT,
    ready: bool = False,
    created: int = 0,
    node: str = "n1",
    phase: str = "Running",
    terminating: bool = False,
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "uid": f"uid-{name}",
        "labels": {"app": "web", deployments.POD_TEMPLATE_HASH_LABEL: hash_},
        "creationTimestamp": f"2026-01-01T00:00:{created:02d}Z",
    }
    if terminating:
        meta["deletionTimestamp"] = "2026-01-01T00:01:00Z"
    return {
        "metadata": meta,
        "spec": {"nodeName": node} if node else {},
        "status": {
            "phase": phase,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


# -- hash and names -----------------------------------------------------------------------


def test_template_hash_is_stable_and_looks_like_kubernetes() -> None:
    reordered = {"spec": TEMPLATE["spec"], "metadata": TEMPLATE["metadata"]}
    assert deployments.build_template_hash(reordered) == CURRENT
    assert re.fullmatch(r"[bcdfghjklmnpqrstvwxz2456789]{1,10}", CURRENT)
    assert deployments.build_template_hash(TEMPLATE) == CURRENT  # no hidden state


def test_template_hash_of_a_template_stored_with_a_lone_surrogate_does_not_crash() -> None:
    # The API refuses such text now; a store written before must not crash-loop the controller.
    odd = {"spec": {"containers": [{"name": "app", "image": "\ud800"}]}}
    assert re.fullmatch(
        r"[bcdfghjklmnpqrstvwxz2456789]{1,10}", deployments.build_template_hash(odd)
    )


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda t: t["spec"]["containers"][0].update(command=["true"]), id="command"),
        pytest.param(lambda t: t["metadata"]["labels"].update(tier="x"), id="label"),
        pytest.param(lambda t: t["metadata"]["annotations"].clear(), id="annotation"),
    ],
)
def test_template_hash_changes_with_the_template(edit: Callable[[dict[str, Any]], None]) -> None:
    changed = copy.deepcopy(TEMPLATE)
    edit(changed)
    assert deployments.build_template_hash(changed) != CURRENT


@pytest.mark.parametrize(
    ("deployment", "hash_", "suffix", "expected"),
    [
        pytest.param("web", "7c5ddbdf54", "x2b4q", "web-7c5ddbdf54-x2b4q", id="short"),
        pytest.param(
            "a" * 60,
            "7c5ddbdf54",
            "x2b4q",
            "a" * 58 + "x2b4q",
            id="base-cut-to-58",
        ),
        pytest.param(
            "b" * 45,
            "7c5ddbdf54",
            "x2b4q",
            "b" * 45 + "-7c5ddbdf54-x2b4q",
            id="exactly-58",
        ),
    ],
)
def test_pod_names(deployment: str, hash_: str, suffix: str, expected: str) -> None:
    name = deployments.build_pod_name(deployment, hash_, suffix)
    assert name == expected
    assert len(name) <= 63
    assert validation.dns_subdomain(name) is None


def test_random_suffix_is_five_lowercase_alphanumerics() -> None:
    suffixes = {deployments.random_suffix() for _ in range(50)}
    assert all(re.fullmatch(r"[a-z0-9]{5}", s) for s in suffixes)
    assert len(suffixes) > 1


def test_pod_from_template_carries_hash_label_and_owner() -> None:
    dep = _deployment()
    pod = deployments.build_pod(dep, "h4sh", "web-h4sh-abcde")
    assert pod["apiVersion"] == "v1"
    assert pod["kind"] == "Pod"
    assert pod["metadata"] == {
        "name": "web-h4sh-abcde",
        "namespace": "shop",
        "labels": {"app": "web", "pod-template-hash": "h4sh"},
        "annotations": {"note": "x"},
        "ownerReferences": [
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": "web",
                "uid": "dep-uid",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }
    assert pod["spec"] == TEMPLATE["spec"]
    pod["spec"]["containers"][0]["command"].append("changed")
    assert dep["spec"]["template"]["spec"]["containers"][0]["command"] == ["sleep", "infinity"]
    assert validation.validate(schemas.POD, pod) == []


@pytest.mark.parametrize(
    ("refs", "found"),
    [
        pytest.param(None, False, id="none"),
        pytest.param(
            [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "w", "controller": True}],
            True,
            id="deployment-controller",
        ),
        pytest.param(
            [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "w"}],
            False,
            id="not-controller",
        ),
        pytest.param(
            [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "w", "controller": True}],
            False,
            id="other-kind",
        ),
    ],
)
def test_find_controller_ref(refs: list[dict[str, Any]] | None, found: bool) -> None:
    pod = {"metadata": {"name": "p", **({"ownerReferences": refs} if refs else {})}}
    assert (deployments.find_controller_ref(pod) is not None) is found


# -- plans ------------------------------------------------------------------------------------


def _names(plan: deployments.Plan) -> list[str]:
    return [ref.name for ref in plan.delete]


def test_creates_what_is_missing() -> None:
    plan = deployments.build_plan(_deployment(3), [_pod("a", ready=True)])
    assert (plan.create, _names(plan)) == (2, [])
    assert plan.template_hash == CURRENT
    assert plan.status == {
        "observedGeneration": 3,
        "replicas": 1,
        "updatedReplicas": 1,
        "readyReplicas": 1,
        "availableReplicas": 1,
        "unavailableReplicas": 2,
    }


def test_settled_deployment_does_nothing() -> None:
    pods = [_pod("a", ready=True), _pod("b", ready=True)]
    plan = deployments.build_plan(_deployment(2), pods)
    assert (plan.create, _names(plan)) == (0, [])
    assert plan.status["readyReplicas"] == 2


@pytest.mark.parametrize(
    ("pods", "replicas", "deleted"),
    [
        pytest.param(
            [_pod("old", ready=True, created=1), _pod("new", ready=True, created=5)],
            1,
            ["new"],
            id="newest-first",
        ),
        pytest.param(
            [
                _pod("ready-new", ready=True, created=9),
                _pod("unready-old", created=1),
                _pod("ready-old", ready=True, created=2),
            ],
            1,
            ["unready-old", "ready-new"],
            id="not-ready-before-ready",
        ),
        pytest.param(
            [
                _pod("running", created=1),
                _pod("pending", created=0, phase="Pending"),
                _pod("unscheduled", created=0, node="", phase="Pending"),
            ],
            1,
            ["unscheduled", "pending"],
            id="unscheduled-then-pending",
        ),
        pytest.param(
            [_pod("a", ready=True, created=1), _pod("b", ready=True, created=2)],
            0,
            ["b", "a"],
            id="to-zero",
        ),
    ],
)
def test_scale_down_order(pods: list[dict[str, Any]], replicas: int, deleted: list[str]) -> None:
    plan = deployments.build_plan(_deployment(replicas), pods)
    assert (plan.create, _names(plan)) == (0, deleted)


def test_terminating_pods_do_not_count_and_ended_ones_are_replaced() -> None:
    pods = [
        _pod("going", ready=True, terminating=True),
        _pod("failed", phase="Failed"),
        _pod("ok", ready=True),
    ]
    plan = deployments.build_plan(_deployment(2), pods)
    assert (plan.create, _names(plan)) == (1, ["failed"])
    assert plan.status["replicas"] == 1


@pytest.mark.parametrize(
    ("pods", "create", "deleted"),
    [
        pytest.param(
            [_pod("o1", hash_=OLD, ready=True), _pod("o2", hash_=OLD, ready=True)],
            1,
            [],
            id="start-with-one-surge-pod",
        ),
        pytest.param(
            [_pod("o1", hash_=OLD, ready=True), _pod("o2", hash_=OLD, ready=True), _pod("n1")],
            0,
            [],
            id="wait-for-the-new-pod",
        ),
        pytest.param(
            [
                _pod("o1", hash_=OLD, ready=True, created=1),
                _pod("o2", hash_=OLD, ready=True, created=2),
                _pod("n1", ready=True),
            ],
            1,
            ["o2"],
            id="new-ready-retires-one-old",
        ),
        pytest.param(
            [_pod("o1", hash_=OLD, ready=True), _pod("n1", ready=True), _pod("n2", ready=True)],
            0,
            ["o1"],
            id="finish",
        ),
        pytest.param(
            [_pod("o1", hash_=OLD), _pod("o2", hash_=OLD, ready=True)],
            2,
            ["o1"],
            id="unready-old-go-at-once",
        ),
    ],
)
def test_rollout_steps(pods: list[dict[str, Any]], create: int, deleted: list[str]) -> None:
    plan = deployments.build_plan(_deployment(2), pods)
    assert (plan.create, _names(plan)) == (create, deleted)
    kept = [p for p in pods if objects.name(p) not in deleted]
    ready_after = sum(1 for p in kept if deployments.is_pod_ready(p))
    ready_before = sum(1 for p in pods if deployments.is_pod_ready(p))
    assert ready_after >= min(2, ready_before)


def test_rollout_never_drops_ready_pods_below_replicas() -> None:
    """Simulate a whole rollout of 4 replicas where every created pod becomes Ready before the
    next step: Ready never drops below 4, the total never exceeds 4 + surge, and it ends with
    exactly 4 pods of the new template."""
    replicas = 4
    dep = _deployment(replicas)
    pods = [_pod(f"o{i}", hash_=OLD, ready=True, created=i) for i in range(replicas)]
    serial = 0
    for _ in range(20):
        plan = deployments.build_plan(dep, pods)
        if not plan.create and not plan.delete:
            break
        doomed = set(_names(plan))
        pods = [p for p in pods if objects.name(p) not in doomed]
        assert sum(1 for p in pods if deployments.is_pod_ready(p)) >= replicas
        for _ in range(plan.create):
            serial += 1
            pods.append(_pod(f"n{serial}", created=10 + serial))
        assert len(pods) <= replicas + deployments.max_surge(replicas)
        for p in pods:  # the kubelet starts what was created
            p["status"]["conditions"][0]["status"] = "True"
    assert sorted(objects.labels(p)["pod-template-hash"] for p in pods) == [CURRENT] * replicas


@pytest.mark.parametrize(
    ("replicas", "surge"),
    [
        pytest.param(0, 1, id="zero"),
        pytest.param(1, 1, id="one"),
        pytest.param(4, 1, id="four"),
        pytest.param(5, 2, id="five"),
        pytest.param(10, 3, id="ten"),
    ],
)
def test_max_surge(replicas: int, surge: int) -> None:
    assert deployments.max_surge(replicas) == surge


@pytest.mark.parametrize(
    ("obj", "keys"),
    [
        pytest.param(
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": "w", "namespace": "s"},
            },
            [("s", "w")],
            id="deployment",
        ),
        pytest.param(
            {
                "kind": "Pod",
                "metadata": {
                    "name": "w-1",
                    "namespace": "s",
                    "ownerReferences": [
                        {
                            "apiVersion": "apps/v1",
                            "kind": "Deployment",
                            "name": "w",
                            "controller": True,
                        }
                    ],
                },
            },
            [("s", "w")],
            id="owned-pod",
        ),
        pytest.param(
            {"kind": "Pod", "metadata": {"name": "p", "namespace": "s"}}, [], id="bare-pod"
        ),
        pytest.param(
            {"kind": "Service", "metadata": {"name": "w", "namespace": "s"}}, [], id="other"
        ),
    ],
)
def test_watch_keys(obj: dict[str, Any], keys: list[tuple[str, str]]) -> None:
    assert deployments.build_watch_keys(objects.WatchEvent("MODIFIED", obj)) == keys


# -- schema -----------------------------------------------------------------------------------


def _valid() -> dict[str, Any]:
    dep = _deployment()
    del dep["metadata"]["uid"]
    return dep


def test_valid_deployment_passes_and_gets_defaults() -> None:
    dep = _valid()
    del dep["spec"]["replicas"]
    assert validation.validate(schemas.DEPLOYMENT, dep) == []
    kinds.default_deployment(dep)
    assert dep["spec"]["replicas"] == 1
    template_spec = dep["spec"]["template"]["spec"]
    assert template_spec["restartPolicy"] == "Always"
    assert template_spec["serviceAccountName"] == "default"
    assert validation.validate(schemas.DEPLOYMENT, dep) == []


def _edit(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(obj: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target = obj
        for part in parents:
            target = target[part]
        if value is ...:
            del target[last]
        else:
            target[last] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        pytest.param(
            _edit("spec.template.metadata.labels", {"app": "other"}),
            'spec.template.metadata.labels: Invalid value: {"app": "other"}: `selector` does not '
            "match template `labels`",
            id="selector-mismatch",
        ),
        pytest.param(
            _edit("spec.replicas", 2**31),
            "spec.replicas: Invalid value: 2147483648: must be less than or equal to 2147483647",
            id="replicas-beyond-int32",
        ),
        pytest.param(
            _edit("spec.replicas", -1),
            "spec.replicas: Invalid value: -1: must be greater than or equal to 0",
            id="negative-replicas",
        ),
        pytest.param(
            _edit("spec.replicas", "2"),
            'spec.replicas: Invalid value: "2": must be of type integer',
            id="replicas-string",
        ),
        pytest.param(
            _edit("spec.selector", ...), "spec.selector: Required value", id="no-selector"
        ),
        pytest.param(
            _edit("spec.selector", {}),
            "spec.selector.matchLabels: Required value: a Deployment needs a non-empty selector",
            id="empty-selector",
        ),
        pytest.param(
            _edit("spec.template", ...), "spec.template: Required value", id="no-template"
        ),
        pytest.param(
            lambda d: d["spec"]["template"]["spec"]["containers"][0].pop("command"),
            "spec.template.spec.containers[0].command: Required value",
            id="pod-spec-schema",
        ),
        pytest.param(
            _edit("spec.template.spec.restartPolicy", "Never"),
            'spec.template.spec.restartPolicy: Unsupported value: "Never": supported values: '
            '"Always"',
            id="restart-policy",
        ),
        pytest.param(
            _edit("spec.strategy", {"type": "Recreate"}),
            "spec.strategy: Unknown field",
            id="strategy-not-served",
        ),
        pytest.param(
            _edit("status.replicas", -2),
            "status.replicas: Invalid value: -2: must be greater than or equal to 0",
            id="status",
        ),
    ],
)
def test_invalid_deployments_name_the_field(
    edit: Callable[[dict[str, Any]], None], message: str
) -> None:
    dep = _valid()
    dep["status"] = {}
    edit(dep)
    found = validation.validate(schemas.DEPLOYMENT, dep)
    assert [str(e) for e in found] == [message]
    error = validation.build_invalid_error("Deployment", "web", found)
    assert str(error.message) == f'Deployment "web" is invalid: {message}'


def test_only_one_controller_owner_reference() -> None:
    ref = {"apiVersion": "apps/v1", "kind": "Deployment", "uid": "u", "controller": True}
    pod: dict[str, Any] = {
        "metadata": {
            "name": "p",
            "ownerReferences": [{**ref, "name": "a"}, {**ref, "name": "b"}],
        },
        "spec": {"containers": [{"name": "c", "command": ["x"]}]},
    }
    found = [str(e) for e in validation.validate(schemas.POD, pod)]
    assert found == [
        'metadata.ownerReferences: Invalid value: ["a", "b"]: Only one reference can have '
        'Controller set to true. Found "true" in references for Deployment/a, Deployment/b'
    ]
    pod["metadata"]["ownerReferences"] = [{"kind": "Deployment", "name": "a"}]
    found = [str(e) for e in validation.validate(schemas.POD, pod)]
    assert found == [
        "metadata.ownerReferences[0].apiVersion: Required value",
        "metadata.ownerReferences[0].uid: Required value",
    ]
