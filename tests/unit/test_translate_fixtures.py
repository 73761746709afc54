"""Builders of Kubernetes-shaped Pod and Service dicts for the translation tests (no tests here)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

KubeDict = dict[str, Any]


def pod(
    name: str = "web-1",
    namespace: str = "shop",
    *,
    ip: str | None = "10.0.0.5",
    ips: Sequence[str] | None = None,
    node: str = "node-1",
    service_account: str | None = "web",
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
    ready: bool = True,
    phase: str = "Running",
    deleting: bool = False,
    host_network: bool = False,
    owner: tuple[str, str] | None = None,
    container_ports: Sequence[Mapping[str, Any]] = (),
    resource_version: str = "1",
) -> KubeDict:
    meta: KubeDict = {
        "name": name,
        "namespace": namespace,
        "resourceVersion": resource_version,
        "labels": dict(labels if labels is not None else {"app": "web"}),
        "annotations": dict(annotations or {}),
    }
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    if owner is not None:
        meta["ownerReferences"] = [
            {"apiVersion": "apps/v1", "kind": owner[0], "name": owner[1], "controller": True}
        ]
    spec: KubeDict = {
        "nodeName": node,
        "containers": [{"name": "app", "image": "demo", "ports": list(container_ports)}],
    }
    if service_account is not None:
        spec["serviceAccountName"] = service_account
    if host_network:
        spec["hostNetwork"] = True
    status: KubeDict = {
        "phase": phase,
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
    }
    if ip is not None:
        status["podIP"] = ip
    if ips is not None:
        status["podIPs"] = [{"ip": a} for a in ips]
    return {"kind": "Pod", "metadata": meta, "spec": spec, "status": status}


def service(
    name: str = "web",
    namespace: str = "shop",
    *,
    cluster_ip: str | None = "10.96.0.10",
    cluster_ips: Sequence[str] | None = None,
    selector: Mapping[str, str] | None = None,
    ports: Sequence[Mapping[str, Any]] = ({"port": 80, "targetPort": 8080},),
    labels: Mapping[str, str] | None = None,
) -> KubeDict:
    spec: KubeDict = {
        "selector": dict(selector if selector is not None else {"app": "web"}),
        "ports": [dict(p) for p in ports],
    }
    if cluster_ip is not None:
        spec["clusterIP"] = cluster_ip
    if cluster_ips is not None:
        spec["clusterIPs"] = list(cluster_ips)
    meta: KubeDict = {"name": name, "namespace": namespace}
    if labels is not None:
        meta["labels"] = dict(labels)
    return {"kind": "Service", "metadata": meta, "spec": spec}


def namespace(name: str, *, labels: Mapping[str, str] | None = None) -> KubeDict:
    meta: KubeDict = {"name": name}
    if labels is not None:
        meta["labels"] = dict(labels)
    return {"kind": "Namespace", "metadata": meta}
