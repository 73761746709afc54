from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from controller.sources.local import schemas, validation
from meshcore.kube import errors

Edit = Callable[[dict[str, Any]], None]


def _pod() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web"}},
        "spec": {
            "containers": [
                {
                    "name": "app",
                    "command": ["python3", "-m", "http.server"],
                    "args": ["8080"],
                    "ports": [{"containerPort": 8080, "name": "http", "protocol": "TCP"}],
                    "env": [
                        {"name": "MODE", "value": "demo"},
                        {
                            "name": "POD_IP",
                            "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}},
                        },
                        {
                            "name": "APP",
                            "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}},
                        },
                    ],
                }
            ],
            "serviceAccountName": "web-sa",
            "nodeName": "",
        },
        "status": {"phase": "Running", "podIP": "10.244.0.5", "podIPs": [{"ip": "10.244.0.5"}]},
    }


def _service() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {
            "selector": {"app": "web"},
            "ports": [{"name": "http", "port": 80, "targetPort": "http"}],
        },
    }


def _set(path: str, value: Any) -> Edit:
    """An edit that sets (or, with `...`, deletes) a dotted path; `[i]` indexes lists."""

    def edit(obj: dict[str, Any]) -> None:
        target: Any = obj
        parts = path.replace("[", ".").replace("]", "").split(".")
        for part in parts[:-1]:
            target = target[int(part)] if isinstance(target, list) else target[part]
        last = parts[-1]
        if value is ...:
            del target[last]
        elif isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value

    return edit


def test_valid_objects_pass() -> None:
    assert validation.validate(schemas.POD, _pod()) == []
    assert validation.validate(schemas.SERVICE, _service()) == []
    headless = _service()
    headless["spec"] = {"clusterIP": "None", "selector": {"app": "web"}}
    assert validation.validate(schemas.SERVICE, headless) == []
    node = {
        "metadata": {"name": "node-1.local"},
        "spec": {"podCIDR": "10.244.1.0/24"},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]},
    }
    assert validation.validate(schemas.NODE, node) == []
    assert validation.validate(schemas.NAMESPACE, {"metadata": {"name": "shop"}}) == []


POD_CASES: list[tuple[str, Edit, str]] = [
    (
        "no-command",
        _set("spec.containers[0].command", ...),
        "spec.containers[0].command: Required value",
    ),
    (
        "empty-command",
        _set("spec.containers[0].command", []),
        "spec.containers[0].command: Required value",
    ),
    (
        "command-not-strings",
        _set("spec.containers[0].command", ["a", 1]),
        "spec.containers[0].command[1]: Invalid value: 1: must be of type string",
    ),
    (
        "command-not-list",
        _set("spec.containers[0].command", "sleep 1"),
        'spec.containers[0].command: Invalid value: "sleep 1": must be of type array',
    ),
    ("no-containers", _set("spec.containers", []), "spec.containers: Required value"),
    ("no-spec", _set("spec", ...), "spec: Required value"),
    ("no-name", _set("metadata.name", ...), "metadata.name: Required value"),
    ("empty-name", _set("metadata.name", ""), "metadata.name: Required value"),
    (
        "bad-name",
        _set("metadata.name", "Web_1"),
        'metadata.name: Invalid value: "Web_1": a lowercase RFC 1123 subdomain must consist of '
        "lower case alphanumeric characters, '-' or '.', and must start and end with an "
        "alphanumeric character (e.g. 'example.com')",
    ),
    (
        "long-name",
        _set("metadata.name", "a" * 254),
        'metadata.name: Invalid value: "' + "a" * 76 + "...: must be no more than 253 characters",
    ),
    (
        "bad-container-name",
        _set("spec.containers[0].name", "app.1"),
        'spec.containers[0].name: Invalid value: "app.1": a lowercase RFC 1123 label must '
        "consist of lower case alphanumeric characters or '-', and must start and end with an "
        "alphanumeric character (e.g. 'my-name', or '123-abc')",
    ),
    (
        "duplicate-container",
        lambda p: p["spec"]["containers"].append({"name": "app", "command": ["true"]}),
        'spec.containers[1].name: Duplicate value: "app"',
    ),
    (
        "duplicate-port-name",
        lambda p: p["spec"]["containers"].append(
            {"name": "side", "command": ["true"], "ports": [{"containerPort": 9, "name": "http"}]}
        ),
        'spec.containers[1].ports[0].name: Duplicate value: "http"',
    ),
    (
        "port-zero",
        _set("spec.containers[0].ports[0].containerPort", 0),
        "spec.containers[0].ports[0].containerPort: Invalid value: 0: must be between 1 and "
        "65535, inclusive",
    ),
    (
        "port-too-big",
        _set("spec.containers[0].ports[0].containerPort", 65536),
        "spec.containers[0].ports[0].containerPort: Invalid value: 65536: must be between 1 "
        "and 65535, inclusive",
    ),
    (
        "port-string",
        _set("spec.containers[0].ports[0].containerPort", "8080"),
        'spec.containers[0].ports[0].containerPort: Invalid value: "8080": must be of type integer',
    ),
    (
        "port-bool",
        _set("spec.containers[0].ports[0].containerPort", True),
        "spec.containers[0].ports[0].containerPort: Invalid value: true: must be of type integer",
    ),
    (
        "port-float",
        _set("spec.containers[0].ports[0].containerPort", 80.0),
        "spec.containers[0].ports[0].containerPort: Invalid value: 80.0: must be of type integer",
    ),
    (
        "port-name-too-long",
        _set("spec.containers[0].ports[0].name", "a-very-long-port-name"),
        'spec.containers[0].ports[0].name: Invalid value: "a-very-long-port-name": must be no '
        "more than 15 characters",
    ),
    (
        "port-name-digits",
        _set("spec.containers[0].ports[0].name", "8080"),
        'spec.containers[0].ports[0].name: Invalid value: "8080": must contain at least one '
        "letter (a-z)",
    ),
    (
        "protocol",
        _set("spec.containers[0].ports[0].protocol", "SCTP"),
        'spec.containers[0].ports[0].protocol: Unsupported value: "SCTP": supported values: '
        '"TCP", "UDP"',
    ),
    (
        "env-name",
        _set("spec.containers[0].env[0].name", "1BAD"),
        'spec.containers[0].env[0].name: Invalid value: "1BAD": a valid environment variable '
        "name must consist of alphabetic characters, digits, '_', '-', or '.', and must not "
        "start with a digit",
    ),
    (
        "env-value-and-from",
        _set("spec.containers[0].env[0].valueFrom", {"fieldRef": {"fieldPath": "metadata.name"}}),
        'spec.containers[0].env[0].valueFrom: Invalid value: "": may not be specified when '
        "`value` is not empty",
    ),
    (
        "env-field-path",
        _set("spec.containers[0].env[1].valueFrom.fieldRef.fieldPath", "spec.hostname"),
        'spec.containers[0].env[1].valueFrom.fieldRef.fieldPath: Invalid value: "spec.hostname"'
        ': supported values: "metadata.name"',
    ),
    (
        "env-no-field-ref",
        _set("spec.containers[0].env[1].valueFrom", {}),
        "spec.containers[0].env[1].valueFrom.fieldRef: Required value",
    ),
    (
        "service-account",
        _set("spec.serviceAccountName", "Web SA"),
        'spec.serviceAccountName: Invalid value: "Web SA": a lowercase RFC 1123 subdomain',
    ),
    ("unknown-field", _set("spec.contianers", []), "spec.contianers: Unknown field"),
    ("unknown-top", _set("extra", 1), "extra: Unknown field"),
    ("unknown-meta", _set("metadata.finalizers", []), "metadata.finalizers: Unknown field"),
    (
        "label-key",
        _set("metadata.labels", {"bad key": "x"}),
        'metadata.labels: Invalid value: "bad key": name part must consist of alphanumeric',
    ),
    (
        "label-prefix",
        _set("metadata.labels", {"Bad_Prefix/x": "y"}),
        'metadata.labels: Invalid value: "Bad_Prefix/x": prefix part must be a lowercase RFC '
        "1123 subdomain",
    ),
    (
        "label-value",
        _set("metadata.labels", {"app": "a b"}),
        'metadata.labels: Invalid value: "a b": a valid label must be an empty string or '
        "consist of alphanumeric characters",
    ),
    (
        "label-value-type",
        _set("metadata.labels", {"replicas": 3}),
        "metadata.labels[replicas]: Invalid value: 3: must be of type string",
    ),
    (
        "labels-type",
        _set("metadata.labels", ["app"]),
        'metadata.labels: Invalid value: ["app"]: must be of type object',
    ),
    (
        "annotation-value-type",
        _set("metadata.annotations", {"a": True}),
        "metadata.annotations[a]: Invalid value: true: must be of type string",
    ),
    (
        "annotations-too-big",
        _set("metadata.annotations", {"a": "x" * (256 * 1024)}),
        "metadata.annotations: Too long: must have at most 262144 bytes",
    ),
    (
        "metadata-type",
        _set("metadata", "web"),
        'metadata: Invalid value: "web": must be of type object',
    ),
    (
        "phase",
        _set("status.phase", "Done"),
        'status.phase: Unsupported value: "Done": supported values: "Pending", "Running", '
        '"Succeeded", "Failed", "Unknown"',
    ),
    (
        "pod-ip",
        _set("status.podIP", "10.244.0.300"),
        'status.podIP: Invalid value: "10.244.0.300": must be a valid IP address',
    ),
    (
        "generation-negative",
        _set("metadata.generation", -1),
        "metadata.generation: Invalid value: -1: must be greater than or equal to 0",
    ),
    (
        "grace-negative",
        _set("spec.terminationGracePeriodSeconds", -1),
        "spec.terminationGracePeriodSeconds: Invalid value: -1: must be between 0 and 31536000, "
        "inclusive",
    ),
    (
        "prestop-no-handler",
        _set("spec.containers[0].lifecycle", {"preStop": {}}),
        "spec.containers[0].lifecycle.preStop: Required value: must specify exactly one handler"
        " type (exec or sleep)",
    ),
    (
        "prestop-two-handlers",
        _set(
            "spec.containers[0].lifecycle",
            {"preStop": {"sleep": {"seconds": 1}, "exec": {"command": ["true"]}}},
        ),
        "spec.containers[0].lifecycle.preStop: Required value: must specify exactly one handler"
        " type (exec or sleep)",
    ),
    (
        "prestop-sleep-negative",
        _set("spec.containers[0].lifecycle", {"preStop": {"sleep": {"seconds": -1}}}),
        "spec.containers[0].lifecycle.preStop.sleep.seconds: Invalid value: -1: must be between 0"
        " and 31536000, inclusive",
    ),
    (
        "prestop-exec-empty",
        _set("spec.containers[0].lifecycle", {"preStop": {"exec": {"command": []}}}),
        "spec.containers[0].lifecycle.preStop.exec.command: Required value",
    ),
    (
        "poststart-unsupported",
        _set("spec.containers[0].lifecycle", {"postStart": {"sleep": {"seconds": 1}}}),
        "spec.containers[0].lifecycle.postStart: Unknown field",
    ),
]


@pytest.mark.parametrize(
    ("edit", "message"), [c[1:] for c in POD_CASES], ids=[c[0] for c in POD_CASES]
)
def test_pod_rules(edit: Edit, message: str) -> None:
    pod = _pod()
    edit(pod)
    found = [str(e) for e in validation.validate(schemas.POD, pod)]
    assert len(found) == 1, found
    assert found[0].startswith(message), found[0]


SERVICE_CASES: list[tuple[str, Edit, str]] = [
    ("no-ports", _set("spec.ports", []), "spec.ports: Required value"),
    (
        "port-range",
        _set("spec.ports[0].port", 70000),
        "spec.ports[0].port: Invalid value: 70000: must be between 1 and 65535, inclusive",
    ),
    (
        "target-port-number",
        _set("spec.ports[0].targetPort", 0),
        "spec.ports[0].targetPort: Invalid value: 0: must be between 1 and 65535, inclusive",
    ),
    (
        "target-port-name",
        _set("spec.ports[0].targetPort", "HTTP"),
        'spec.ports[0].targetPort: Invalid value: "HTTP": must contain only alphanumeric',
    ),
    (
        "target-port-type",
        _set("spec.ports[0].targetPort", [80]),
        "spec.ports[0].targetPort: Invalid value: [80]: must be of type integer or string",
    ),
    (
        "second-port-unnamed",
        lambda s: s["spec"]["ports"].append({"port": 81}),
        "spec.ports[1].name: Required value",
    ),
    (
        "duplicate-port-name",
        lambda s: s["spec"]["ports"].append({"port": 81, "name": "http"}),
        'spec.ports[1].name: Duplicate value: "http"',
    ),
    (
        "duplicate-port",
        lambda s: s["spec"]["ports"].append({"port": 80, "name": "other"}),
        'spec.ports[1]: Duplicate value: {"port": 80, "protocol": "TCP"}',
    ),
    (
        "selector-type",
        _set("spec.selector", {"app": 1}),
        "spec.selector[app]: Invalid value: 1: must be of type string",
    ),
    (
        "cluster-ip",
        _set("spec.clusterIP", "10.96.0.999"),
        'spec.clusterIP: Invalid value: "10.96.0.999": must be a valid IP address',
    ),
    (
        "type",
        _set("spec.type", "NodePort"),
        'spec.type: Unsupported value: "NodePort": supported values: "ClusterIP"',
    ),
    (
        "bad-name",
        _set("metadata.name", "web.shop"),
        'metadata.name: Invalid value: "web.shop": a lowercase RFC 1123 label',
    ),
    ("unknown", _set("spec.port", 80), "spec.port: Unknown field"),
]


@pytest.mark.parametrize(
    ("edit", "message"), [c[1:] for c in SERVICE_CASES], ids=[c[0] for c in SERVICE_CASES]
)
def test_service_rules(edit: Edit, message: str) -> None:
    service = _service()
    edit(service)
    found = [str(e) for e in validation.validate(schemas.SERVICE, service)]
    assert len(found) == 1, found
    assert found[0].startswith(message), found[0]


def test_namespace_rules() -> None:
    found = validation.validate(
        schemas.NAMESPACE,
        {"metadata": {"name": "Shop", "labels": {"istio.io/dataplane-mode": "a b"}}},
    )
    assert [e.path for e in found] == ["metadata.name", "metadata.labels"]


def test_every_error_is_reported_and_joined_like_kubernetes() -> None:
    pod = _pod()
    del pod["spec"]["containers"][0]["command"]
    pod["spec"]["nodeName"] = "N1"
    found = validation.validate(schemas.POD, pod)
    error = validation.build_invalid_error("Pod", "web", found)
    assert isinstance(error, errors.InvalidError)
    assert (error.code, error.reason) == (422, "Invalid")
    assert str(error).startswith(
        'Pod "web" is invalid: [spec.containers[0].command: Required value, '
        'spec.nodeName: Invalid value: "N1": '
    )
    causes = error.status["details"]["causes"]
    assert [c["field"] for c in causes] == ["spec.containers[0].command", "spec.nodeName"]
    assert causes[0]["reason"] == "FieldValueRequired"
    single = validation.build_invalid_error("Pod", "web", found[:1])
    assert str(single) == 'Pod "web" is invalid: spec.containers[0].command: Required value'


def test_semantic_checks_wait_for_well_typed_input() -> None:
    # The duplicate-name check must not run (or crash) on a container that is not an object.
    pod = _pod()
    pod["spec"]["containers"].append("app")
    found = [str(e) for e in validation.validate(schemas.POD, pod)]
    assert found == ['spec.containers[1]: Invalid value: "app": must be of type object']


def test_generic_kinds_check_metadata_only() -> None:
    obj = {
        "apiVersion": "example.com/v1",
        "kind": "Thing",
        "metadata": {"name": "a"},
        "spec": {"x": [1]},
    }
    assert validation.validate(schemas.GENERIC, obj) == []
    obj["metadata"] = {"name": "A"}
    assert [e.path for e in validation.validate(schemas.GENERIC, obj)] == ["metadata.name"]


def test_validation_does_not_modify_input() -> None:
    pod = _pod()
    before = copy.deepcopy(pod)
    validation.validate(schemas.POD, pod)
    assert pod == before
