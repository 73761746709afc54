"""Istio's standard metric labels for a workload, shared by ztunnel and the waypoint: the same
eight labels, in the same order, for the source and the destination side; missing values are
written ``unknown``."""

from __future__ import annotations

from meshcore.identity import spiffe
from meshcore.model import workload

UNKNOWN = "unknown"
WORKLOAD_LABELS = (
    "workload",
    "canonical_service",
    "canonical_revision",
    "workload_namespace",
    "principal",
    "app",
    "version",
    "cluster",
)


def or_unknown(value: str) -> str:
    return value or UNKNOWN


def workload_labels(
    wl: workload.Workload | None, identity: spiffe.SpiffeId | None
) -> tuple[str, ...]:
    """workload, canonical service and revision, namespace, principal, app, version, cluster:
    the same eight labels, in the same order, for the source and the destination side."""
    principal = identity or (wl.identity if wl else None)
    if wl is None:
        return (
            UNKNOWN,
            UNKNOWN,
            UNKNOWN,
            UNKNOWN,
            or_unknown(principal.uri if principal else ""),
            UNKNOWN,
            UNKNOWN,
            UNKNOWN,
        )
    return (
        or_unknown(wl.workload_name or wl.name),
        or_unknown(wl.canonical_name),
        or_unknown(wl.canonical_revision),
        or_unknown(wl.namespace),
        or_unknown(principal.uri if principal else ""),
        or_unknown(wl.canonical_name),  # app
        or_unknown(wl.canonical_revision),  # version
        or_unknown(wl.cluster_id),
    )
