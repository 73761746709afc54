"""Kubernetes Pod -> model Workload, as istiod's ambient index builds it. Pure.

A pod becomes a workload once it has an IP and until it has finished; host-network pods are left
out, because their IP is the node's and belongs to no single identity.

The annotation `ambient.istio.io/application-tunnel: PROXY/15088` is this playground's way for a
pod to ask for an application tunnel (istiod sets one only for its own waypoints): ztunnel then
delivers HBONE connections to port 15088 behind a PROXY protocol v2 header naming the client and
its SPIFFE ID. A bare ``PROXY`` keeps the port the client asked for.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping

from controller.translate import services as svc_translate
from controller.translate import waypoints
from meshcore import digits
from meshcore.identity import spiffe
from meshcore.model import ids, workload

REDIRECTION_ANNOTATION = "ambient.istio.io/redirection"
REDIRECTION_ENABLED = "enabled"
APPLICATION_TUNNEL_ANNOTATION = "ambient.istio.io/application-tunnel"
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
_TUNNEL_PROTOCOLS = {"PROXY": workload.AppTunnelProtocol.PROXY}
# ztunnel's own in-pod listeners: a tunnel there would feed ztunnel its own output.
_ZTUNNEL_PORTS = frozenset({15001, 15006, 15008})


def build_workload(
    pod: svc_translate.KubeObject,
    *,
    services: Iterable[svc_translate.KubeObject],
    trust_domain: str,
    cluster_id: str,
    domain: str,
    authorization_policies: tuple[ids.PolicyKey, ...] = (),
    namespace_labels: Mapping[str, str] | None = None,
    gateways: waypoints.GatewayTraffic | None = None,
) -> workload.Workload | None:
    """The workload of `pod`, bound to those of `services` (same namespace) that select it.

    Its waypoint comes from its own label or `namespace_labels` (its Namespace's), if
    `gateways` (the known waypoint Gateways) does not say that waypoint is not for workloads.

    `authorization_policies` are the selector and PeerAuthentication policy keys istiod lists
    for the pod (`controller.translate.policies.PolicyIndex.find_keys`)."""
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
        authorization_policies=authorization_policies,
        cluster_id=cluster_id,
        application_tunnel=_application_tunnel(annotations, namespace, name),
        waypoint=waypoints.find_waypoint(
            labels,
            namespace,
            namespace_labels or {},
            domain=domain,
            traffic=waypoints.WORKLOAD_TRAFFIC,
            gateways=gateways or {},
        ),
        labels=tuple(sorted(labels.items())),
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


def _application_tunnel(
    annotations: Mapping[str, str], namespace: str, name: str
) -> workload.ApplicationTunnel | None:
    """The tunnel the pod asked for with ``PROTOCOL[/PORT]``; None when it did not ask."""
    value = annotations.get(APPLICATION_TUNNEL_ANNOTATION)
    if value is None:
        return None

    def fail(reason: str) -> svc_translate.TranslateError:
        field = f"metadata.annotations[{APPLICATION_TUNNEL_ANNOTATION!r}]"
        return svc_translate.TranslateError("Pod", namespace, name, field, reason)

    if not isinstance(value, str):
        raise fail(f"not a string: {value!r}")
    protocol_text, sep, port_text = value.partition("/")
    protocol = _TUNNEL_PROTOCOLS.get(protocol_text)
    if protocol is None:
        raise fail(f"unknown protocol {protocol_text!r} in {value!r}: want PROXY or PROXY/<port>")
    if not sep:
        return workload.ApplicationTunnel(protocol)
    # At most 5 ASCII digits: neither "¹" nor a 40-digit number.
    port = int(port_text) if digits.is_digits(port_text) and len(port_text) <= 5 else 0
    if not 1 <= port <= 65535:
        raise fail(f"port {port_text!r} in {value!r} is not a number in 1..65535")
    if port in _ZTUNNEL_PORTS:
        raise fail(f"port {port} in {value!r} is one of ztunnel's own in-pod ports")
    return workload.ApplicationTunnel(protocol, port)


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
