"""The schemas of the core kinds (Namespace, Node, Pod, Service) and apps/v1 Deployment, built
from the nodes and rules in `validation`; Istio's security kinds are in `policyschemas`."""

from __future__ import annotations

import dataclasses
from typing import Any

from controller.sources.local.validation import (
    AnyObject,
    Bool,
    FieldError,
    Int,
    IntOrStr,
    ListOf,
    Obj,
    Rule,
    Schema,
    Str,
    StrMap,
    child,
    cidr,
    cluster_ip,
    dns_label,
    dns_subdomain,
    duplicate,
    env_var_name,
    iana_svc_name,
    invalid,
    ip_address,
    item,
    label_key,
    label_value,
    optional,
    pod_field_path,
    required,
    unsupported,
)

# -- metadata (every kind) -----------------------------------------------------------------

MAX_ANNOTATION_BYTES = 256 * 1024
# A grace period becomes a timestamp; a year keeps it far from datetime's limits.
MAX_GRACE_PERIOD_SECONDS = 365 * 24 * 3600
MAX_INT32 = 2**31 - 1


def _check_owner_references(refs: list[dict[str, Any]], path: str) -> list[FieldError]:
    controllers = [r for r in refs if r.get("controller") is True]
    if len(controllers) > 1:
        names = ", ".join(f"{r['kind']}/{r['name']}" for r in controllers)
        return [
            invalid(
                path,
                [r["name"] for r in controllers],
                f'Only one reference can have Controller set to true. Found "true" in '
                f"references for {names}",
            )
        ]
    return []


OWNER_REFERENCE = Obj(
    {
        "apiVersion": Str(non_empty=True),
        "kind": Str(non_empty=True),
        "name": Str(non_empty=True),
        "uid": Str(non_empty=True),
        "controller": Bool(),
        "blockOwnerDeletion": Bool(),
    },
    required=frozenset({"apiVersion", "kind", "name", "uid"}),
)


def build_metadata(name_rule: Rule) -> Obj:
    return Obj(
        {
            "name": Str(name_rule, non_empty=True),
            "generateName": Str(),
            "namespace": Str(dns_label, non_empty=True),
            "labels": StrMap(label_key, label_value),
            "annotations": StrMap(label_key, None, MAX_ANNOTATION_BYTES),
            "uid": Str(),
            "resourceVersion": Str(),
            "creationTimestamp": Str(),
            "deletionTimestamp": Str(),
            "deletionGracePeriodSeconds": Int(0, MAX_GRACE_PERIOD_SECONDS),
            "generation": Int(0),
            "ownerReferences": ListOf(OWNER_REFERENCE, check_list=_check_owner_references),
        },
        required=frozenset({"name"}),
    )


def build_object(name_rule: Rule, spec: Schema | None, status: Schema | None) -> Obj:
    """A kind's whole schema; with no spec schema, everything but metadata is free-form."""
    fields: dict[str, Schema] = {
        "apiVersion": Str(),
        "kind": Str(),
        "metadata": build_metadata(name_rule),
    }
    if spec is not None:
        fields["spec"] = spec
    if status is not None:
        fields["status"] = status
    return Obj(
        fields,
        required=frozenset({"metadata"} | ({"spec"} if spec is not None else set())),
        open=spec is None and status is None,
    )


GENERIC = build_object(dns_subdomain, None, None)

CONDITION = Obj(
    {
        "type": Str(non_empty=True),
        "status": Str(enum=("True", "False", "Unknown")),
        "reason": Str(),
        "message": Str(),
        "lastTransitionTime": Str(),
        "lastProbeTime": Str(),
        "lastHeartbeatTime": Str(),
        "observedGeneration": Int(0),
    },
    required=frozenset({"type", "status"}),
)
_IP_ENTRY = Obj({"ip": Str(ip_address, non_empty=True)}, required=frozenset({"ip"}))


# -- Pod -----------------------------------------------------------------------------------


def _check_env_var(value: dict[str, Any], path: str) -> list[FieldError]:
    if value.get("value") and "valueFrom" in value:
        return [
            invalid(child(path, "valueFrom"), "", "may not be specified when `value` is not empty")
        ]
    return []


CONTAINER_PORT = Obj(
    {
        "containerPort": Int(1, 65535),
        "name": Str(iana_svc_name, non_empty=True),
        "protocol": Str(enum=("TCP", "UDP")),
    },
    required=frozenset({"containerPort"}),
)
ENV_VAR = Obj(
    {
        "name": Str(env_var_name, non_empty=True),
        "value": Str(),
        "valueFrom": Obj(
            {
                "fieldRef": Obj(
                    {
                        "fieldPath": Str(pod_field_path, non_empty=True),
                        "apiVersion": Str(enum=("v1",)),
                    },
                    required=frozenset({"fieldPath"}),
                )
            },
            required=frozenset({"fieldRef"}),
        ),
    },
    required=frozenset({"name"}),
    check_obj=_check_env_var,
)


def _check_one_handler(handler: dict[str, Any], path: str) -> list[FieldError]:
    if len(handler) != 1:
        return [required(path, "must specify exactly one handler type (exec or sleep)")]
    return []


# A preStop hook runs before the container gets SIGTERM, inside the grace period.
LIFECYCLE_HANDLER = Obj(
    {
        "exec": Obj({"command": ListOf(Str(), non_empty=True)}, required=frozenset({"command"})),
        "sleep": Obj(
            {"seconds": Int(0, MAX_GRACE_PERIOD_SECONDS)}, required=frozenset({"seconds"})
        ),
    },
    check_obj=_check_one_handler,
)
LIFECYCLE = Obj({"preStop": LIFECYCLE_HANDLER})

# Volumes: the playground serves projected service account tokens (a waypoint's credential).
VOLUME_MOUNT = Obj(
    {
        "name": Str(dns_label, non_empty=True),
        "mountPath": Str(non_empty=True),
        "readOnly": Bool(),
    },
    required=frozenset({"name", "mountPath"}),
)
SERVICE_ACCOUNT_TOKEN = Obj(
    {
        "audience": Str(),
        # Kubernetes' bounds; the playground's tokens live as long as their pod.
        "expirationSeconds": Int(600, 2**32),
        "path": Str(non_empty=True),
    },
    required=frozenset({"path"}),
)
VOLUME = Obj(
    {
        "name": Str(dns_label, non_empty=True),
        "projected": Obj(
            {
                "sources": ListOf(
                    Obj(
                        {"serviceAccountToken": SERVICE_ACCOUNT_TOKEN},
                        required=frozenset({"serviceAccountToken"}),
                    ),
                    non_empty=True,
                ),
                "defaultMode": Int(0, 0o777),
            },
            required=frozenset({"sources"}),
        ),
    },
    required=frozenset({"name", "projected"}),
)

CONTAINER = Obj(
    {
        "name": Str(dns_label, non_empty=True),
        # In the playground a container is its command: the image is not pulled or run.
        "image": Str(),
        "imagePullPolicy": Str(enum=("Always", "IfNotPresent", "Never")),
        "command": ListOf(Str(), non_empty=True),
        "args": ListOf(Str()),
        "workingDir": Str(),
        "ports": ListOf(CONTAINER_PORT),
        "env": ListOf(ENV_VAR),
        "lifecycle": LIFECYCLE,
        "volumeMounts": ListOf(VOLUME_MOUNT),
    },
    required=frozenset({"name", "command"}),
)


def _check_containers(containers: list[dict[str, Any]], path: str) -> list[FieldError]:
    found = []
    names: set[str] = set()
    port_names: set[str] = set()
    for i, container in enumerate(containers):
        name = container["name"]
        if name in names:
            found.append(duplicate(child(item(path, i), "name"), name))
        names.add(name)
        for j, port in enumerate(container.get("ports", [])):
            port_name = port.get("name")
            if port_name is None:
                continue
            if port_name in port_names:
                found.append(
                    duplicate(child(item(child(item(path, i), "ports"), j), "name"), port_name)
                )
            port_names.add(port_name)
    return found


POD_SPEC = Obj(
    {
        "containers": ListOf(CONTAINER, non_empty=True, check_list=_check_containers),
        "nodeName": Str(optional(dns_subdomain)),
        "serviceAccountName": Str(dns_subdomain, non_empty=True),
        "terminationGracePeriodSeconds": Int(0, MAX_GRACE_PERIOD_SECONDS),
        "restartPolicy": Str(enum=("Always", "OnFailure", "Never")),
        "hostname": Str(dns_label, non_empty=True),
        "subdomain": Str(dns_label, non_empty=True),
        "nodeSelector": StrMap(label_key, label_value),
        "volumes": ListOf(VOLUME),
    },
    required=frozenset({"containers"}),
)
POD_STATUS = Obj(
    {
        "phase": Str(enum=("Pending", "Running", "Succeeded", "Failed", "Unknown")),
        "conditions": ListOf(CONDITION),
        "message": Str(),
        "reason": Str(),
        "hostIP": Str(ip_address),
        "hostIPs": ListOf(_IP_ENTRY),
        "podIP": Str(ip_address),
        "podIPs": ListOf(_IP_ENTRY),
        "startTime": Str(),
        "containerStatuses": ListOf(AnyObject()),
        "qosClass": Str(),
        "nominatedNodeName": Str(),
    }
)
POD = build_object(dns_subdomain, POD_SPEC, POD_STATUS)


# -- Service -------------------------------------------------------------------------------

SERVICE_PORT = Obj(
    {
        "name": Str(dns_label),
        "port": Int(1, 65535),
        "targetPort": IntOrStr(Int(1, 65535), Str(iana_svc_name, non_empty=True)),
        "protocol": Str(enum=("TCP", "UDP")),
        "appProtocol": Str(),
    },
    required=frozenset({"port"}),
)


def _check_service_spec(spec: dict[str, Any], path: str) -> list[FieldError]:
    found = []
    ports: list[dict[str, Any]] = spec.get("ports", [])
    ports_path = child(path, "ports")
    if not ports and spec.get("clusterIP") != "None":
        found.append(required(ports_path))
    names: set[str] = set()
    pairs: set[tuple[int, str]] = set()
    for i, port in enumerate(ports):
        name = port.get("name", "")
        if len(ports) > 1 and not name:
            found.append(required(child(item(ports_path, i), "name")))
        elif name and name in names:
            found.append(duplicate(child(item(ports_path, i), "name"), name))
        names.add(name)
        pair = (port["port"], port.get("protocol", "TCP"))
        if pair in pairs:
            found.append(duplicate(item(ports_path, i), {"port": pair[0], "protocol": pair[1]}))
        pairs.add(pair)
    ips = spec.get("clusterIPs")
    if ips is not None:
        if len(ips) > 1:
            found.append(invalid(child(path, "clusterIPs"), ips, "may hold at most one address"))
        elif ips and "clusterIP" in spec and spec["clusterIP"] not in ("", ips[0]):
            found.append(
                invalid(child(path, "clusterIPs"), ips, "must hold the same address as clusterIP")
            )
    return found


SERVICE_SPEC = Obj(
    {
        "ports": ListOf(SERVICE_PORT),
        "selector": StrMap(label_key, label_value),
        "clusterIP": Str(cluster_ip),
        "clusterIPs": ListOf(Str(cluster_ip, non_empty=True)),
        "type": Str(enum=("ClusterIP",)),
        "sessionAffinity": Str(enum=("None", "ClientIP")),
        "publishNotReadyAddresses": Bool(),
        "ipFamilies": ListOf(Str(enum=("IPv4",))),
        "ipFamilyPolicy": Str(enum=("SingleStack",)),
        "internalTrafficPolicy": Str(enum=("Cluster", "Local")),
    },
    check_obj=_check_service_spec,
)
SERVICE_STATUS = Obj({"loadBalancer": AnyObject(), "conditions": ListOf(CONDITION)})
SERVICE = build_object(dns_label, SERVICE_SPEC, SERVICE_STATUS)


# -- Namespace, Node -----------------------------------------------------------------------

NAMESPACE = build_object(
    dns_label,
    Obj({"finalizers": ListOf(Str())}),
    Obj({"phase": Str(enum=("Active", "Terminating")), "conditions": ListOf(AnyObject())}),
)
NAMESPACE = dataclasses.replace(NAMESPACE, required=frozenset({"metadata"}))

NODE = build_object(
    dns_subdomain,
    Obj(
        {
            "podCIDR": Str(cidr),
            "podCIDRs": ListOf(Str(cidr)),
            "unschedulable": Bool(),
            "providerID": Str(),
            "taints": ListOf(AnyObject()),
        }
    ),
    Obj(
        {
            "conditions": ListOf(CONDITION),
            "addresses": ListOf(
                Obj(
                    {"type": Str(non_empty=True), "address": Str(non_empty=True)},
                    required=frozenset({"type", "address"}),
                )
            ),
            "capacity": AnyObject(),
            "allocatable": AnyObject(),
            "nodeInfo": AnyObject(),
            "daemonEndpoints": AnyObject(),
            "phase": Str(),
        }
    ),
)
NODE = dataclasses.replace(NODE, required=frozenset({"metadata"}))


# -- Deployment (apps/v1) ------------------------------------------------------------------

# What a Deployment's pods may be: a Deployment exists to keep its pods running.
DEPLOYMENT_RESTART_POLICIES = ("Always",)


def _check_deployment_spec(spec: dict[str, Any], path: str) -> list[FieldError]:
    """The selector must pick the template's own pods, as the API server insists."""
    found = []
    selector_path = child(child(path, "selector"), "matchLabels")
    match_labels: dict[str, str] = spec["selector"].get("matchLabels") or {}
    if not match_labels:
        found.append(required(selector_path, "a Deployment needs a non-empty selector"))
    template = spec["template"]
    template_meta = template.get("metadata") or {}
    template_labels: dict[str, str] = template_meta.get("labels") or {}
    if match_labels and any(template_labels.get(k) != v for k, v in match_labels.items()):
        found.append(
            invalid(
                child(child(child(path, "template"), "metadata"), "labels"),
                template_labels,
                "`selector` does not match template `labels`",
            )
        )
    policy = template["spec"].get("restartPolicy")
    if policy is not None and policy not in DEPLOYMENT_RESTART_POLICIES:
        found.append(
            unsupported(
                child(child(child(path, "template"), "spec"), "restartPolicy"),
                policy,
                DEPLOYMENT_RESTART_POLICIES,
            )
        )
    return found


LABEL_SELECTOR = Obj({"matchLabels": StrMap(label_key, label_value)})
POD_TEMPLATE = Obj(
    {
        "metadata": Obj(
            {
                "labels": StrMap(label_key, label_value),
                "annotations": StrMap(label_key, None, MAX_ANNOTATION_BYTES),
            }
        ),
        "spec": POD_SPEC,
    },
    required=frozenset({"spec"}),
)
DEPLOYMENT_SPEC = Obj(
    {
        "replicas": Int(0, MAX_INT32, one_bound=True),  # an int32 in Kubernetes
        "selector": LABEL_SELECTOR,
        "template": POD_TEMPLATE,
    },
    required=frozenset({"selector", "template"}),
    check_obj=_check_deployment_spec,
)
DEPLOYMENT_STATUS = Obj(
    {
        "observedGeneration": Int(0),
        "replicas": Int(0),
        "updatedReplicas": Int(0),
        "readyReplicas": Int(0),
        "availableReplicas": Int(0),
        "unavailableReplicas": Int(0),
        "collisionCount": Int(0),
        "conditions": ListOf(CONDITION),
    }
)
DEPLOYMENT = build_object(dns_subdomain, DEPLOYMENT_SPEC, DEPLOYMENT_STATUS)
