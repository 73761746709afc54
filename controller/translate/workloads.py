"""Kubernetes Pod -> model Workload, as istiod's ambient index builds it. Pure.

A pod becomes a workload once it has an IP and until it has finished; host-network pods are left
out, because their IP is the node's and belongs to no single identity.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping

from controller.translate import services as svc_translate
from meshcore.identity import spiffe
from meshcore.model import ids, workload

REDIRECTION_ANNOTATION = "ambient.istio.io/redirection"
REDIRECTION_ENABLED = "enabled"
TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})

# First label present wins (istiod's canonical service labels).
_CANONICAL_NAME_LABELS = ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app")
_CANONICAL_REVISION_LABELS = (
    "service.istio.io/canonical-revision",
    "app.kubernetes.io/version",
    "version",
)
_DEFAULT_REVISION = "latest"
# A Deployment's ReplicaSet is "<deployment>-<pod-template-hash>"; the hash is written in
# Kubernetes' SafeEncodeString alphabet (no vowels, no 0/1/3), which is what tells
# "web-7d4b9c5f6" from a hand-made ReplicaSet "my-frontend" when the pod lacks the hash label.
# A CronJob's Job is "<cronjob>-<scheduled time in minutes>" (istiod's cronJobNameRegexp).
_REPLICASET_NAME = re.compile(r"^(.+)-[bcdfghjklmnpqrstvwxz2456789]{5,10}$")
_CRONJOB_JOB_NAME = re.compile(r"^(.+)-\d{8,10}$")


def build_workload(
    pod: svc_translate.KubeObject,
    *,
    services: Iterable[svc_translate.KubeObject],
    trust_domain: str,
    cluster_id: str,
    domain: str,
) -> workload.Workload | None:
    """The workload of `pod`, bound to those of `services` (same namespace) that select it."""
    namespace, name = svc_translate.object_key(pod)
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    if not status.get("podIP") or spec.get("hostNetwork") or is_terminated(pod):
        return None
    labels: Mapping[str, str] = meta.get("labels") or {}
    annotations: Mapping[str, str] = meta.get("annotations") or {}
    workload_type, workload_name = _owner(pod, name)
    return workload.Workload(
        uid=ids.pod_uid(namespace, name, cluster_id),
        name=name,
        namespace=namespace,
        addresses=_addresses(pod, namespace, name),
        node=spec.get("nodeName") or "",
        service_account=spec.get("serviceAccountName") or spiffe.DEFAULT_SERVICE_ACCOUNT,
        trust_domain=trust_domain,
        tunnel_protocol=(
            workload.TunnelProtocol.HBONE
            if annotations.get(REDIRECTION_ANNOTATION) == REDIRECTION_ENABLED
            else workload.TunnelProtocol.NONE
        ),
        canonical_name=_first_label(labels, _CANONICAL_NAME_LABELS) or workload_name,
        canonical_revision=_first_label(labels, _CANONICAL_REVISION_LABELS) or _DEFAULT_REVISION,
        workload_type=workload_type,
        workload_name=workload_name,
        services=tuple(
            sorted(
                (
                    workload.ServiceBinding(
                        svc_translate.service_key(svc, domain=domain),
                        svc_translate.binding_ports(svc, pod),
                    )
                    for svc in services
                    if svc_translate.object_key(svc)[0] == namespace
                    and svc_translate.selects(svc, labels)
                ),
                key=lambda b: b.service,
            )
        ),
        status=(
            workload.WorkloadStatus.HEALTHY
            if _is_ready(pod) and not meta.get("deletionTimestamp")
            else workload.WorkloadStatus.UNHEALTHY
        ),
        cluster_id=cluster_id,
    )


def is_terminated(pod: svc_translate.KubeObject) -> bool:
    return (pod.get("status") or {}).get("phase") in TERMINAL_PHASES


def _addresses(
    pod: svc_translate.KubeObject, namespace: str, name: str
) -> tuple[ids.IpAddress, ...]:
    status = pod.get("status") or {}
    # podIPs (dual stack) starts with podIP; fall back to podIP alone for older writers.
    raw = [entry.get("ip") for entry in status.get("podIPs") or ()] or [status.get("podIP")]
    addresses: list[ids.IpAddress] = []
    for i, value in enumerate(raw):
        try:
            if not isinstance(value, str):
                raise ValueError(value)  # ip_address() would also take an int
            address = ipaddress.ip_address(value)
        except ValueError:
            raise svc_translate.TranslateError(
                "Pod", namespace, name, f"status.podIPs[{i}]", f"not an IP address: {value!r}"
            ) from None
        if address not in addresses:
            addresses.append(address)
    return tuple(addresses)


def _owner(pod: svc_translate.KubeObject, pod_name: str) -> tuple[workload.WorkloadType, str]:
    meta = pod.get("metadata") or {}
    refs = meta.get("ownerReferences") or ()
    owner = next((r for r in refs if r.get("controller")), refs[0] if refs else None)
    if owner is not None:
        kind, name = owner.get("kind"), owner.get("name") or ""
        if kind == "ReplicaSet":
            template_hash = (meta.get("labels") or {}).get("pod-template-hash")
            if template_hash and name.endswith(f"-{template_hash}"):
                return workload.WorkloadType.DEPLOYMENT, name.removesuffix(f"-{template_hash}")
            if match := _REPLICASET_NAME.match(name):
                return workload.WorkloadType.DEPLOYMENT, match.group(1)
        elif kind == "Job":
            if match := _CRONJOB_JOB_NAME.match(name):
                return workload.WorkloadType.CRONJOB, match.group(1)
            return workload.WorkloadType.JOB, name
    return workload.WorkloadType.POD, pod_name


def _is_ready(pod: svc_translate.KubeObject) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or ()
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _first_label(labels: Mapping[str, str], keys: Iterable[str]) -> str | None:
    for key in keys:
        if labels.get(key):
            return labels[key]
    return None
