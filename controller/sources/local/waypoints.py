"""The waypoint deployer of the local control plane: a Gateway of class ``istio-waypoint``
becomes a Deployment and a Service of the same name in its namespace, as istiod's deployment
controller makes them.

The Deployment runs one pod of ``python -m waypoint`` with the Gateway's service account (its
name), labelled ``gateway.networking.k8s.io/gateway-name: <gateway>`` and
``istio.io/dataplane-mode: none`` (a waypoint terminates and originates HBONE itself: ztunnel
must not capture it). Its credential is a projected service account token (audience
``istio-ca``), which the playground kubelet fills with a token its node vouches with; the CA
then gives that pod its own identity only. The Service selects the pod on 15008 (``mesh``,
HBONE), 15020 (metrics) and 15021 (readiness).

Both carry a controller ownerReference to the Gateway: deleting the Gateway deletes them, a
Gateway re-created under the same name takes them over, and an object of that name that no
Gateway owns is never touched (the Gateway's status says so). Changes to either object are put
back. The Gateway's status follows Gateway API: ``Accepted``, and ``Programmed`` once the
waypoint's pod is ready, with the Service's hostname and cluster IP as addresses.

Deciding is pure (`build_deployment`, `build_service`, `build_status`); `WaypointDeployer`
carries it out through the store on every event that touches a Gateway or what it owns.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

from controller.sources.local import reconciler
from controller.sources.local import store as store_mod
from meshcore import ambient_labels, log
from meshcore.kube import objects, resources

_LOG = logging.getLogger("controller.waypoints")

GATEWAY_NAME_LABEL = ambient_labels.GATEWAY_NAME
DATAPLANE_MODE_LABEL = ambient_labels.DATAPLANE_MODE
MANAGED_LABEL = "gateway.istio.io/managed"
MANAGED_VALUE = "istio.io-mesh-controller"
TOKEN_VOLUME = "istio-token"
TOKEN_DIR = "/var/run/secrets/tokens"
TOKEN_AUDIENCE = "istio-ca"
HBONE_PORT = 15008
METRICS_PORT = 15020
READINESS_PORT = 15021
_OWNED = (resources.DEPLOYMENTS, resources.SERVICES)


@dataclasses.dataclass(frozen=True, slots=True)
class WaypointSettings:
    """What every waypoint pod is started with."""

    command: tuple[str, ...]  # e.g. (sys.executable, "-m", "waypoint")
    xds_address: str  # the controller's xDS and CA address, as a pod reaches it
    trust_domain: str
    cluster_id: str
    domain: str  # cluster domain, for the Service hostname in the status
    log_level: str = "info"
    otlp_endpoint: str = ""  # where waypoints export spans; empty: nowhere


# -- pure parts -------------------------------------------------------------------------------


def is_waypoint(gateway: Mapping[str, Any] | None) -> bool:
    if gateway is None or objects.metadata(gateway).get("deletionTimestamp"):
        return False
    return (gateway.get("spec") or {}).get("gatewayClassName") == ambient_labels.WAYPOINT_CLASS


def build_owner_reference(gateway: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": resources.GATEWAYS.api_version,
        "kind": resources.GATEWAYS.kind,
        "name": objects.name(gateway),
        "uid": objects.uid(gateway),
        "controller": True,
        "blockOwnerDeletion": True,
    }


def find_gateway_owner(obj: Mapping[str, Any]) -> str | None:
    """The name of the Gateway that controls `obj`, if one does."""
    for ref in objects.metadata(obj).get("ownerReferences") or ():
        if (
            isinstance(ref, Mapping)
            and ref.get("controller")
            and ref.get("kind") == resources.GATEWAYS.kind
            and str(ref.get("apiVersion", "")).startswith(resources.GATEWAYS.group + "/")
        ):
            return str(ref.get("name", ""))
    return None


def _labels(gateway: Mapping[str, Any]) -> dict[str, str]:
    return {GATEWAY_NAME_LABEL: objects.name(gateway), MANAGED_LABEL: MANAGED_VALUE}


def _metadata(gateway: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "name": objects.name(gateway),
        "namespace": objects.namespace(gateway),
        "labels": _labels(gateway),
        "ownerReferences": [build_owner_reference(gateway)],
    }


def _env(gateway: Mapping[str, Any], settings: WaypointSettings) -> list[dict[str, Any]]:
    def field(path: str) -> dict[str, Any]:
        return {"fieldRef": {"fieldPath": path}}

    values = [
        ("WAYPOINT_NAME", objects.name(gateway)),
        ("XDS_ADDRESS", settings.xds_address),
        ("XDS_TOKEN_FILE", f"{TOKEN_DIR}/{TOKEN_VOLUME}"),
        ("TRUST_DOMAIN", settings.trust_domain),
        ("CLUSTER_ID", settings.cluster_id),
        ("LOG_LEVEL", settings.log_level),
    ]
    if settings.otlp_endpoint:
        values.append(("OTLP_ENDPOINT", settings.otlp_endpoint))
    env: list[dict[str, Any]] = [
        {"name": "POD_NAMESPACE", "valueFrom": field("metadata.namespace")},
        {"name": "SERVICE_ACCOUNT", "valueFrom": field("spec.serviceAccountName")},
        {"name": "NODE_NAME", "valueFrom": field("spec.nodeName")},
        {"name": "INSTANCE_IP", "valueFrom": field("status.podIP")},
    ]
    return env + [{"name": k, "value": v} for k, v in values]


def build_deployment(gateway: Mapping[str, Any], settings: WaypointSettings) -> dict[str, Any]:
    labels = _labels(gateway)
    pod_labels = {**labels, DATAPLANE_MODE_LABEL: "none"}
    container = {
        "name": "istio-proxy",
        "command": list(settings.command),
        "env": _env(gateway, settings),
        "ports": [
            {"name": "mesh", "containerPort": HBONE_PORT, "protocol": "TCP"},
            {"name": "http-envoy-prom", "containerPort": METRICS_PORT, "protocol": "TCP"},
            {"name": "status-port", "containerPort": READINESS_PORT, "protocol": "TCP"},
        ],
        "volumeMounts": [{"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR}],
    }
    token_source = {"serviceAccountToken": {"audience": TOKEN_AUDIENCE, "path": TOKEN_VOLUME}}
    return {
        "apiVersion": resources.DEPLOYMENTS.api_version,
        "kind": resources.DEPLOYMENTS.kind,
        "metadata": _metadata(gateway),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {GATEWAY_NAME_LABEL: objects.name(gateway)}},
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": {
                    "serviceAccountName": objects.name(gateway),
                    "containers": [container],
                    "volumes": [{"name": TOKEN_VOLUME, "projected": {"sources": [token_source]}}],
                },
            },
        },
    }


def build_service(gateway: Mapping[str, Any]) -> dict[str, Any]:
    ports = [
        ("mesh", HBONE_PORT),
        ("http-envoy-prom", METRICS_PORT),
        ("status-port", READINESS_PORT),
    ]
    return {
        "apiVersion": resources.SERVICES.api_version,
        "kind": resources.SERVICES.kind,
        "metadata": _metadata(gateway),
        "spec": {
            "selector": {GATEWAY_NAME_LABEL: objects.name(gateway)},
            "ports": [{"name": n, "port": p, "targetPort": p, "protocol": "TCP"} for n, p in ports],
        },
    }


def _condition(kind: str, ok: bool, reason: str, message: str, generation: int) -> dict[str, Any]:
    return {
        "type": kind,
        "status": "True" if ok else "False",
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
    }


def build_status(
    gateway: Mapping[str, Any],
    *,
    service: Mapping[str, Any] | None,
    ready_replicas: int,
    conflict: str | None,
    domain: str,
) -> dict[str, Any]:
    """The Gateway's status (without condition times: `merge_times` keeps or sets them)."""
    generation = int(objects.metadata(gateway).get("generation") or 0)
    name, namespace = objects.name(gateway), objects.namespace(gateway)
    addresses: list[dict[str, str]] = []
    if conflict is not None:
        programmed = _condition("Programmed", False, "Invalid", conflict, generation)
    elif ready_replicas < 1:
        programmed = _condition(
            "Programmed", False, "Pending", "waiting for the waypoint's pod to be ready", generation
        )
    else:
        programmed = _condition(
            "Programmed", True, "Programmed", "the waypoint is ready", generation
        )
    if service is not None and conflict is None:
        addresses.append({"type": "Hostname", "value": f"{name}.{namespace}.svc.{domain}"})
        if cluster_ip := (service.get("spec") or {}).get("clusterIP"):
            addresses.append({"type": "IPAddress", "value": str(cluster_ip)})
    accepted = _condition("Accepted", True, "Accepted", "resource accepted", generation)
    return {"addresses": addresses, "conditions": [accepted, programmed]}


def merge_times(new: dict[str, Any], old: Mapping[str, Any] | None, now: str) -> dict[str, Any]:
    """`new` with each condition's lastTransitionTime: kept when its status did not change."""
    before = {c.get("type"): c for c in (old or {}).get("conditions") or () if isinstance(c, dict)}
    for condition in new["conditions"]:
        previous = before.get(condition["type"]) or {}
        same = previous.get("status") == condition["status"]
        condition["lastTransitionTime"] = previous.get("lastTransitionTime", now) if same else now
    return new


# -- the controller ---------------------------------------------------------------------------


class WaypointDeployer(reconciler.StoreReconciler):
    noun = "waypoint"

    def __init__(self, object_store: store_mod.ObjectStore, settings: WaypointSettings) -> None:
        super().__init__(object_store, watched=None)
        self._settings = settings

    def find_all_keys(self) -> Iterable[tuple[str, str]]:
        keys = [
            (objects.namespace(g), objects.name(g))
            for g in self._store.list(resources.GATEWAYS).items
        ]
        for rtype in _OWNED:
            for obj in self._store.list(rtype).items:
                if (owner := find_gateway_owner(obj)) is not None:
                    keys.append((objects.namespace(obj), owner))
        return keys

    def find_event_keys(self, event: objects.WatchEvent) -> Iterable[tuple[str, str]]:
        obj = event.object
        kind = obj.get("kind")
        if kind == resources.GATEWAYS.kind:
            return [(objects.namespace(obj), objects.name(obj))]
        if kind in (resources.DEPLOYMENTS.kind, resources.SERVICES.kind, resources.PODS.kind):
            labels = objects.metadata(obj).get("labels") or {}
            owner = find_gateway_owner(obj) or labels.get(GATEWAY_NAME_LABEL)
            if owner:
                return [(objects.namespace(obj), owner)]
        return []

    def reconcile_one(self, namespace: str, name: str) -> None:
        gateway = self._store.find(resources.GATEWAYS, name, namespace)
        if not is_waypoint(gateway):
            self._remove_owned(namespace, name)
            return
        assert gateway is not None
        conflicts = [
            self._ensure(rtype, gateway, want)
            for rtype, want in (
                (resources.DEPLOYMENTS, build_deployment(gateway, self._settings)),
                (resources.SERVICES, build_service(gateway)),
            )
        ]
        conflict = next((c for c in conflicts if c is not None), None)
        deployment = self._store.find(resources.DEPLOYMENTS, name, namespace)
        ready = int(((deployment or {}).get("status") or {}).get("readyReplicas") or 0)
        status = build_status(
            gateway,
            service=self._store.find(resources.SERVICES, name, namespace),
            ready_replicas=0 if conflict else ready,
            conflict=conflict,
            domain=self._settings.domain,
        )
        self._write_status(gateway, status)

    def _ensure(
        self, rtype: resources.ResourceType, gateway: Mapping[str, Any], want: dict[str, Any]
    ) -> str | None:
        """Create or put back `want`; a conflict message if a stranger holds the name."""
        name, namespace = objects.name(gateway), objects.namespace(gateway)
        have = self._store.find(rtype, name, namespace)
        if have is None:
            self._store.create(rtype, want, namespace)
            _LOG.info(
                "waypoint object created",
                extra=log.fields(kind=rtype.kind, namespace=namespace, name=name),
            )
            return None
        if find_gateway_owner(have) != name:
            return (
                f"a {rtype.kind} named {name!r} already exists in namespace {namespace!r} and "
                "is not owned by this Gateway; delete or rename it"
            )
        if not contains(have, want):
            merged = copy.deepcopy(have)
            merged["metadata"] = {**have["metadata"], **want["metadata"]}
            merged["spec"] = want["spec"]
            if rtype == resources.SERVICES:  # allocated once, kept for the Service's life
                for key in ("clusterIP", "clusterIPs"):
                    if key in (have.get("spec") or {}):
                        merged["spec"][key] = have["spec"][key]
            self._store.replace(rtype, merged, namespace, name)
            _LOG.info(
                "waypoint object restored",
                extra=log.fields(kind=rtype.kind, namespace=namespace, name=name),
            )
        return None

    def _remove_owned(self, namespace: str, name: str) -> None:
        for rtype in _OWNED:
            obj = self._store.find(rtype, name, namespace)
            if obj is not None and find_gateway_owner(obj) == name:
                self._store.delete(rtype, name, namespace)
                _LOG.info(
                    "waypoint object deleted",
                    extra=log.fields(kind=rtype.kind, namespace=namespace, name=name),
                )

    def _write_status(self, gateway: Mapping[str, Any], status: dict[str, Any]) -> None:
        old = gateway.get("status")
        new = merge_times(status, old, store_mod.format_timestamp(time.time()))
        if old == new:
            return
        body = copy.deepcopy(dict(gateway))
        body["status"] = new
        self._store.replace(
            resources.GATEWAYS,
            body,
            objects.namespace(gateway),
            objects.name(gateway),
            subresource="status",
        )


def contains(have: object, want: object) -> bool:
    """Everything `want` says, `have` says too (what the API server defaulted or allocated in
    `have` besides is fine): a settled object is left alone, a changed one is put back."""
    if isinstance(want, Mapping):
        return isinstance(have, Mapping) and all(
            k in have and contains(have[k], v) for k, v in want.items()
        )
    if isinstance(want, list):
        return (
            isinstance(have, list)
            and len(have) == len(want)
            and all(contains(h, w) for h, w in zip(have, want, strict=True))
        )
    return have == want
