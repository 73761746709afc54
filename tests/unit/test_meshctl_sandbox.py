from __future__ import annotations

from typing import Any

import pytest

from meshctl.playground import kubelet, podstatus, podworker, sandbox

POD: dict[str, Any] = {
    "metadata": {"name": "web", "namespace": "shop", "uid": "u-1", "labels": {"app": "web"}},
    "spec": {"nodeName": "node1", "serviceAccountName": "web-sa"},
    "status": {"podIP": "10.244.0.5"},
}


def test_hosts_file_lists_services_with_short_names_for_own_namespace() -> None:
    services = sandbox.build_service_names(
        [
            {"metadata": {"name": "web", "namespace": "shop"}, "spec": {"clusterIP": "10.96.0.10"}},
            {"metadata": {"name": "db", "namespace": "data"}, "spec": {"clusterIP": "10.96.0.11"}},
            {"metadata": {"name": "hl", "namespace": "shop"}, "spec": {"clusterIP": "None"}},
        ]
    )
    text = sandbox.build_hosts_file("shop", "client", "10.244.0.7", services)
    lines = text.splitlines()
    assert "127.0.0.1\tlocalhost" in lines
    assert "10.244.0.7\tclient" in lines
    assert "10.96.0.11\tdb.data.svc.cluster.local db.data.svc db.data" in lines
    assert "10.96.0.10\tweb.shop.svc.cluster.local web.shop.svc web.shop web" in lines
    assert not any(line.startswith("None") or " hl." in line for line in lines)


def test_service_entry_hosts_resolve_everywhere_at_their_given_or_allocated_address() -> None:
    def entry(name: str, hosts: list[str], **more: Any) -> dict[str, Any]:
        spec: dict[str, Any] = {"hosts": hosts, **more.pop("spec", {})}
        return {"metadata": {"name": name, "namespace": "egress"}, "spec": spec, **more}

    names = sandbox.build_service_names(
        [],
        entries=[
            entry(
                "api",
                ["api.example.com", "*.example.org", "late.example.com"],
                status={"addresses": [{"host": "api.example.com", "value": "240.240.0.1"}]},
            ),
            entry("fixed", ["db.example.com"], spec={"addresses": ["10.9.0.0/24", "192.0.2.5"]}),
        ],
    )
    lines = sandbox.build_hosts_file("shop", "client", "10.244.0.7", names).splitlines()
    assert "240.240.0.1\tapi.example.com" in lines
    assert "192.0.2.5\tdb.example.com" in lines  # the first single address, not the range
    # No address yet, or a wildcard: nothing to answer.
    assert not any("late.example.com" in line or "example.org" in line for line in lines)


def _serving(name: str, ip: str, *, ready: bool = True, ns: str = "shop") -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": ns, "labels": {"app": "db"}},
        "status": {
            "podIP": ip,
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def test_headless_service_resolves_to_its_serving_pods() -> None:
    headless = {
        "metadata": {"name": "db", "namespace": "shop"},
        "spec": {"clusterIP": "None", "selector": {"app": "db"}},
    }
    pods = [
        _serving("db-1", "10.244.1.9"),
        _serving("db-0", "10.244.0.12"),
        _serving("db-2", "10.244.2.3", ready=False),  # not serving: left out
        _serving("db-x", "10.244.2.4", ns="other"),  # another namespace: left out
    ]
    services = sandbox.build_service_names([headless], pods)
    assert [s.cluster_ip for s in services] == ["10.244.0.12", "10.244.1.9"]
    lines = sandbox.build_hosts_file("shop", "client", "10.244.0.7", services).splitlines()
    assert "10.244.0.12\tdb.shop.svc.cluster.local db.shop.svc db.shop db" in lines
    assert "10.244.1.9\tdb.shop.svc.cluster.local db.shop.svc db.shop db" in lines


def test_resolv_conf_search_path() -> None:
    text = sandbox.build_resolv_conf("shop")
    assert "search shop.svc.cluster.local svc.cluster.local cluster.local\n" in text
    assert "options ndots:5\n" in text
    assert "nameserver" not in text.replace("no cluster DNS server", "")


@pytest.mark.parametrize(
    ("field_path", "value"),
    [
        pytest.param("metadata.name", "web", id="name"),
        pytest.param("metadata.namespace", "shop", id="namespace"),
        pytest.param("metadata.uid", "u-1", id="uid"),
        pytest.param("status.podIP", "10.244.0.5", id="pod-ip"),
        pytest.param("status.hostIP", "172.30.0.10", id="host-ip"),
        pytest.param("spec.nodeName", "node1", id="node"),
        pytest.param("spec.serviceAccountName", "web-sa", id="service-account"),
        pytest.param("metadata.labels['app']", "web", id="label"),
    ],
)
def test_field_refs(field_path: str, value: str) -> None:
    container = {
        "name": "c",
        "env": [{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": field_path}}}],
    }
    env = sandbox.build_container_env(POD, container, host_ip="172.30.0.10", bin_dir="/venv/bin")
    assert env["X"] == value
    assert env["PATH"].startswith("/venv/bin:")


def test_env_values_expand_earlier_variables() -> None:
    container = {
        "name": "c",
        "env": [
            {"name": "A", "value": "one"},
            {"name": "B", "value": "$(A)-two-$(MISSING)-$$(A)"},
        ],
        "command": ["echo", "$(B)"],
    }
    env = sandbox.build_container_env(POD, container, host_ip="", bin_dir="/b")
    assert env["B"] == "one-two-$(MISSING)-$(A)"
    assert sandbox.build_container_argv(container, env) == ["echo", "one-two-$(MISSING)-$(A)"]


@pytest.mark.parametrize(
    ("var", "message"),
    [
        pytest.param(
            {"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "status.phase"}}},
            r"spec.containers\[c\].env\[0\].valueFrom: "
            r"unsupported fieldRef.fieldPath 'status.phase'",
            id="unsupported-field",
        ),
        pytest.param(
            {"name": "X", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
            "only fieldRef is supported",
            id="secret",
        ),
    ],
)
def test_env_errors_name_the_field(var: dict[str, Any], message: str) -> None:
    with pytest.raises(sandbox.ContainerConfigError, match=message):
        sandbox.build_container_env(POD, {"name": "c", "env": [var]}, host_ip="", bin_dir="/b")


def test_netns_name_is_prefixed_and_short() -> None:
    assert sandbox.netns_name("mt1a2b3c", "0f8e7d6c-aaaa-bbbb") == "mt1a2b3c-p-0f8e7d6c"


def view(name: str, **kw: Any) -> podstatus.ContainerView:
    base: dict[str, Any] = {"running": False, "ready": False, "started_at": "", "restarts": 0}
    base.update(kw)
    return podstatus.ContainerView(name=name, **base)


@pytest.mark.parametrize(
    ("policy", "views", "sandbox_ok", "phase"),
    [
        pytest.param("Always", [view("a")], False, "Pending", id="no-sandbox"),
        pytest.param("Always", [view("a", running=True)], True, "Running", id="running"),
        pytest.param("Never", [view("a", exit_code=0)], True, "Succeeded", id="completed"),
        pytest.param("OnFailure", [view("a", exit_code=3)], True, "Failed", id="failed"),
        pytest.param(
            "Always",
            [view("a", exit_code=3, restarts=2, waiting_reason="CrashLoopBackOff")],
            True,
            "Running",
            id="crash-loop",
        ),
    ],
)
def test_phase(
    policy: str, views: list[podstatus.ContainerView], sandbox_ok: bool, phase: str
) -> None:
    assert podstatus.build_phase(policy, views, sandbox_ok) == phase


def test_status_reports_sandbox_error_and_readiness() -> None:
    failed = podstatus.build_pod_status(
        phase="Pending",
        pod_ip="",
        host_ip="172.30.0.10",
        start_time="t0",
        sandbox_error="failed to set up sandbox network: node agent refused ADD",
        views=[view("app", waiting_reason="ContainerCreating")],
        transitions={},
    )
    assert failed["reason"] == "FailedCreatePodSandBox"
    assert "node agent refused ADD" in failed["message"]
    sandbox_cond = next(c for c in failed["conditions"] if c["type"] == "PodReadyToStartContainers")
    assert sandbox_cond["status"] == "False"
    assert sandbox_cond["reason"] == "FailedCreatePodSandBox"
    assert failed["podIP"] is None

    ready = podstatus.build_pod_status(
        phase="Running",
        pod_ip="10.244.0.5",
        host_ip="172.30.0.10",
        start_time="t0",
        sandbox_error="",
        views=[view("app", running=True, ready=True, started_at="t1", pid=42, restarts=1)],
        transitions={"Ready": "t2"},
    )
    ready_cond = next(c for c in ready["conditions"] if c["type"] == "Ready")
    assert ready_cond == {"type": "Ready", "status": "True", "lastTransitionTime": "t2"}
    assert ready["podIPs"] == [{"ip": "10.244.0.5"}]
    assert ready["reason"] is None
    assert ready["message"] is None
    (cs,) = ready["containerStatuses"]
    assert cs["state"] == {"running": {"startedAt": "t1"}}
    assert cs["restartCount"] == 1
    assert cs["ready"] is True


@pytest.mark.parametrize(
    ("failures", "delay"),
    [
        pytest.param(0, 1.0, id="first"),
        pytest.param(3, 8.0, id="fourth"),
        pytest.param(40, 30.0, id="capped"),
    ],
)
def test_backoff(failures: int, delay: float) -> None:
    assert podworker.next_backoff(failures) == delay


def test_kubelet_config_from_env() -> None:
    env = {
        "NODE_NAME": "node1",
        "KUBE_API": "unix:///s/api.sock",
        "NODE_STATE_DIR": "/s/nodes/node1",
        "POD_CIDR": "10.244.0.0/24",
        "CNI_BIN_DIRS": "/usr/lib/cni:/venv/bin",
        "NETNS_PREFIX": "mt1",
    }
    config = kubelet.Config.from_env(env)
    assert config.cni_bin_dirs == ("/usr/lib/cni", "/venv/bin")
    assert config.log_level == "info"
    with pytest.raises(kubelet.ConfigError, match="POD_CIDR is required"):
        kubelet.Config.from_env({k: v for k, v in env.items() if k != "POD_CIDR"})
