"""The schema of Istio's Telemetry in the local API: sampling is a percentage, unknown fields
are errors naming their path, and what waypoints do not act on is reported."""

from __future__ import annotations

from typing import Any

import pytest

from controller.sources.local import telemetryschemas, validation


def _telemetry(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "telemetry.istio.io/v1",
        "kind": "Telemetry",
        "metadata": {"name": "mesh-default", "namespace": "istio-system"},
        "spec": spec,
    }


def test_istios_example_passes_and_reports_what_is_not_acted_on() -> None:
    obj = _telemetry(
        {
            "tracing": [{"providers": [{"name": "otel"}], "randomSamplingPercentage": 12.5}],
            "accessLogging": [{"providers": [{"name": "envoy"}]}],
        }
    )
    assert validation.validate(telemetryschemas.TELEMETRY, obj) == []
    assert telemetryschemas.find_unenforced(obj) == [
        "spec.accessLogging: accepted, not acted on by this mesh",
        "spec.tracing[0].providers: accepted, not acted on by this mesh",
    ]


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        (
            {"tracing": [{"randomSamplingPercentage": 150}]},
            "spec.tracing[0].randomSamplingPercentage: Invalid value: 150",
        ),
        (
            {"tracing": [{"randomSamplingPercentage": "10"}]},
            "spec.tracing[0].randomSamplingPercentage: Invalid value",
        ),
        ({"tracing": [{"sampling": 10}]}, "spec.tracing[0].sampling: Unknown field"),
        ({"tracing": [{"providers": [{}]}]}, "spec.tracing[0].providers[0].name: Required value"),
    ],
)
def test_bad_telemetries_name_the_field(spec: dict[str, Any], fragment: str) -> None:
    found = [str(e) for e in validation.validate(telemetryschemas.TELEMETRY, _telemetry(spec))]
    assert any(fragment in e for e in found), found
