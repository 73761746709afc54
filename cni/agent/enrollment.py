"""Which pods on this node are captured, and how (spec section 7, 3.3). Pure functions.

The rule istio-cni applies (`PodRedirectionEnabled`), in the order this module checks it:

- a pod that is going away (deletionTimestamp set, or phase Succeeded/Failed) is not captured:
  its netns is about to disappear and nothing new should start in it;
- hostNetwork pods never are (their "pod netns" is the node's);
- ztunnel's own pods never are;
- pods with an Istio sidecar (`sidecar.istio.io/status`) are not: the sidecar already captures;
- then the label `istio.io/dataplane-mode`: `ambient` on the pod, OR `ambient` on the namespace
  AND the pod's label is not `none`. The pod label wins in both directions.

Every decision carries a human-readable reason: it goes into the agent's log line for the pod
and into the error a refused CNI ADD reports.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cni.redirect import iptables
from meshcore import ambient_labels, envconfig
from meshcore.kube import objects
from meshcore.wire import zds

DATAPLANE_MODE_LABEL = ambient_labels.DATAPLANE_MODE
DATAPLANE_MODE_AMBIENT = "ambient"
DATAPLANE_MODE_NONE = "none"
SIDECAR_STATUS_ANNOTATION = "sidecar.istio.io/status"
# Written by the agent only: "enabled" while the pod is captured (the controller publishes the
# pod with tunnel protocol HBONE when it sees it), absent otherwise.
REDIRECTION_ANNOTATION = "ambient.istio.io/redirection"
REDIRECTION_ENABLED = "enabled"
BYPASS_INBOUND_ANNOTATION = "ambient.istio.io/bypass-inbound-capture"
DNS_CAPTURE_ANNOTATION = "ambient.istio.io/dns-capture"
REROUTE_INTERFACES_ANNOTATION = "istio.io/reroute-virtual-interfaces"
# How istio-cni recognises ztunnel's own pods: this label, in the mesh's system namespace (a pod
# elsewhere that carries it is an app like any other, not a way out of capture).
ZTUNNEL_APP_LABEL = ("app", "ztunnel")

_TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})


@dataclass(frozen=True)
class EnrollmentDecision:
    """Whether a pod should be captured, and why (for logs and CNI errors)."""

    is_enrolled: bool
    reason: str


def _spec(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    spec = pod.get("spec")
    return spec if isinstance(spec, Mapping) else {}


def _phase(pod: Mapping[str, Any]) -> str:
    status = pod.get("status")
    phase = status.get("phase") if isinstance(status, Mapping) else None
    return phase if isinstance(phase, str) else ""


def build_decision(
    pod: Mapping[str, Any],
    namespace: Mapping[str, Any] | None,
    system_namespace: str = envconfig.DEFAULT_SYSTEM_NAMESPACE,
) -> EnrollmentDecision:
    """Decide for `pod` in `namespace` (None: the namespace does not exist or is unknown)."""
    if objects.is_terminating(pod):
        return EnrollmentDecision(False, "pod is terminating")
    phase = _phase(pod)
    if phase in _TERMINAL_PHASES:
        return EnrollmentDecision(False, f"pod has finished (phase {phase})")
    if _spec(pod).get("hostNetwork") is True:
        return EnrollmentDecision(False, "pod uses the host network")
    labels = objects.labels(pod)
    app_key, app_value = ZTUNNEL_APP_LABEL
    if labels.get(app_key) == app_value and objects.namespace(pod) == system_namespace:
        return EnrollmentDecision(False, "pod is a ztunnel")
    if SIDECAR_STATUS_ANNOTATION in objects.annotations_of(pod):
        return EnrollmentDecision(False, f"pod has an Istio sidecar ({SIDECAR_STATUS_ANNOTATION})")
    pod_mode = labels.get(DATAPLANE_MODE_LABEL)
    if pod_mode == DATAPLANE_MODE_AMBIENT:
        return EnrollmentDecision(True, f"pod label {DATAPLANE_MODE_LABEL}={pod_mode}")
    if pod_mode == DATAPLANE_MODE_NONE:
        return EnrollmentDecision(False, f"pod label {DATAPLANE_MODE_LABEL}={pod_mode} opts out")
    ns_name = objects.namespace(pod) or "default"
    if namespace is None:
        return EnrollmentDecision(False, f"namespace {ns_name} not found")
    ns_mode = objects.labels(namespace).get(DATAPLANE_MODE_LABEL)
    if ns_mode == DATAPLANE_MODE_AMBIENT:
        return EnrollmentDecision(True, f"namespace {ns_name} has {DATAPLANE_MODE_LABEL}={ns_mode}")
    if ns_mode is not None:
        return EnrollmentDecision(
            False,
            f"namespace {ns_name} has {DATAPLANE_MODE_LABEL}={ns_mode}, not "
            f"{DATAPLANE_MODE_AMBIENT}",
        )
    return EnrollmentDecision(
        False,
        f"neither the pod nor namespace {ns_name} has {DATAPLANE_MODE_LABEL}="
        f"{DATAPLANE_MODE_AMBIENT}",
    )


def should_enroll(
    pod: Mapping[str, Any],
    namespace: Mapping[str, Any] | None,
    system_namespace: str = envconfig.DEFAULT_SYSTEM_NAMESPACE,
) -> bool:
    return build_decision(pod, namespace, system_namespace).is_enrolled


def build_workload_info(pod: Mapping[str, Any]) -> zds.WorkloadInfo:
    """What ztunnel learns about the pod over ZDS (its identity comes from namespace + SA)."""
    spec = _spec(pod)
    account = spec.get("serviceAccountName") or spec.get("serviceAccount")
    return zds.WorkloadInfo(
        name=objects.name(pod),
        namespace=objects.namespace(pod) or "default",
        service_account=account if isinstance(account, str) and account else "default",
    )


def build_redirect_options(
    pod: Mapping[str, Any], *, dns_capture: bool
) -> iptables.RedirectOptions:
    """The per-pod rule variant (spec 3.3) from the pod's annotations.

    DNS capture: the node-wide setting (`dns_capture`) is an upper bound, not a default the pod
    may raise. Redirecting port 53 to 15053 with no DNS proxy listening there would break the
    pod's name resolution, so while ztunnel has no DNS proxy the agent runs with it off and a pod
    annotation can only turn it off, never on.

    Raises `iptables.InvalidOptionsError` naming the annotation when a value is unusable.
    """
    notes = objects.annotations_of(pod)
    pod_dns = notes.get(DNS_CAPTURE_ANNOTATION, "").strip().lower()
    interfaces = tuple(
        part.strip() for part in notes.get(REROUTE_INTERFACES_ANNOTATION, "").split(",")
    )
    try:
        return iptables.RedirectOptions(
            dns_capture=dns_capture and pod_dns != "false",
            inbound_capture=notes.get(BYPASS_INBOUND_ANNOTATION, "").strip().lower() != "true",
            reroute_interfaces=tuple(name for name in interfaces if name),
        )
    except iptables.InvalidOptionsError as exc:
        raise iptables.InvalidOptionsError(
            f"annotation {REROUTE_INTERFACES_ANNOTATION}: {exc}"
        ) from exc
