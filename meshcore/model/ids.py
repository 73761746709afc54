"""Typed identifiers, so a workload uid can't be passed where a service key is expected."""

from __future__ import annotations

import ipaddress
from typing import NewType

# Kubernetes pods: "<cluster>//Pod/<namespace>/<name>".
WorkloadUid = NewType("WorkloadUid", str)
# "<namespace>/<hostname>", the xDS name of a Service.
ServiceKey = NewType("ServiceKey", str)
# "<namespace>/<name>", the xDS name of an Authorization.
PolicyKey = NewType("PolicyKey", str)

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_CLUSTER_ID = "Kubernetes"
DEFAULT_DOMAIN = "cluster.local"


def pod_uid(namespace: str, name: str, cluster_id: str = DEFAULT_CLUSTER_ID) -> WorkloadUid:
    return WorkloadUid(f"{cluster_id}//Pod/{namespace}/{name}")


def service_key(namespace: str, hostname: str) -> ServiceKey:
    return ServiceKey(f"{namespace}/{hostname}")


def policy_key(namespace: str, name: str) -> PolicyKey:
    return PolicyKey(f"{namespace}/{name}")


def service_hostname(name: str, namespace: str, domain: str = DEFAULT_DOMAIN) -> str:
    return f"{name}.{namespace}.svc.{domain}"
