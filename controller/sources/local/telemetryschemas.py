"""Schema of Istio's Telemetry kind (telemetry.istio.io v1, also v1alpha1), strict as the other
Istio kinds: unknown fields and wrong types are errors naming their path.

The mesh acts on `tracing[].randomSamplingPercentage` (and `disableSpanReporting`) for its
waypoints; metrics and access-log overrides are accepted with their shape checked and reported
by `find_unenforced`.
"""

from __future__ import annotations

from typing import Any

from controller.sources.local import policyschemas, schemas, validation

V = validation

_PROVIDERS = V.ListOf(V.Obj({"name": V.Str(non_empty=True)}, required=frozenset({"name"})))
TRACING = V.Obj(
    {
        "match": V.AnyObject(),
        "providers": _PROVIDERS,
        "randomSamplingPercentage": V.Number(0, 100),
        "disableSpanReporting": V.Bool(),
        "customTags": V.AnyObject(),
        "useRequestIdForTraceSampling": V.Bool(),
        "enableIstioTags": V.Bool(),
    }
)
TELEMETRY_SPEC = V.Obj(
    {
        "selector": policyschemas.WORKLOAD_SELECTOR,
        "targetRef": policyschemas.TARGET_REF,
        "targetRefs": V.ListOf(policyschemas.TARGET_REF),
        "tracing": V.ListOf(TRACING),
        "metrics": V.ListOf(V.AnyObject()),
        "accessLogging": V.ListOf(V.AnyObject()),
    }
)
TELEMETRY = schemas.build_object(V.dns_subdomain, TELEMETRY_SPEC, policyschemas.POLICY_STATUS)

NOT_ACTED_ON = "accepted, not acted on by this mesh"


def find_unenforced(obj: dict[str, Any]) -> list[str]:
    """Tracing sampling is what waypoints take from a Telemetry; the rest is reported."""
    spec = obj.get("spec") or {}
    found = [
        f"spec.{field}: {NOT_ACTED_ON}"
        for field in ("metrics", "accessLogging", "selector")
        if field in spec
    ]
    for i, tracing in enumerate(spec.get("tracing") or ()):
        found += [
            f"spec.tracing[{i}].{field}: {NOT_ACTED_ON}"
            for field in ("match", "customTags", "providers", "useRequestIdForTraceSampling")
            if field in tracing
        ]
    return found
