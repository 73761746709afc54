"""Which pods the node agent captures (spec section 7), and with which rule variant (3.3)."""

from __future__ import annotations

from typing import Any

import pytest

from cni.agent import enrollment
from cni.redirect import iptables
from meshcore.wire import zds

AMBIENT = {"istio.io/dataplane-mode": "ambient"}
NONE = {"istio.io/dataplane-mode": "none"}


def namespace(labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": "shop", **_labels(labels)},
    }


def _labels(labels: dict[str, str] | None) -> dict[str, Any]:
    return {"labels": labels} if labels is not None else {}


def pod(
    labels: dict[str, str] | None = None,
    *,
    annotations: dict[str, str] | None = None,
    host_network: bool = False,
    terminating: bool = False,
    phase: str = "Running",
    service_account: str | None = None,
    namespace: str = "shop",
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": "web-1",
        "namespace": namespace,
        "uid": "u-1",
        **_labels(labels),
    }
    if annotations is not None:
        meta["annotations"] = annotations
    if terminating:
        meta["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    spec: dict[str, Any] = {"nodeName": "node-a", "containers": [{"name": "app"}]}
    if host_network:
        spec["hostNetwork"] = True
    if service_account is not None:
        spec["serviceAccountName"] = service_account
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec,
            "status": {"phase": phase}}  # fmt: skip


@pytest.mark.parametrize(
    ("the_pod", "the_namespace", "enrolled", "reason"),
    [
        pytest.param(
            pod(), namespace(AMBIENT), True, "namespace shop has istio.io/dataplane-mode=ambient",
            id="namespace-label-ambient",
        ),
        pytest.param(
            pod(AMBIENT), namespace(), True, "pod label istio.io/dataplane-mode=ambient",
            id="pod-label-ambient-in-unlabelled-namespace",
        ),
        pytest.param(
            pod(AMBIENT), None, True, "pod label istio.io/dataplane-mode=ambient",
            id="pod-label-ambient-namespace-unknown",
        ),
        pytest.param(
            pod(NONE), namespace(AMBIENT), False,
            "pod label istio.io/dataplane-mode=none opts out",
            id="pod-label-none-in-ambient-namespace",
        ),
        pytest.param(
            pod({"istio.io/dataplane-mode": "other"}), namespace(AMBIENT), True,
            "namespace shop has istio.io/dataplane-mode=ambient",
            id="pod-label-other-value-follows-ambient-namespace",
        ),
        pytest.param(
            pod(host_network=True), namespace(AMBIENT), False, "pod uses the host network",
            id="host-network-pod",
        ),
        pytest.param(
            pod(AMBIENT, host_network=True), namespace(AMBIENT), False,
            "pod uses the host network",
            id="host-network-pod-even-with-pod-label",
        ),
        pytest.param(
            pod(annotations={"sidecar.istio.io/status": "{}"}), namespace(AMBIENT), False,
            "pod has an Istio sidecar (sidecar.istio.io/status)",
            id="sidecar-injected-pod",
        ),
        pytest.param(
            pod(terminating=True), namespace(AMBIENT), False, "pod is terminating",
            id="terminating-pod",
        ),
        pytest.param(
            pod(phase="Succeeded"), namespace(AMBIENT), False,
            "pod has finished (phase Succeeded)",
            id="finished-pod",
        ),
        pytest.param(
            pod({"app": "ztunnel"}, namespace="istio-system"), namespace(AMBIENT), False,
            "pod is a ztunnel",
            id="ztunnel-pod",
        ),
        pytest.param(
            pod({"app": "ztunnel"}), namespace(AMBIENT), True,
            "namespace shop has istio.io/dataplane-mode=ambient",
            id="app-ztunnel-label-outside-the-system-namespace",
        ),
        pytest.param(
            pod(), namespace({"istio.io/dataplane-mode": "sidecar"}), False,
            "namespace shop has istio.io/dataplane-mode=sidecar, not ambient",
            id="namespace-label-with-another-value",
        ),
        pytest.param(
            pod(), namespace({"team": "a"}), False,
            "neither the pod nor namespace shop has istio.io/dataplane-mode=ambient",
            id="no-label-anywhere",
        ),
        pytest.param(
            pod(), None, False, "namespace shop not found",
            id="namespace-missing",
        ),
    ],
)  # fmt: skip
def test_decision(
    the_pod: dict[str, Any], the_namespace: dict[str, Any] | None, enrolled: bool, reason: str
) -> None:
    decision = enrollment.build_decision(the_pod, the_namespace)
    assert decision == enrollment.EnrollmentDecision(enrolled, reason)
    assert enrollment.should_enroll(the_pod, the_namespace) is enrolled


def test_decision_tolerates_malformed_objects() -> None:
    broken: dict[str, Any] = {"metadata": "nope", "spec": ["x"], "status": 3}
    assert enrollment.build_decision(broken, {"metadata": {"labels": AMBIENT}}).is_enrolled
    assert not enrollment.build_decision(broken, {"metadata": None}).is_enrolled


@pytest.mark.parametrize(
    ("service_account", "expected"),
    [
        pytest.param("web", "web", id="named"),
        pytest.param(None, "default", id="unset-is-default"),
        pytest.param("", "default", id="empty-is-default"),
    ],
)
def test_workload_info(service_account: str | None, expected: str) -> None:
    info = enrollment.build_workload_info(pod(service_account=service_account))
    assert info == zds.WorkloadInfo("web-1", "shop", expected)


@pytest.mark.parametrize(
    ("annotations", "node_dns", "expected"),
    [
        pytest.param({}, False, iptables.RedirectOptions(), id="defaults"),
        pytest.param(
            {"ambient.istio.io/dns-capture": "true"}, False, iptables.RedirectOptions(),
            id="pod-cannot-turn-dns-capture-on-without-node-setting",
        ),
        pytest.param(
            {}, True, iptables.RedirectOptions(dns_capture=True),
            id="node-dns-capture",
        ),
        pytest.param(
            {"ambient.istio.io/dns-capture": "false"}, True, iptables.RedirectOptions(),
            id="pod-turns-dns-capture-off",
        ),
        pytest.param(
            {"ambient.istio.io/bypass-inbound-capture": "true"}, False,
            iptables.RedirectOptions(inbound_capture=False),
            id="bypass-inbound",
        ),
        pytest.param(
            {"istio.io/reroute-virtual-interfaces": " virt0, virt1 ,"}, False,
            iptables.RedirectOptions(reroute_interfaces=("virt0", "virt1")),
            id="reroute-interfaces",
        ),
    ],
)  # fmt: skip
def test_redirect_options(
    annotations: dict[str, str], node_dns: bool, expected: iptables.RedirectOptions
) -> None:
    the_pod = pod(annotations=annotations)
    assert enrollment.build_redirect_options(the_pod, dns_capture=node_dns) == expected


def test_redirect_options_name_the_bad_annotation() -> None:
    the_pod = pod(annotations={"istio.io/reroute-virtual-interfaces": "eth0;reboot"})
    with pytest.raises(iptables.InvalidOptionsError) as caught:
        enrollment.build_redirect_options(the_pod, dns_capture=False)
    assert "istio.io/reroute-virtual-interfaces" in str(caught.value)
    assert "'eth0;reboot'" in str(caught.value)
