"""The schema of Istio's ServiceEntry in the local API: Istio's own examples pass as written;
every error names its field path; the store refuses a bad object whole, serves the kind in v1,
v1beta1 and v1alpha3, and answers a good one with what the mesh does not act on."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from controller.sources.local import kinds, serviceentryschemas, store, validation
from meshcore.kube import errors, resources

EXTERNAL_API: dict[str, Any] = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "ServiceEntry",
    "metadata": {"name": "external-api", "namespace": "shop"},
    "spec": {
        "hosts": ["api.example.com", "*.cdn.example.com"],
        "location": "MESH_EXTERNAL",
        "resolution": "DNS",
        "ports": [
            {"number": 443, "name": "https", "protocol": "TLS"},
            {"number": 80, "name": "http", "protocol": "http", "targetPort": 8080},
        ],
        "endpoints": [
            {"address": "lb.example.com", "ports": {"https": 8443}, "weight": 10},
            {"address": "192.0.2.10", "labels": {"region": "eu"}, "locality": "eu/west"},
        ],
        "subjectAltNames": ["spiffe://example.com/api"],
    },
}
STATIC_VMS: dict[str, Any] = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "ServiceEntry",
    "metadata": {"name": "vms", "namespace": "shop"},
    "spec": {
        "hosts": ["mongo.vms.internal"],
        "addresses": ["10.20.0.0/24", "2001:db8::1"],
        "location": "MESH_INTERNAL",
        "resolution": "STATIC",
        "ports": [{"number": 27017, "name": "mongo", "protocol": "MONGO"}],
        "endpoints": [{"address": "10.20.0.5", "network": "vpc", "serviceAccount": "mongo"}],
    },
}


def _errors(obj: dict[str, Any]) -> list[str]:
    return [str(e) for e in validation.validate(serviceentryschemas.SERVICE_ENTRY, obj)]


def _with(base: dict[str, Any], **spec: Any) -> dict[str, Any]:
    """`base` with spec fields replaced (a value of None removes the field)."""
    obj = copy.deepcopy(base)
    for field, value in spec.items():
        if value is None:
            obj["spec"].pop(field, None)
        else:
            obj["spec"][field] = value
    return obj


def test_istio_examples_pass_as_written() -> None:
    assert _errors(EXTERNAL_API) == []
    assert _errors(STATIC_VMS) == []
    # The least there is: hosts alone (location MESH_EXTERNAL, resolution NONE).
    assert _errors({"metadata": {"name": "min"}, "spec": {"hosts": ["a.example.com"]}}) == []
    # NONE with endpoints and a selector for STATIC are both fine.
    assert _errors(_with(EXTERNAL_API, resolution="NONE")) == []
    assert _errors(_with(STATIC_VMS, endpoints=None, workloadSelector={"labels": {"a": "b"}})) == []


@pytest.mark.parametrize(
    ("base", "spec", "expected"),
    [
        pytest.param(
            EXTERNAL_API,
            {"hosts": None},
            "spec.hosts: Required value",
            id="hosts-missing",
        ),
        pytest.param(EXTERNAL_API, {"hosts": []}, "spec.hosts: Required value", id="hosts-empty"),
        pytest.param(
            EXTERNAL_API,
            {"hosts": ["api.example.com", "*"]},
            "spec.hosts[1]: Invalid value: \"*\": the full wildcard '*' is not allowed in a "
            "ServiceEntry (use a '*.' prefix)",
            id="hosts-full-wildcard",
        ),
        pytest.param(
            EXTERNAL_API,
            {"hosts": ["api.example.com", "API.example.com"]},
            'spec.hosts[1]: Invalid value: "API.example.com": must be a lower-case DNS name '
            "(e.g. api.example.com), optionally with a leading '*.'",
            id="hosts-upper-case",
        ),
        pytest.param(
            EXTERNAL_API,
            {"hosts": ["a.example.com", "a.*.example.com"]},
            'spec.hosts[1]: Invalid value: "a.*.example.com"',
            id="hosts-inner-wildcard",
        ),
        pytest.param(
            EXTERNAL_API,
            {"hosts": ["api.example.com", "api.example.com"]},
            'spec.hosts[1]: Duplicate value: "api.example.com"',
            id="hosts-duplicate",
        ),
        pytest.param(
            STATIC_VMS,
            {"addresses": ["10.20.0.0/24", "10.20.0.300"]},
            'spec.addresses[1]: Invalid value: "10.20.0.300": must be an IP address or a CIDR',
            id="addresses-not-ip",
        ),
        pytest.param(
            STATIC_VMS,
            {"addresses": ["10.20.0.0/33"]},
            'spec.addresses[0]: Invalid value: "10.20.0.0/33": must be a valid CIDR value',
            id="addresses-bad-cidr",
        ),
        pytest.param(
            EXTERNAL_API,
            {"addresses": ["10.30.0.0/16"]},
            'spec.addresses[0]: Invalid value: "10.30.0.0/16": a CIDR is allowed only with '
            "resolution NONE or STATIC, not DNS",
            id="addresses-cidr-with-dns",
        ),
        pytest.param(
            EXTERNAL_API,
            {"ports": [{"number": 0, "name": "https"}]},
            "spec.ports[0].number: Invalid value: 0: must be between 1 and 65535, inclusive",
            id="port-number-zero",
        ),
        pytest.param(
            EXTERNAL_API,
            {"ports": [{"number": 65536, "name": "https"}]},
            "spec.ports[0].number: Invalid value: 65536",
            id="port-number-too-big",
        ),
        pytest.param(
            EXTERNAL_API,
            {"ports": [{"name": "https"}]},
            "spec.ports[0].number: Required value",
            id="port-number-missing",
        ),
        pytest.param(
            EXTERNAL_API,
            {"ports": [{"number": 443}]},
            "spec.ports[0].name: Required value",
            id="port-name-missing",
        ),
        pytest.param(
            EXTERNAL_API,
            {"ports": [{"number": 443, "name": "https_1"}]},
            'spec.ports[0].name: Invalid value: "https_1": must be a DNS-1123 label',
            id="port-name-not-a-label",
        ),
        pytest.param(
            EXTERNAL_API,
            {"ports": [{"number": 443, "name": "https"}, {"number": 444, "name": "https"}]},
            'spec.ports[1].name: Duplicate value: "https"',
            id="port-name-duplicate",
        ),
        pytest.param(
            EXTERNAL_API,
            {"ports": [{"number": 443, "name": "https"}, {"number": 443, "name": "tls"}]},
            "spec.ports[1].number: Duplicate value: 443",
            id="port-number-duplicate",
        ),
        pytest.param(
            EXTERNAL_API,
            {"ports": [{"number": 443, "name": "https", "protocol": "QUIC"}]},
            'spec.ports[0].protocol: Unsupported value: "QUIC": supported values: "HTTP", '
            '"HTTPS", "HTTP2", "GRPC", "TCP", "TLS", "MONGO", "REDIS", "MYSQL"',
            id="port-protocol-unknown",
        ),
        pytest.param(
            EXTERNAL_API,
            {"ports": [{"number": 443, "name": "https", "targetPort": 70000}]},
            "spec.ports[0].targetPort: Invalid value: 70000: must be between 1 and 65535",
            id="port-target-too-big",
        ),
        pytest.param(
            EXTERNAL_API,
            {"location": "MESH_LOCAL"},
            'spec.location: Unsupported value: "MESH_LOCAL": supported values: '
            '"MESH_EXTERNAL", "MESH_INTERNAL"',
            id="location-unknown",
        ),
        pytest.param(
            EXTERNAL_API,
            {"resolution": "dns"},
            'spec.resolution: Unsupported value: "dns": supported values: "NONE", "STATIC", '
            '"DNS", "DNS_ROUND_ROBIN"',
            id="resolution-lower-case",
        ),
        pytest.param(
            EXTERNAL_API,
            {"endpoints": [{"ports": {"https": 8443}}]},
            "spec.endpoints[0].address: Required value",
            id="endpoint-address-missing",
        ),
        pytest.param(
            EXTERNAL_API,
            {"endpoints": [{"address": "lb.example.com", "ports": {"grpc": 9000}}]},
            'spec.endpoints[0].ports: Invalid value: "grpc": not the name of a port in '
            "spec.ports (names: https, http)",
            id="endpoint-port-undefined",
        ),
        pytest.param(
            EXTERNAL_API,
            {"endpoints": [{"address": "lb.example.com", "ports": {"https": 0}}]},
            "spec.endpoints[0].ports[https]: Invalid value: 0",
            id="endpoint-port-zero",
        ),
        pytest.param(
            EXTERNAL_API,
            {"endpoints": [{"address": "lb.example.com", "labels": {"a": "*"}}]},
            'spec.endpoints[0].labels: Invalid value: "*"',
            id="endpoint-label-value",
        ),
        pytest.param(
            EXTERNAL_API,
            {"endpoints": [{"address": "not a name"}]},
            'spec.endpoints[0].address: Invalid value: "not a name": must be an IP address '
            "or a DNS name (e.g. api.example.com)",
            id="dns-endpoint-not-a-name",
        ),
        pytest.param(
            STATIC_VMS,
            {"endpoints": [{"address": "10.20.0.5"}, {"address": "mongo-2.vms.internal"}]},
            'spec.endpoints[1].address: Invalid value: "mongo-2.vms.internal": resolution '
            "STATIC needs an IP address",
            id="static-endpoint-hostname",
        ),
        pytest.param(
            STATIC_VMS,
            {"endpoints": [{"address": "unix:///var/run/mongo.sock"}]},
            "spec.endpoints[0].address: Forbidden: unix domain socket endpoints are not supported",
            id="static-endpoint-unix",
        ),
        pytest.param(
            STATIC_VMS,
            {"endpoints": None},
            "spec.endpoints: Required value: resolution STATIC needs endpoints or a "
            "workloadSelector",
            id="static-without-endpoints",
        ),
        pytest.param(
            STATIC_VMS,
            {"workloadSelector": {"labels": {"app": "mongo"}}},
            "spec.workloadSelector: Forbidden: only one of workloadSelector, endpoints may be set",
            id="selector-and-endpoints",
        ),
        pytest.param(
            EXTERNAL_API,
            {"resolution": "DNS_ROUND_ROBIN"},
            "spec.endpoints: Forbidden: resolution DNS_ROUND_ROBIN takes at most one endpoint, "
            "got 2",
            id="round-robin-two-endpoints",
        ),
        pytest.param(
            EXTERNAL_API,
            {"endpoints": None},
            'spec.hosts[1]: Invalid value: "*.cdn.example.com": resolution DNS without '
            "endpoints resolves each host, and a wildcard host cannot be resolved: add "
            "endpoints or use resolution NONE",
            id="dns-wildcard-without-endpoints",
        ),
        pytest.param(
            EXTERNAL_API,
            {"endpoints": None, "resolution": "DNS_ROUND_ROBIN"},
            'spec.hosts[1]: Invalid value: "*.cdn.example.com": resolution DNS_ROUND_ROBIN',
            id="round-robin-wildcard-without-endpoints",
        ),
        pytest.param(
            EXTERNAL_API,
            {"workloadSelector": {"matchLabels": {"app": "x"}}, "endpoints": None},
            "spec.workloadSelector.matchLabels: Unknown field",
            id="selector-match-labels",
        ),
        pytest.param(
            EXTERNAL_API,
            {"exportTo": [""]},
            "spec.exportTo[0]: Required value",
            id="export-to-empty",
        ),
        pytest.param(EXTERNAL_API, {"host": "x"}, "spec.host: Unknown field", id="unknown-field"),
    ],
)
def test_bad_service_entries_name_the_field(
    base: dict[str, Any], spec: dict[str, Any], expected: str
) -> None:
    found = _errors(_with(base, **spec))
    assert any(e.startswith(expected) for e in found), found


@pytest.mark.parametrize("protocol", ["HTTP", "http", "Http2", "grpc", "tls", "MySQL", "redis"])
def test_protocols_are_read_in_any_case_as_istio_does(protocol: str) -> None:
    ports = [{"number": 443, "name": "https", "protocol": protocol}]
    assert _errors(_with(EXTERNAL_API, ports=ports, endpoints=None, hosts=["a.example.com"])) == []


def test_the_status_is_free_for_controllers() -> None:
    obj = copy.deepcopy(STATIC_VMS)
    obj["status"] = {"addresses": [{"host": "h", "value": "240.240.0.1"}], "anything": [1]}
    assert _errors(obj) == []


def test_warnings_name_the_fields_not_acted_on() -> None:
    assert serviceentryschemas.find_unenforced(EXTERNAL_API) == []
    obj = _with(
        STATIC_VMS, endpoints=None, workloadSelector={"labels": {"app": "m"}}, exportTo=["."]
    )
    assert serviceentryschemas.find_unenforced(obj) == [
        "spec.workloadSelector: accepted, not acted on by this mesh",
        "spec.exportTo: accepted, not acted on by this mesh",
    ]


def _store() -> store.ObjectStore:
    objects = store.ObjectStore(kinds.build_registry())
    objects.create(resources.NAMESPACES, {"metadata": {"name": "shop"}})
    return objects


def test_the_store_refuses_a_bad_service_entry_whole_and_keeps_a_good_one() -> None:
    objects = _store()
    with pytest.raises(errors.InvalidError) as raised:
        objects.create(resources.SERVICE_ENTRIES, _with(STATIC_VMS, endpoints=None), "shop")
    assert 'ServiceEntry "vms" is invalid: spec.endpoints: Required value' in str(raised.value)
    assert objects.list(resources.SERVICE_ENTRIES, "shop").items == []

    created = objects.create(resources.SERVICE_ENTRIES, copy.deepcopy(EXTERNAL_API), "shop")
    assert created["metadata"]["generation"] == 1
    assert created["spec"] == EXTERNAL_API["spec"]  # stored as written: no defaults filled in


@pytest.mark.parametrize("version", ["v1", "v1beta1", "v1alpha3"])
def test_served_in_every_version_istio_serves_with_short_name_se(version: str) -> None:
    registry = kinds.build_registry()
    served = registry.find_kind(f"networking.istio.io/{version}", "ServiceEntry")
    assert served is not None
    assert served.rtype == resources.SERVICE_ENTRIES
    assert served.short_names == ("se",)
    assert registry.find_plural("networking.istio.io", version, "serviceentries") is served
    listing = kinds.build_api_resource_list(registry, "networking.istio.io", version)
    names = [r["name"] for r in listing["resources"]]
    assert "serviceentries" in names
    assert "serviceentries/status" in names
