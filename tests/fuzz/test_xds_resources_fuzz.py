"""Arbitrary resources into the xDS decoders: the only exception allowed out is ResourceError."""

from __future__ import annotations

from google.protobuf import any_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from meshcore.proto import authorization_pb2, workload_pb2
from meshcore.xds import resources, types

# Each strategy mixes mostly-valid values with arbitrary ones, so that decoding often gets past
# the first check and the later ones (and the round trip) run too.
_uint32 = st.integers(min_value=0, max_value=2**32 - 1)
_port = st.integers(min_value=1, max_value=65535) | _uint32
_enum = st.integers(min_value=0, max_value=3) | st.integers(min_value=-(2**31), max_value=2**31 - 1)
_text = st.text(max_size=20)
_name = st.sampled_from(["shop", "web", "a.b", "x-1"]) | _text
_raw_address = (
    st.binary(min_size=4, max_size=4) | st.binary(min_size=16, max_size=16) | st.binary(max_size=17)
)


def _draw_waypoint(draw: st.DrawFn, gateway: workload_pb2.GatewayAddress) -> None:
    """Fill a present GatewayAddress: a hostname, an address, or neither (invalid)."""
    gateway.SetInParent()
    kind = draw(st.sampled_from(["hostname", "address", None]))
    if kind == "hostname":
        gateway.hostname.namespace = draw(_name)
        gateway.hostname.hostname = draw(_name)
    elif kind == "address":
        gateway.address.network = draw(_text)
        gateway.address.address = draw(_raw_address)
    gateway.hbone_mtls_port = draw(st.just(15008) | _uint32)


def _decode(type_url: str, value: bytes, name: str = "") -> None:
    packed = any_pb2.Any(type_url=type_url, value=value)
    try:
        if type_url == types.AUTHORIZATION:
            resources.decode_authorization(packed, name=name)
        else:
            resources.decode_address(packed, name=name)
    except resources.ResourceError:
        pass


@settings(max_examples=500)
@given(
    type_url=st.sampled_from([types.ADDRESS, types.AUTHORIZATION, types.WORKLOAD, ""]),
    value=st.binary(max_size=256),
    name=_text,
)
def test_arbitrary_bytes(type_url: str, value: bytes, name: str) -> None:
    _decode(type_url, value, name)


@st.composite
def _workload_bytes(draw: st.DrawFn) -> bytes:
    pb = workload_pb2.Workload(
        uid=draw(st.text(min_size=1, max_size=20) | _text),
        name=draw(_text),
        namespace=draw(_name),
        addresses=draw(st.lists(_raw_address, max_size=3)),
        network=draw(_text),
        trust_domain=draw(st.sampled_from(["", "cluster.local", "td.example"]) | _text),
        service_account=draw(st.sampled_from(["", "default"]) | _name),
        node=draw(_text),
        authorization_policies=draw(st.lists(_text, max_size=2)),
    )
    # Enum fields are open in proto3: any int32 can arrive (setattr: the stubs want the enum type).
    for field in ("tunnel_protocol", "workload_type", "status"):
        setattr(pb, field, draw(_enum))
    if draw(st.booleans()):
        pb.application_tunnel.SetInParent()
        pb.application_tunnel.port = draw(_port | st.just(0))
        setattr(pb.application_tunnel, "protocol", draw(_enum))  # noqa: B010 (open enum)
    if draw(st.booleans()):
        _draw_waypoint(draw, pb.waypoint)
    for key in draw(st.lists(st.builds("{}/{}".format, _name, _name) | _text, max_size=2)):
        for _ in range(draw(st.integers(0, 2))):
            pb.services[key].ports.add(service_port=draw(_port), target_port=draw(_port))
    return workload_pb2.Address(workload=pb).SerializeToString()


@st.composite
def _service_bytes(draw: st.DrawFn) -> bytes:
    pb = workload_pb2.Service(
        name=draw(_text),
        namespace=draw(_name),
        hostname=draw(_name),
        addresses=[
            workload_pb2.NetworkAddress(address=a) for a in draw(st.lists(_raw_address, max_size=2))
        ],
        ports=[
            workload_pb2.Port(service_port=draw(_port), target_port=draw(_port))
            for _ in range(draw(st.integers(0, 2)))
        ],
    )
    if draw(st.booleans()):
        _draw_waypoint(draw, pb.waypoint)
    return workload_pb2.Address(service=pb).SerializeToString()


@st.composite
def _string_match(draw: st.DrawFn) -> authorization_pb2.StringMatch:
    kind = draw(st.sampled_from(["exact", "prefix", "suffix", "presence", None]))
    if kind is None:
        return authorization_pb2.StringMatch()
    if kind == "presence":
        match = authorization_pb2.StringMatch()
        match.presence.SetInParent()
        return match
    match = authorization_pb2.StringMatch()
    setattr(match, kind, draw(_text))
    return match


@st.composite
def _authorization_bytes(draw: st.DrawFn) -> bytes:
    match = authorization_pb2.Match(
        principals=draw(st.lists(_string_match(), max_size=2)),
        not_namespaces=draw(st.lists(_string_match(), max_size=2)),
        source_ips=[
            authorization_pb2.Address(
                address=draw(_raw_address), length=draw(st.integers(0, 128) | _uint32)
            )
            for _ in range(draw(st.integers(0, 2)))
        ],
        destination_ports=draw(st.lists(_port, max_size=2)),
        service_accounts=[authorization_pb2.ServiceAccountMatch(namespace=draw(_text))],
    )
    pb = authorization_pb2.Authorization(
        name=draw(_name),
        namespace=draw(_name),
        dry_run=draw(st.booleans()),
    )
    for field in ("scope", "action"):
        setattr(pb, field, draw(_enum))
    pb.rules.add().clauses.add().matches.append(match)
    return pb.SerializeToString()


@settings(max_examples=500)
@given(
    case=st.one_of(
        st.tuples(st.just(types.ADDRESS), _workload_bytes()),
        st.tuples(st.just(types.ADDRESS), _service_bytes()),
        st.tuples(st.just(types.AUTHORIZATION), _authorization_bytes()),
    ),
    flip=st.integers(min_value=0, max_value=10_000),
)
def test_structured_and_mutated(case: tuple[str, bytes], flip: int) -> None:
    type_url, value = case
    _decode(type_url, value)
    if value:
        # One corrupted byte: reaches deeper parser states than random bytes do.
        i = flip % len(value)
        _decode(type_url, value[:i] + bytes([value[i] ^ 0xFF]) + value[i + 1 :])


@settings(max_examples=300)
@given(value=st.one_of(_workload_bytes(), _service_bytes()))
def test_decoded_resource_round_trips(value: bytes) -> None:
    """Whatever decodes re-encodes to something that decodes to the same model value."""
    packed = any_pb2.Any(type_url=types.ADDRESS, value=value)
    try:
        decoded = resources.decode_address(packed)
    except resources.ResourceError:
        return
    assert resources.decode_address(resources.address_resource(decoded)[1]) == decoded
