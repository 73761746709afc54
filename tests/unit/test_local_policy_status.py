"""The ZtunnelAccepted condition of an AuthorizationPolicy, decided from the object alone, and
the status that carries it (written only when the condition changes)."""

from __future__ import annotations

from typing import Any

import pytest

from controller.sources.local import policystatus

ROOT = "istio-system"


def _policy(spec: dict[str, Any], **meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "p", "namespace": "shop", "generation": 3, **meta},
        "spec": spec,
    }


def _condition(spec: dict[str, Any], **meta: Any) -> policystatus.ZtunnelCondition:
    return policystatus.build_condition(_policy(spec, **meta), root_namespace=ROOT)


ALLOW_FRONTEND = {
    "action": "ALLOW",
    "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/default/sa/frontend"]}}]}],
}


@pytest.mark.parametrize(
    ("spec", "status", "reason"),
    [
        pytest.param(ALLOW_FRONTEND, "True", "Accepted", id="l4-allow"),
        pytest.param({}, "True", "Accepted", id="allow-nothing"),
        pytest.param(
            {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["22"]}}]}]},
            "True",
            "Accepted",
            id="l4-deny",
        ),
        pytest.param(
            {"rules": [{"to": [{"operation": {"methods": ["GET"], "ports": ["80"]}}]}]},
            "True",
            "UnsupportedValue",
            id="http-in-allow",
        ),
        pytest.param(
            {"targetRefs": [{"kind": "Service", "name": "web"}]},
            "False",
            "Ignored",
            id="target-refs",
        ),
        pytest.param(
            {"targetRef": {"kind": "Service", "name": "web"}},
            "False",
            "Ignored",
            id="target-ref",
        ),
        pytest.param({"action": "AUDIT", "rules": [{}]}, "False", "UnsupportedValue", id="audit"),
    ],
)
def test_condition(spec: dict[str, Any], status: str, reason: str) -> None:
    found = _condition(spec)
    assert (found.status, found.reason) == (status, reason)


def test_accepted_uses_istiods_message() -> None:
    assert _condition(ALLOW_FRONTEND).message == "attached to ztunnel"


def test_http_attributes_get_istiods_sentence() -> None:
    spec = {"rules": [{"to": [{"operation": {"methods": ["GET"], "paths": ["/a"]}}]}]}
    assert _condition(spec).message.startswith(
        "ztunnel does not support HTTP attributes (found: methods, paths). In ambient mode you "
        "must use a waypoint proxy to enforce HTTP rules. Within an ALLOW policy, rules matching "
        "HTTP attributes are omitted."
    )


def test_audit_says_ztunnel_lacks_it() -> None:
    assert _condition({"action": "AUDIT"}).message == "ztunnel does not support the AUDIT action"


def test_target_refs_say_why_ztunnel_ignores_them() -> None:
    message = _condition({"targetRefs": [{"kind": "Service", "name": "web"}]}).message
    assert message.startswith("not attached to ztunnel")
    assert "waypoint" in message


def test_dry_run_is_reported_unless_the_controller_sends_dry_runs() -> None:
    annotations = {"istio.io/dry-run": "true"}
    policy = _policy(ALLOW_FRONTEND, annotations=annotations)
    held = policystatus.build_condition(policy, root_namespace=ROOT)
    assert held.reason == "UnsupportedValue"
    assert "dry-run" in held.message
    sent = policystatus.build_condition(policy, root_namespace=ROOT, dry_run_enabled=True)
    assert sent.reason == "Accepted"


NOW = "2025-01-02T03:04:05Z"
LATER = "2025-01-02T04:00:00Z"


def test_status_is_written_once_then_left_alone() -> None:
    policy = _policy(ALLOW_FRONTEND)
    accepted = policystatus.build_condition(policy, root_namespace=ROOT)
    status = policystatus.build_status(policy, accepted, NOW)
    assert status == {
        "conditions": [
            {
                "type": "ZtunnelAccepted",
                "status": "True",
                "reason": "Accepted",
                "message": "attached to ztunnel",
                "observedGeneration": 3,
                "lastTransitionTime": NOW,
            }
        ]
    }
    policy["status"] = status
    assert policystatus.build_status(policy, accepted, LATER) is None


def test_a_new_generation_is_recorded_and_keeps_the_transition_time() -> None:
    policy = _policy(ALLOW_FRONTEND)
    accepted = policystatus.build_condition(policy, root_namespace=ROOT)
    policy["status"] = policystatus.build_status(policy, accepted, NOW)
    policy["metadata"]["generation"] = 4
    status = policystatus.build_status(policy, accepted, LATER)
    assert status is not None
    (condition,) = status["conditions"]
    assert condition["observedGeneration"] == 4
    assert condition["lastTransitionTime"] == NOW  # the status did not change


def test_a_status_change_moves_the_transition_time_and_keeps_other_conditions() -> None:
    policy = _policy(ALLOW_FRONTEND)
    waypoint = {"type": "WaypointAccepted", "status": "False", "reason": "TargetNotFound"}
    accepted = policystatus.build_condition(policy, root_namespace=ROOT)
    first = policystatus.build_status(policy, accepted, NOW)
    assert first is not None
    policy["status"] = {"conditions": [waypoint, *first["conditions"]]}
    ignored = policystatus.ZtunnelCondition("False", "Ignored", "x")
    status = policystatus.build_status(policy, ignored, LATER)
    assert status is not None
    assert status["conditions"][0] == waypoint
    assert status["conditions"][1]["status"] == "False"
    assert status["conditions"][1]["lastTransitionTime"] == LATER
    assert len(status["conditions"]) == 2
