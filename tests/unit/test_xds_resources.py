"""Model <-> protobuf conversion of xDS resources: round trips, wire compatibility, validation."""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Callable, Mapping, Sequence

import pytest
from google.protobuf import any_pb2, struct_pb2

from meshcore.model import authorization as az
from meshcore.model import ids, workload
from meshcore.proto import authorization_pb2, workload_pb2
from meshcore.xds import resources, types

# --- a hand-written protobuf encoder, so wire compatibility is checked against field numbers ---


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _len(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _str(field: int, value: str) -> bytes:
    return _len(field, value.encode())


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _any(type_url: str, value: bytes) -> any_pb2.Any:
    return any_pb2.Any(type_url=type_url, value=value)


V4 = ipaddress.ip_address("10.0.0.1")
V6 = ipaddress.ip_address("fd00::1")
SVC_KEY = ids.ServiceKey("shop/web.shop.svc.cluster.local")


def _full_workload() -> workload.Workload:
    """Every field set to a non-default value."""
    return workload.Workload(
        uid=ids.pod_uid("shop", "web-1", "east"),
        name="web-1",
        namespace="shop",
        addresses=(V4, V6),
        node="node-1",
        service_account="web-sa",
        trust_domain="td.example",
        tunnel_protocol=workload.TunnelProtocol.HBONE,
        canonical_name="web",
        canonical_revision="v2",
        workload_type=workload.WorkloadType.JOB,
        workload_name="web-job",
        services=(
            workload.ServiceBinding(
                ids.ServiceKey("shop/api.shop.svc.cluster.local"),
                (workload.PortMapping(80, 8080), workload.PortMapping(443, 8443)),
            ),
            workload.ServiceBinding(SVC_KEY, (workload.PortMapping(9090, 9090),)),
        ),
        authorization_policies=(ids.PolicyKey("shop/allow"), ids.PolicyKey("shop/deny")),
        status=workload.WorkloadStatus.UNHEALTHY,
        cluster_id="east",
        network="net-1",
        application_tunnel=workload.ApplicationTunnel(workload.AppTunnelProtocol.PROXY, 15088),
        waypoint=workload.GatewayAddress(address=("net-1", V6), hbone_mtls_port=15009),
        labels=(("app", "web"), ("version", "v2")),
    )


def _full_service() -> workload.Service:
    return workload.Service(
        name="web",
        namespace="shop",
        hostname="web.shop.svc.cluster.local",
        addresses=(ipaddress.ip_address("10.96.0.10"), ipaddress.ip_address("fd00:96::a")),
        ports=(workload.PortMapping(80, 8080), workload.PortMapping(8443, 0)),
        subject_alt_names=("spiffe://cluster.local/ns/shop/sa/web",),
        waypoint=workload.GatewayAddress(
            hostname=("mesh", "waypoint.mesh.svc.cluster.local"), hbone_mtls_port=15009
        ),
    )


def _full_policy() -> az.Authorization:
    match = az.Match(
        namespaces=(az.StringMatch(az.MatchKind.EXACT, "shop"),),
        not_namespaces=(az.StringMatch(az.MatchKind.PREFIX, "kube-"),),
        principals=(az.StringMatch(az.MatchKind.SUFFIX, "/sa/web"),),
        not_principals=(az.StringMatch(az.MatchKind.PRESENCE),),
        source_ips=(ipaddress.ip_network("10.0.0.0/8"),),
        not_source_ips=(ipaddress.ip_network("10.1.2.3/32"),),
        destination_ips=(ipaddress.ip_network("fd00::/64"),),
        not_destination_ips=(ipaddress.ip_network("0.0.0.0/0"),),
        destination_ports=(80, 443),
        not_destination_ports=(22,),
        service_accounts=(az.ServiceAccountMatch("shop", "web"),),
        not_service_accounts=(az.ServiceAccountMatch("shop", "db"),),
    )
    return az.Authorization(
        name="allow-web",
        namespace="shop",
        scope=az.Scope.WORKLOAD_SELECTOR,
        action=az.Action.DENY,
        rules=(
            az.Rule((az.Clause((match, az.Match(destination_ports=(8080,)))), az.Clause(()))),
            az.Rule(()),
        ),
        dry_run=True,
    )


# --- round trips ---


def test_workload_round_trip_keeps_every_field() -> None:
    wl = _full_workload()
    name, packed = resources.address_resource(wl)
    assert name == wl.uid
    assert packed.type_url == types.ADDRESS
    assert resources.decode_address(packed, name=name) == wl


def test_service_round_trip_keeps_every_field() -> None:
    svc = _full_service()
    name, packed = resources.address_resource(svc)
    assert name == "shop/web.shop.svc.cluster.local"
    assert resources.decode_address(packed, name=name) == svc


def test_headless_service_round_trip() -> None:
    svc = workload.Service("db", "shop", "db.shop.svc.cluster.local", (), ())
    assert resources.decode_address(resources.address_resource(svc)[1]) == svc


def test_authorization_round_trip_keeps_every_field() -> None:
    policy = _full_policy()
    name, packed = resources.authorization_resource(policy)
    assert name == "shop/allow-web"
    assert packed.type_url == types.AUTHORIZATION
    assert resources.decode_authorization(packed, name=name) == policy


def test_default_workload_round_trip_and_defaults_on_the_wire() -> None:
    wl = workload.Workload(
        uid=ids.pod_uid("shop", "a"), name="a", namespace="shop", addresses=(V4,), node="n1"
    )
    pb = resources.workload_to_proto(wl)
    assert pb.trust_domain == ""  # cluster.local is the documented default: omitted, like istiod
    assert pb.service_account == "default"
    assert resources.workload_from_proto(pb) == wl


def test_empty_identity_fields_take_the_documented_defaults() -> None:
    pb = workload_pb2.Workload(uid="c//Pod/shop/a", namespace="shop")
    wl = resources.workload_from_proto(pb)
    assert (wl.trust_domain, wl.service_account) == ("cluster.local", "default")
    assert str(wl.identity) == "spiffe://cluster.local/ns/shop/sa/default"


def test_version_is_content_hash_independent_of_binding_order() -> None:
    wl = _full_workload()
    swapped = dataclasses.replace(wl, services=tuple(reversed(wl.services)))
    a = resources.address_resource(wl)[1]
    b = resources.address_resource(swapped)[1]
    assert resources.resource_version(a) == resources.resource_version(b)
    moved = dataclasses.replace(wl, node="node-2")
    assert resources.resource_version(a) != resources.resource_version(
        resources.address_resource(moved)[1]
    )


# --- wire compatibility: bytes built from the field numbers of istio.workload / istio.security ---


def test_decodes_workload_built_from_field_numbers() -> None:
    port_list = _len(1, _int(1, 80) + _int(2, 8080))
    wl_bytes = (
        _str(20, "east//Pod/shop/web-1")
        + _str(1, "web-1")
        + _str(2, "shop")
        + _len(3, V4.packed)
        + _len(3, V6.packed)
        + _str(4, "net-1")
        + _int(5, 1)  # HBONE
        + _str(6, "td.example")
        + _str(7, "web-sa")
        + _str(9, "node-1")
        + _str(10, "web")
        + _str(11, "v2")
        + _int(12, 3)  # JOB
        + _str(13, "web-job")
        + _len(22, _str(1, SVC_KEY) + _len(2, port_list))
        + _str(16, "shop/allow")
        + _int(17, 1)  # UNHEALTHY
        + _str(18, "east")
    )
    decoded = resources.decode_address(_any(types.ADDRESS, _len(1, wl_bytes)))
    assert decoded == workload.Workload(
        uid=ids.WorkloadUid("east//Pod/shop/web-1"),
        name="web-1",
        namespace="shop",
        addresses=(V4, V6),
        node="node-1",
        service_account="web-sa",
        trust_domain="td.example",
        tunnel_protocol=workload.TunnelProtocol.HBONE,
        canonical_name="web",
        canonical_revision="v2",
        workload_type=workload.WorkloadType.JOB,
        workload_name="web-job",
        services=(workload.ServiceBinding(SVC_KEY, (workload.PortMapping(80, 8080),)),),
        authorization_policies=(ids.PolicyKey("shop/allow"),),
        status=workload.WorkloadStatus.UNHEALTHY,
        cluster_id="east",
        network="net-1",
    )


def test_decodes_service_built_from_field_numbers() -> None:
    vip = ipaddress.ip_address("10.96.0.10")
    svc_bytes = (
        _str(1, "web")
        + _str(2, "shop")
        + _str(3, "web.shop.svc.cluster.local")
        + _len(4, _str(1, "") + _len(2, vip.packed))
        + _len(5, _int(1, 80) + _int(2, 8080) + _int(3, 1))  # app_protocol HTTP11: ignored
        + _str(6, "spiffe://cluster.local/ns/shop/sa/web")
    )
    decoded = resources.decode_address(_any(types.ADDRESS, _len(2, svc_bytes)))
    assert decoded == workload.Service(
        name="web",
        namespace="shop",
        hostname="web.shop.svc.cluster.local",
        addresses=(vip,),
        ports=(workload.PortMapping(80, 8080),),
        subject_alt_names=("spiffe://cluster.local/ns/shop/sa/web",),
    )


def test_decodes_authorization_built_from_field_numbers() -> None:
    empty = b""
    match = (
        _len(1, _str(1, "shop"))  # namespaces: exact
        + _len(2, _str(2, "kube-"))  # not_namespaces: prefix
        + _len(3, _str(3, "/sa/web"))  # principals: suffix
        + _len(4, _len(4, empty))  # not_principals: presence
        + _len(5, _len(1, bytes([10, 0, 0, 0])) + _int(2, 8))  # source_ips
        + _len(7, _len(1, V6.packed) + _int(2, 128))  # destination_ips
        + _len(9, _varint(80) + _varint(443))  # destination_ports, packed
        + _int(10, 22)  # not_destination_ports, unpacked: parsers must accept both
        + _len(11, _str(1, "shop") + _str(2, "web"))  # service_accounts
    )
    policy = (
        _str(1, "allow-web")
        + _str(2, "shop")
        + _int(3, 1)  # NAMESPACE
        + _int(4, 1)  # DENY
        + _len(5, _len(1, _len(2, match)))  # rules[0].clauses[0].matches[0]
        + _int(6, 1)  # dry_run
    )
    decoded = resources.decode_authorization(_any(types.AUTHORIZATION, policy))
    assert decoded == az.Authorization(
        name="allow-web",
        namespace="shop",
        scope=az.Scope.NAMESPACE,
        action=az.Action.DENY,
        rules=(
            az.Rule(
                (
                    az.Clause(
                        (
                            az.Match(
                                namespaces=(az.StringMatch(az.MatchKind.EXACT, "shop"),),
                                not_namespaces=(az.StringMatch(az.MatchKind.PREFIX, "kube-"),),
                                principals=(az.StringMatch(az.MatchKind.SUFFIX, "/sa/web"),),
                                not_principals=(az.StringMatch(az.MatchKind.PRESENCE),),
                                source_ips=(ipaddress.ip_network("10.0.0.0/8"),),
                                destination_ips=(ipaddress.ip_network("fd00::1/128"),),
                                destination_ports=(80, 443),
                                not_destination_ports=(22,),
                                service_accounts=(az.ServiceAccountMatch("shop", "web"),),
                            ),
                        )
                    ),
                )
            ),
        ),
        dry_run=True,
    )


def test_encoded_workload_uses_istio_field_numbers() -> None:
    wl = workload.Workload(
        uid=ids.WorkloadUid("c//Pod/shop/a"),
        name="a",
        namespace="shop",
        addresses=(V4,),
        node="n1",
        service_account="sa",
        cluster_id="",
    )
    expected = (
        _str(20, "c//Pod/shop/a")
        + _str(1, "a")
        + _str(2, "shop")
        + _len(3, V4.packed)
        + _str(7, "sa")
        + _str(9, "n1")
        + _int(12, 2)  # POD
    )
    serialized = resources.workload_to_proto(wl).SerializeToString(deterministic=True)
    assert workload_pb2.Workload.FromString(serialized) == workload_pb2.Workload.FromString(
        expected
    )
    assert sorted(_field_numbers(serialized)) == sorted(_field_numbers(expected))


def _field_numbers(data: bytes) -> list[int]:
    """Top-level field numbers of a serialized message (varint and length-delimited only)."""
    numbers, i = [], 0
    while i < len(data):
        key, i = _read_varint(data, i)
        numbers.append(key >> 3)
        if key & 7 == 0:
            _, i = _read_varint(data, i)
        else:
            length, i = _read_varint(data, i)
            i += length
    return numbers


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


# --- validation ---


def _wl(
    *,
    addresses: Sequence[bytes] = (),
    services: Mapping[str, Sequence[workload_pb2.Port]] | None = None,
    **scalars: str | int,
) -> any_pb2.Any:
    pb = workload_pb2.Workload(uid="c//Pod/shop/a", name="a", namespace="shop")
    pb.addresses.extend(addresses)
    for svc, ports in (services or {}).items():
        pb.services[svc].ports.extend(ports)
    for key, value in scalars.items():
        setattr(pb, key, value)
    packed = any_pb2.Any()
    packed.Pack(workload_pb2.Address(workload=pb))
    return packed


def _svc(**fields: object) -> any_pb2.Any:
    pb = workload_pb2.Service(name="web", namespace="shop", hostname="web.shop.svc.cluster.local")
    for key, value in fields.items():
        if key in ("addresses", "ports"):
            getattr(pb, key).extend(value)
        else:
            setattr(pb, key, value)
    packed = any_pb2.Any()
    packed.Pack(workload_pb2.Address(service=pb))
    return packed


def _pol(match: authorization_pb2.Match | None = None, **fields: object) -> any_pb2.Any:
    pb = authorization_pb2.Authorization(name="p", namespace="shop")
    for key, value in fields.items():
        setattr(pb, key, value)
    if match is not None:
        pb.rules.add().clauses.add().matches.append(match)
    packed = any_pb2.Any()
    packed.Pack(pb)
    return packed


def _decode_address(packed: any_pb2.Any) -> object:
    return resources.decode_address(packed)


def _decode_policy(packed: any_pb2.Any) -> object:
    return resources.decode_authorization(packed)


_M = "rules[0].clauses[0].matches[0]"
_BAD_ADDRESS = authorization_pb2.Address(address=b"\x0a\x00\x00", length=8)


@pytest.mark.parametrize(
    ("decode", "packed", "field"),
    [
        (_decode_address, _wl(uid=""), "uid"),
        (_decode_address, _wl(addresses=[b"\x0a\x00\x00\x01\x02"]), "addresses[0]"),
        (_decode_address, _wl(addresses=[V4.packed, b""]), "addresses[1]"),
        (_decode_address, _wl(tunnel_protocol=2), "tunnel_protocol"),
        (_decode_address, _wl(tunnel_protocol=77), "tunnel_protocol"),
        (_decode_address, _wl(status=5), "status"),
        (_decode_address, _wl(workload_type=9), "workload_type"),
        (_decode_address, _wl(namespace=""), "namespace"),
        (_decode_address, _wl(namespace="Shop"), "namespace"),
        (_decode_address, _wl(service_account="Web_SA"), "service_account"),
        (_decode_address, _wl(trust_domain="bad domain"), "trust_domain"),
        (
            _decode_address,
            _wl(services={"no-slash": [workload_pb2.Port(service_port=80, target_port=80)]}),
            "services['no-slash']",
        ),
        (
            _decode_address,
            _wl(services={SVC_KEY: [workload_pb2.Port(service_port=70000, target_port=80)]}),
            f"services[{SVC_KEY!r}].ports[0].service_port",
        ),
        (
            _decode_address,
            _wl(services={SVC_KEY: [workload_pb2.Port(service_port=0, target_port=80)]}),
            f"services[{SVC_KEY!r}].ports[0].service_port",
        ),
        (_decode_address, _svc(hostname=""), "hostname"),
        (_decode_address, _svc(namespace=""), "namespace"),
        (
            _decode_address,
            _svc(addresses=[workload_pb2.NetworkAddress(address=b"\x01\x02\x03")]),
            "addresses[0].address",
        ),
        (
            _decode_address,
            _svc(ports=[workload_pb2.Port(service_port=80, target_port=65536)]),
            "ports[0].target_port",
        ),
        (_decode_address, _any(types.ADDRESS, b""), "type"),
        (_decode_address, _any(types.AUTHORIZATION, b""), "type_url"),
        (_decode_address, _any(types.ADDRESS, b"\x0a\x05ab"), "value"),
        (_decode_policy, _pol(name=""), "name"),
        (_decode_policy, _pol(scope=7), "scope"),
        (_decode_policy, _pol(action=2), "action"),  # AUDIT does not exist in ztunnel
        (_decode_policy, _any(types.ADDRESS, b""), "type_url"),
        (_decode_policy, _any(types.AUTHORIZATION, b"\xff\xff"), "value"),
        (
            _decode_policy,
            _pol(authorization_pb2.Match(principals=[authorization_pb2.StringMatch()])),
            f"{_M}.principals[0]",
        ),
        (
            _decode_policy,
            _pol(
                authorization_pb2.Match(
                    source_ips=[authorization_pb2.Address(address=V4.packed, length=33)]
                )
            ),
            f"{_M}.source_ips[0].length",
        ),
        (
            _decode_policy,
            _pol(authorization_pb2.Match(not_destination_ips=[_BAD_ADDRESS])),
            f"{_M}.not_destination_ips[0].address",
        ),
        (
            _decode_policy,
            _pol(authorization_pb2.Match(destination_ports=[80, 65536])),
            f"{_M}.destination_ports[1]",
        ),
        (
            _decode_policy,
            _pol(authorization_pb2.Match(not_destination_ports=[65536])),
            f"{_M}.not_destination_ports[0]",
        ),
    ],
    ids=[
        "wl-missing-uid",
        "wl-5-byte-address",
        "wl-empty-address",
        "wl-legacy-mtls-unsupported",
        "wl-unknown-tunnel",
        "wl-unknown-status",
        "wl-unknown-type",
        "wl-no-namespace",
        "wl-uppercase-namespace",
        "wl-bad-service-account",
        "wl-bad-trust-domain",
        "wl-service-key-without-slash",
        "wl-service-port-too-big",
        "wl-service-port-zero",
        "svc-no-hostname",
        "svc-no-namespace",
        "svc-3-byte-vip",
        "svc-target-port-too-big",
        "address-empty-oneof",
        "address-wrong-type-url",
        "address-truncated-bytes",
        "policy-no-name",
        "policy-unknown-scope",
        "policy-audit-action",
        "policy-wrong-type-url",
        "policy-garbage-bytes",
        "policy-string-match-unset",
        "policy-prefix-too-long",
        "policy-bad-ip-length",
        "policy-port-too-big",
        "policy-port-too-big",
    ],
)
def test_invalid_resources_name_the_field(
    decode: Callable[[any_pb2.Any], object], packed: any_pb2.Any, field: str
) -> None:
    with pytest.raises(resources.ResourceError) as err:
        decode(packed)
    assert err.value.field == field
    assert field in str(err.value)


def test_error_names_the_resource() -> None:
    with pytest.raises(resources.ResourceError) as err:
        resources.decode_address(_wl(addresses=[b"\x01"]))
    assert err.value.name == "c//Pod/shop/a"
    assert "'c//Pod/shop/a'" in str(err.value)


def test_name_must_match_content() -> None:
    _, packed = resources.address_resource(_full_workload())
    with pytest.raises(resources.ResourceError) as err:
        resources.decode_address(packed, name="east//Pod/shop/someone-else")
    assert err.value.field == "name"
    _, packed = resources.authorization_resource(_full_policy())
    with pytest.raises(resources.ResourceError):
        resources.decode_authorization(packed, name="shop/other")


def test_network_host_bits_are_masked() -> None:
    packed = _pol(
        authorization_pb2.Match(
            source_ips=[authorization_pb2.Address(address=bytes([10, 1, 2, 3]), length=8)]
        )
    )
    policy = resources.decode_authorization(packed)
    assert policy.rules[0].clauses[0].matches[0].source_ips == (ipaddress.ip_network("10.0.0.0/8"),)


# --- application tunnel (Workload field 23: ApplicationTunnel {protocol = 1, port = 2}) ---


def _wl_with_tunnel(tunnel: bytes | None) -> any_pb2.Any:
    body = _str(20, "c//Pod/shop/a") + _str(1, "a") + _str(2, "shop")
    if tunnel is not None:
        body += _len(23, tunnel)
    return _any(types.ADDRESS, _len(1, body))


@pytest.mark.parametrize(
    ("tunnel", "expected"),
    [
        pytest.param(None, None, id="absent"),
        pytest.param(
            _int(1, 1) + _int(2, 15088),
            workload.ApplicationTunnel(workload.AppTunnelProtocol.PROXY, 15088),
            id="proxy-with-port",
        ),
        pytest.param(
            _int(1, 1),
            workload.ApplicationTunnel(workload.AppTunnelProtocol.PROXY, None),
            id="proxy-same-port",
        ),
        pytest.param(
            b"",
            workload.ApplicationTunnel(workload.AppTunnelProtocol.NONE, None),
            id="present-but-empty",
        ),
        pytest.param(
            _int(2, 9000),
            workload.ApplicationTunnel(workload.AppTunnelProtocol.NONE, 9000),
            id="none-with-port",
        ),
    ],
)
def test_decodes_application_tunnel_from_field_numbers(
    tunnel: bytes | None, expected: workload.ApplicationTunnel | None
) -> None:
    decoded = resources.decode_address(_wl_with_tunnel(tunnel))
    assert isinstance(decoded, workload.Workload)
    assert decoded.application_tunnel == expected


@pytest.mark.parametrize(
    "tunnel",
    [
        None,
        workload.ApplicationTunnel(workload.AppTunnelProtocol.PROXY, 15088),
        workload.ApplicationTunnel(workload.AppTunnelProtocol.PROXY),
        workload.ApplicationTunnel(workload.AppTunnelProtocol.NONE),
    ],
    ids=["absent", "proxy-15088", "proxy-same-port", "none-same-port"],
)
def test_application_tunnel_round_trip(tunnel: workload.ApplicationTunnel | None) -> None:
    wl = workload.Workload(
        uid=ids.pod_uid("shop", "a"),
        name="a",
        namespace="shop",
        addresses=(V4,),
        node="n1",
        application_tunnel=tunnel,
    )
    pb = resources.workload_to_proto(wl)
    # An absent tunnel stays absent on the wire; a present one is sent even when all-default.
    assert pb.HasField("application_tunnel") is (tunnel is not None)
    assert resources.decode_address(resources.address_resource(wl)[1]) == wl


def test_encoded_application_tunnel_uses_istio_field_numbers() -> None:
    wl = workload.Workload(
        uid=ids.WorkloadUid("c//Pod/shop/a"),
        name="a",
        namespace="shop",
        addresses=(),
        node="",
        cluster_id="",
        application_tunnel=workload.ApplicationTunnel(workload.AppTunnelProtocol.PROXY, 15088),
    )
    serialized = resources.workload_to_proto(wl).SerializeToString(deterministic=True)
    assert _len(23, _int(1, 1) + _int(2, 15088)) in serialized
    assert 23 in _field_numbers(serialized)


@pytest.mark.parametrize(
    ("tunnel", "field"),
    [
        pytest.param(_int(1, 1) + _int(2, 70000), "application_tunnel.port", id="port-too-big"),
        pytest.param(_int(1, 2) + _int(2, 15088), "application_tunnel.protocol", id="protocol-2"),
    ],
)
def test_invalid_application_tunnel_names_the_field(tunnel: bytes, field: str) -> None:
    with pytest.raises(resources.ResourceError) as err:
        resources.decode_address(_wl_with_tunnel(tunnel))
    assert err.value.field == field


def test_policy_port_zero_is_accepted_and_matches_no_connection() -> None:
    """ztunnel accepts port 0 in a policy (Istio's validation allows it); it matches nothing,
    so refusing it would NACK a whole valid policy."""
    match = authorization_pb2.Match(destination_ports=[0])
    policy = resources.decode_authorization(_pol(match))
    assert policy.rules[0].clauses[0].matches[0].destination_ports == (0,)


def test_labels_travel_as_an_extension_and_unknown_extensions_are_skipped() -> None:
    pb = resources.workload_to_proto(_full_workload())
    [labels_extension] = pb.extensions
    assert labels_extension.name == resources.LABELS_EXTENSION
    pb.extensions.add(name="example.com/unknown")  # another producer's: ignored, as ztunnel does
    assert resources.workload_from_proto(pb).labels == (("app", "web"), ("version", "v2"))
    assert resources.workload_from_proto(pb).has_labels([("version", "v2")])
    assert not resources.workload_from_proto(pb).has_labels([("version", "v1")])


def test_labels_that_are_not_strings_are_refused_naming_the_field() -> None:
    pb = resources.workload_to_proto(_full_workload())
    bad = struct_pb2.Struct()
    bad.update({"replicas": 3})
    pb.extensions[0].config.Pack(bad)
    with pytest.raises(resources.ResourceError, match=r"extensions\[0\]\.config\['replicas'\]"):
        resources.workload_from_proto(pb)


# --- waypoints (GatewayAddress: hostname = 1 {namespace = 1, hostname = 2}, address = 2
#     {network = 1, address = 2}, hbone_mtls_port = 3; Service field 7, Workload field 8) ---

_WAYPOINT_HOST = "waypoint.shop.svc.cluster.local"
_SVC_HEAD = _str(1, "web") + _str(2, "shop") + _str(3, "web.shop.svc.cluster.local")
_WL_HEAD = _str(20, "c//Pod/shop/a") + _str(1, "a") + _str(2, "shop")


def _svc_with_waypoint(gateway: bytes) -> any_pb2.Any:
    return _any(types.ADDRESS, _len(2, _SVC_HEAD + _len(7, gateway)))


def _wl_with_waypoint(gateway: bytes) -> any_pb2.Any:
    return _any(types.ADDRESS, _len(1, _WL_HEAD + _len(8, gateway)))


@pytest.mark.parametrize(
    ("gateway", "expected"),
    [
        pytest.param(
            _len(1, _str(1, "shop") + _str(2, _WAYPOINT_HOST)) + _int(3, 15008),
            workload.GatewayAddress(hostname=("shop", _WAYPOINT_HOST), hbone_mtls_port=15008),
            id="hostname",
        ),
        pytest.param(
            _len(2, _str(1, "net-1") + _len(2, V4.packed)) + _int(3, 15009),
            workload.GatewayAddress(address=("net-1", V4), hbone_mtls_port=15009),
            id="address",
        ),
        pytest.param(
            _len(2, _len(2, V6.packed)),
            workload.GatewayAddress(address=("", V6), hbone_mtls_port=15008),
            id="unset-port-means-15008",
        ),
    ],
)
def test_decodes_waypoint_built_from_field_numbers(
    gateway: bytes, expected: workload.GatewayAddress
) -> None:
    service = resources.decode_address(_svc_with_waypoint(gateway))
    assert isinstance(service, workload.Service)
    assert service.waypoint == expected
    wl = resources.decode_address(_wl_with_waypoint(gateway))
    assert isinstance(wl, workload.Workload)
    assert wl.waypoint == expected


def test_encoded_waypoint_uses_istio_field_numbers() -> None:
    gateway = workload.GatewayAddress(hostname=("shop", _WAYPOINT_HOST))
    svc = workload.Service("web", "shop", "web.shop.svc.cluster.local", (), (), waypoint=gateway)
    serialized = resources.service_to_proto(svc).SerializeToString(deterministic=True)
    expected = _len(7, _len(1, _str(1, "shop") + _str(2, _WAYPOINT_HOST)) + _int(3, 15008))
    assert serialized == _SVC_HEAD + expected
    wl = workload.Workload(
        uid=ids.WorkloadUid("c//Pod/shop/a"),
        name="a",
        namespace="shop",
        addresses=(),
        node="",
        cluster_id="",
        waypoint=gateway,
    )
    serialized = resources.workload_to_proto(wl).SerializeToString(deterministic=True)
    assert _len(8, _len(1, _str(1, "shop") + _str(2, _WAYPOINT_HOST)) + _int(3, 15008)) in (
        serialized
    )


@pytest.mark.parametrize(
    "gateway",
    [
        None,
        workload.GatewayAddress(hostname=("shop", _WAYPOINT_HOST)),
        workload.GatewayAddress(address=("", V4), hbone_mtls_port=15009),
    ],
    ids=["absent", "hostname", "address"],
)
def test_waypoint_round_trip(gateway: workload.GatewayAddress | None) -> None:
    svc = workload.Service("web", "shop", "web.shop.svc.cluster.local", (), (), waypoint=gateway)
    assert resources.service_to_proto(svc).HasField("waypoint") is (gateway is not None)
    assert resources.decode_address(resources.address_resource(svc)[1]) == svc
    wl = workload.Workload(
        uid=ids.pod_uid("shop", "a"),
        name="a",
        namespace="shop",
        addresses=(V4,),
        node="n1",
        waypoint=gateway,
    )
    assert resources.workload_to_proto(wl).HasField("waypoint") is (gateway is not None)
    assert resources.decode_address(resources.address_resource(wl)[1]) == wl


@pytest.mark.parametrize(
    ("gateway", "field"),
    [
        pytest.param(b"", "waypoint.destination", id="present-but-empty"),
        pytest.param(_int(3, 15008), "waypoint.destination", id="port-only"),
        pytest.param(
            _len(1, _str(2, _WAYPOINT_HOST)), "waypoint.hostname.namespace", id="no-namespace"
        ),
        pytest.param(_len(1, _str(1, "shop")), "waypoint.hostname.hostname", id="no-hostname"),
        pytest.param(
            _len(2, _len(2, b"\x0a\x00\x00")), "waypoint.address.address", id="3-byte-address"
        ),
        pytest.param(_len(2, b""), "waypoint.address.address", id="empty-address"),
        pytest.param(
            _len(2, _len(2, V4.packed)) + _int(3, 70000),
            "waypoint.hbone_mtls_port",
            id="port-too-big",
        ),
    ],
)
def test_invalid_waypoint_names_the_field(gateway: bytes, field: str) -> None:
    for packed in (_svc_with_waypoint(gateway), _wl_with_waypoint(gateway)):
        with pytest.raises(resources.ResourceError) as err:
            resources.decode_address(packed)
        assert err.value.field == field


@pytest.mark.parametrize(
    ("gateway", "text"),
    [
        pytest.param(
            workload.GatewayAddress(hostname=("shop", _WAYPOINT_HOST)),
            "shop/waypoint (waypoint.shop.svc.cluster.local)",
            id="hostname",
        ),
        pytest.param(workload.GatewayAddress(address=("", V4)), "10.0.0.1", id="address"),
        pytest.param(
            workload.GatewayAddress(address=("net-1", V6)),
            "fd00::1 on network 'net-1'",
            id="address-on-a-network",
        ),
    ],
)
def test_waypoint_text_names_it_for_messages(gateway: workload.GatewayAddress, text: str) -> None:
    assert str(gateway) == text


@pytest.mark.parametrize(
    "fields",
    [{}, {"hostname": ("shop", _WAYPOINT_HOST), "address": ("", V4)}],
    ids=["neither", "both"],
)
def test_waypoint_names_exactly_one_destination(fields: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        workload.GatewayAddress(**fields)  # type: ignore[arg-type]


# --- DNS endpoints (ServiceEntry) ---


def test_a_dns_endpoint_travels_as_istios_hostname_field() -> None:
    wl = dataclasses.replace(_full_workload(), addresses=(), hostname="api.example.com")
    pb = resources.workload_to_proto(wl)
    assert pb.hostname == "api.example.com"
    # Field 21 of istio.workload.Workload.
    assert workload_pb2.Workload.DESCRIPTOR.fields_by_name["hostname"].number == 21
    name, packed = resources.address_resource(wl)
    assert resources.decode_address(packed, name=name) == wl


@pytest.mark.parametrize("hostname", ["bad host", "-x.example", "a..b", "x" * 254, "ex_ample.com"])
def test_a_hostname_that_is_not_a_dns_name_is_refused(hostname: str) -> None:
    pb = resources.workload_to_proto(_full_workload())
    pb.hostname = hostname
    with pytest.raises(resources.ResourceError, match="hostname: not a DNS name"):
        resources.workload_from_proto(pb)
