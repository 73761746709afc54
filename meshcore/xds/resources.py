"""Model <-> protobuf conversion for the xDS resources (spec 5.2, 5.3). Pure: no I/O, no grpc.

Encoding never fails: the model is already valid. Decoding validates everything the model relies
on (address lengths, enum values, identity parts, port ranges) and raises `ResourceError` naming
the resource and the field path, so a bad resource becomes one line in a NACK instead of a broken
store. Fields the model does not carry (locality, load balancing, weighted waypoints,
extensions...) are ignored on decode, as an older ztunnel ignores fields it does not know.

Defaults follow the proto: an empty `trust_domain` means ``cluster.local`` and an empty
`service_account` means ``default``. Like istiod, the encoder omits the default trust domain.
A waypoint's `hbone_mtls_port` of 0 (unset in proto3) means 15008, the only port istiod writes.
`Workload.services` is a proto map, which has no order: decoded bindings are sorted by key.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from typing import TypeVar

from google.protobuf import any_pb2, empty_pb2, message, struct_pb2

from meshcore import errors
from meshcore.identity import spiffe
from meshcore.model import authorization, ids, workload
from meshcore.proto import authorization_pb2, workload_pb2
from meshcore.xds import types

_TYPE_PREFIX = "type.googleapis.com/"
_M = TypeVar("_M", bound=message.Message)
_E = TypeVar("_E")
_MAX_PORT = 65535
# This mesh's Workload extension carrying the pod's labels (a google.protobuf.Struct of strings).
LABELS_EXTENSION = "ambient-mesh.io/labels"


class ResourceError(errors.MeshError, ValueError):
    """A received resource is invalid; `name` is its xDS name (or "" if unknown), `field` a path."""

    def __init__(self, name: str, field: str, reason: str) -> None:
        super().__init__(f"resource {name!r}: {field}: {reason}")
        self.name = name
        self.field = field
        self.reason = reason


# --- enums: model <-> proto numbers (explicit, so a renumbered model enum cannot leak) ---

_TUNNEL_TO_PB = {
    workload.TunnelProtocol.NONE: workload_pb2.NONE,
    workload.TunnelProtocol.HBONE: workload_pb2.HBONE,
}
_TUNNEL_FROM_PB: dict[int, workload.TunnelProtocol] = {v: k for k, v in _TUNNEL_TO_PB.items()}
_APP_TUNNEL_TO_PB = {
    workload.AppTunnelProtocol.NONE: workload_pb2.ApplicationTunnel.NONE,
    workload.AppTunnelProtocol.PROXY: workload_pb2.ApplicationTunnel.PROXY,
}
_APP_TUNNEL_FROM_PB: dict[int, workload.AppTunnelProtocol] = {
    v: k for k, v in _APP_TUNNEL_TO_PB.items()
}
_STATUS_TO_PB = {
    workload.WorkloadStatus.HEALTHY: workload_pb2.HEALTHY,
    workload.WorkloadStatus.UNHEALTHY: workload_pb2.UNHEALTHY,
}
_STATUS_FROM_PB: dict[int, workload.WorkloadStatus] = {v: k for k, v in _STATUS_TO_PB.items()}
_TYPE_TO_PB = {
    workload.WorkloadType.DEPLOYMENT: workload_pb2.DEPLOYMENT,
    workload.WorkloadType.CRONJOB: workload_pb2.CRONJOB,
    workload.WorkloadType.POD: workload_pb2.POD,
    workload.WorkloadType.JOB: workload_pb2.JOB,
}
_TYPE_FROM_PB: dict[int, workload.WorkloadType] = {v: k for k, v in _TYPE_TO_PB.items()}
_SCOPE_TO_PB = {
    authorization.Scope.GLOBAL: authorization_pb2.GLOBAL,
    authorization.Scope.NAMESPACE: authorization_pb2.NAMESPACE,
    authorization.Scope.WORKLOAD_SELECTOR: authorization_pb2.WORKLOAD_SELECTOR,
}
_SCOPE_FROM_PB: dict[int, authorization.Scope] = {v: k for k, v in _SCOPE_TO_PB.items()}
_ACTION_TO_PB = {
    authorization.Action.ALLOW: authorization_pb2.ALLOW,
    authorization.Action.DENY: authorization_pb2.DENY,
}
_ACTION_FROM_PB: dict[int, authorization.Action] = {v: k for k, v in _ACTION_TO_PB.items()}

# Match fields by element type; the model and the proto use the same field names.
_STRING_FIELDS = ("namespaces", "not_namespaces", "principals", "not_principals")
_IP_FIELDS = ("source_ips", "not_source_ips", "destination_ips", "not_destination_ips")
_PORT_FIELDS = ("destination_ports", "not_destination_ports")
_SA_FIELDS = ("service_accounts", "not_service_accounts")


# --- workloads ---


def workload_to_proto(wl: workload.Workload) -> workload_pb2.Workload:
    pb = workload_pb2.Workload(
        uid=wl.uid,
        name=wl.name,
        namespace=wl.namespace,
        addresses=[address.packed for address in wl.addresses],
        hostname=wl.hostname,
        network=wl.network,
        tunnel_protocol=_TUNNEL_TO_PB[wl.tunnel_protocol],
        trust_domain="" if wl.trust_domain == spiffe.DEFAULT_TRUST_DOMAIN else wl.trust_domain,
        service_account=wl.service_account,
        node=wl.node,
        canonical_name=wl.canonical_name,
        canonical_revision=wl.canonical_revision,
        workload_type=_TYPE_TO_PB[wl.workload_type],
        workload_name=wl.workload_name,
        authorization_policies=list(wl.authorization_policies),
        status=_STATUS_TO_PB[wl.status],
        cluster_id=wl.cluster_id,
    )
    if wl.application_tunnel is not None:
        pb.application_tunnel.SetInParent()  # present even when every field is a default
        pb.application_tunnel.protocol = _APP_TUNNEL_TO_PB[wl.application_tunnel.protocol]
        pb.application_tunnel.port = wl.application_tunnel.port or 0  # 0: the client's port
    if wl.waypoint is not None:
        pb.waypoint.CopyFrom(_gateway_to_proto(wl.waypoint))
    if wl.labels:
        # Istio's Workload has no labels; they travel as an extension, which ztunnels that
        # do not know it ignore.
        fields = struct_pb2.Struct()
        fields.update(dict(wl.labels))
        config = any_pb2.Any()
        config.Pack(fields)
        pb.extensions.add(name=LABELS_EXTENSION, config=config)
    for binding in wl.services:
        port_list = pb.services[binding.service]
        for mapping in binding.ports:
            port_list.ports.add(service_port=mapping.service_port, target_port=mapping.target_port)
    return pb


def workload_from_proto(pb: workload_pb2.Workload) -> workload.Workload:
    name = pb.uid
    if not pb.uid:
        raise ResourceError(pb.name, "uid", "required")
    trust_domain = pb.trust_domain or spiffe.DEFAULT_TRUST_DOMAIN
    service_account = pb.service_account or spiffe.DEFAULT_SERVICE_ACCOUNT
    _check_identity(name, pb.namespace, service_account, trust_domain)
    bindings = []
    for key in sorted(pb.services):
        if "/" not in key:
            raise ResourceError(name, f"services[{key!r}]", "key must be namespace/hostname")
        path = f"services[{key!r}].ports"
        ports = tuple(
            workload.PortMapping(
                _port(name, f"{path}[{i}].service_port", p.service_port, zero=False),
                _port(name, f"{path}[{i}].target_port", p.target_port, zero=True),
            )
            for i, p in enumerate(pb.services[key].ports)
        )
        bindings.append(workload.ServiceBinding(ids.ServiceKey(key), ports))
    return workload.Workload(
        uid=ids.WorkloadUid(pb.uid),
        name=pb.name,
        namespace=pb.namespace,
        addresses=tuple(
            _ip_address(name, f"addresses[{i}]", raw) for i, raw in enumerate(pb.addresses)
        ),
        node=pb.node,
        service_account=service_account,
        trust_domain=trust_domain,
        tunnel_protocol=_enum(name, "tunnel_protocol", pb.tunnel_protocol, _TUNNEL_FROM_PB),
        canonical_name=pb.canonical_name,
        canonical_revision=pb.canonical_revision,
        workload_type=_enum(name, "workload_type", pb.workload_type, _TYPE_FROM_PB),
        workload_name=pb.workload_name,
        services=tuple(bindings),
        authorization_policies=tuple(ids.PolicyKey(k) for k in pb.authorization_policies),
        status=_enum(name, "status", pb.status, _STATUS_FROM_PB),
        cluster_id=pb.cluster_id,
        network=pb.network,
        application_tunnel=_application_tunnel(name, pb),
        waypoint=_gateway_from_proto(name, "waypoint", pb),
        labels=_labels(name, pb),
        hostname=_hostname(name, pb.hostname),
    )


# A DNS name (RFC 1123): what a resolver can be asked for; anything else is refused here.
_DNS_NAME = re.compile(
    r"^(?=.{1,253}$)([a-zA-Z0-9]([-a-zA-Z0-9]{0,61}[a-zA-Z0-9])?)(\.[a-zA-Z0-9]([-a-zA-Z0-9]{0,61}[a-zA-Z0-9])?)*\.?$"
)


def _hostname(name: str, raw: str) -> str:
    if raw and not _DNS_NAME.match(raw):
        raise ResourceError(name, "hostname", f"not a DNS name: {raw!r}")
    return raw


def _labels(name: str, pb: workload_pb2.Workload) -> tuple[tuple[str, str], ...]:
    for i, extension in enumerate(pb.extensions):
        if extension.name != LABELS_EXTENSION:
            continue  # extensions this mesh does not know are skipped, as ztunnel skips them
        fields = struct_pb2.Struct()
        if not extension.config.Unpack(fields):
            raise ResourceError(name, f"extensions[{i}].config", "labels must be a Struct")
        labels = []
        for key, value in fields.fields.items():
            if value.WhichOneof("kind") != "string_value":
                raise ResourceError(name, f"extensions[{i}].config[{key!r}]", "not a string")
            labels.append((key, value.string_value))
        return tuple(sorted(labels))
    return ()


def _application_tunnel(name: str, pb: workload_pb2.Workload) -> workload.ApplicationTunnel | None:
    # A message field: absent (no tunnel) is told apart from present with default values.
    if not pb.HasField("application_tunnel"):
        return None
    tunnel = pb.application_tunnel
    port = _port(name, "application_tunnel.port", tunnel.port, zero=True)
    return workload.ApplicationTunnel(
        protocol=_enum(name, "application_tunnel.protocol", tunnel.protocol, _APP_TUNNEL_FROM_PB),
        port=port or None,
    )


# --- services ---


def service_to_proto(svc: workload.Service) -> workload_pb2.Service:
    pb = workload_pb2.Service(
        name=svc.name,
        namespace=svc.namespace,
        hostname=svc.hostname,
        addresses=[workload_pb2.NetworkAddress(address=a.packed) for a in svc.addresses],
        ports=[
            workload_pb2.Port(service_port=p.service_port, target_port=p.target_port)
            for p in svc.ports
        ],
        subject_alt_names=list(svc.subject_alt_names),
    )
    if svc.waypoint is not None:
        pb.waypoint.CopyFrom(_gateway_to_proto(svc.waypoint))
    return pb


def service_from_proto(pb: workload_pb2.Service) -> workload.Service:
    name = f"{pb.namespace}/{pb.hostname}"
    if not pb.namespace:
        raise ResourceError(name, "namespace", "required")
    if not pb.hostname:
        raise ResourceError(name, "hostname", "required")
    return workload.Service(
        name=pb.name,
        namespace=pb.namespace,
        hostname=pb.hostname,
        addresses=tuple(
            _ip_address(name, f"addresses[{i}].address", a.address)
            for i, a in enumerate(pb.addresses)
        ),
        ports=tuple(
            workload.PortMapping(
                _port(name, f"ports[{i}].service_port", p.service_port, zero=False),
                # 0: a named target port, resolved per workload in Workload.services.
                _port(name, f"ports[{i}].target_port", p.target_port, zero=True),
            )
            for i, p in enumerate(pb.ports)
        ),
        subject_alt_names=tuple(pb.subject_alt_names),
        waypoint=_gateway_from_proto(name, "waypoint", pb),
    )


# --- waypoints (GatewayAddress) ---


def _gateway_to_proto(gateway: workload.GatewayAddress) -> workload_pb2.GatewayAddress:
    pb = workload_pb2.GatewayAddress(hbone_mtls_port=gateway.hbone_mtls_port)
    if gateway.hostname is not None:
        namespace, hostname = gateway.hostname
        pb.hostname.namespace = namespace
        pb.hostname.hostname = hostname
    else:
        assert gateway.address is not None
        network, address = gateway.address
        pb.address.network = network
        pb.address.address = address.packed
    return pb


def _gateway_from_proto(
    name: str, field: str, pb: workload_pb2.Workload | workload_pb2.Service
) -> workload.GatewayAddress | None:
    # A message field: absent means no waypoint; present, it must name where the waypoint is,
    # or traffic that has to go through it would have nowhere to go.
    if not pb.HasField("waypoint"):
        return None
    gateway = pb.waypoint
    port = _port(name, f"{field}.hbone_mtls_port", gateway.hbone_mtls_port, zero=True)
    port = port or workload.HBONE_MTLS_PORT
    match gateway.WhichOneof("destination"):
        case "hostname":
            if not gateway.hostname.namespace:
                raise ResourceError(name, f"{field}.hostname.namespace", "required")
            if not gateway.hostname.hostname:
                raise ResourceError(name, f"{field}.hostname.hostname", "required")
            return workload.GatewayAddress(
                hostname=(gateway.hostname.namespace, gateway.hostname.hostname),
                hbone_mtls_port=port,
            )
        case "address":
            address = _ip_address(name, f"{field}.address.address", gateway.address.address)
            return workload.GatewayAddress(
                address=(gateway.address.network, address), hbone_mtls_port=port
            )
    raise ResourceError(name, f"{field}.destination", "neither hostname nor address set")


# --- authorization ---


def authorization_to_proto(policy: authorization.Authorization) -> authorization_pb2.Authorization:
    return authorization_pb2.Authorization(
        name=policy.name,
        namespace=policy.namespace,
        scope=_SCOPE_TO_PB[policy.scope],
        action=_ACTION_TO_PB[policy.action],
        rules=[
            authorization_pb2.Rule(
                clauses=[
                    authorization_pb2.Clause(matches=[_match_to_proto(m) for m in clause.matches])
                    for clause in rule.clauses
                ]
            )
            for rule in policy.rules
        ],
        dry_run=policy.dry_run,
    )


def authorization_from_proto(pb: authorization_pb2.Authorization) -> authorization.Authorization:
    name = f"{pb.namespace}/{pb.name}"
    if not pb.name:
        raise ResourceError(name, "name", "required")
    return authorization.Authorization(
        name=pb.name,
        namespace=pb.namespace,
        scope=_enum(name, "scope", pb.scope, _SCOPE_FROM_PB),
        action=_enum(name, "action", pb.action, _ACTION_FROM_PB),
        rules=tuple(
            authorization.Rule(
                tuple(
                    authorization.Clause(
                        tuple(
                            _match_from_proto(name, f"rules[{r}].clauses[{c}].matches[{m}]", match)
                            for m, match in enumerate(clause.matches)
                        )
                    )
                    for c, clause in enumerate(rule.clauses)
                )
            )
            for r, rule in enumerate(pb.rules)
        ),
        dry_run=pb.dry_run,
    )


def _match_to_proto(match: authorization.Match) -> authorization_pb2.Match:
    pb = authorization_pb2.Match()
    for field in _STRING_FIELDS:
        getattr(pb, field).extend(_string_match_to_proto(s) for s in getattr(match, field))
    for field in _IP_FIELDS:
        getattr(pb, field).extend(
            authorization_pb2.Address(address=n.network_address.packed, length=n.prefixlen)
            for n in getattr(match, field)
        )
    for field in _PORT_FIELDS:
        getattr(pb, field).extend(getattr(match, field))
    for field in _SA_FIELDS:
        getattr(pb, field).extend(
            authorization_pb2.ServiceAccountMatch(
                namespace=sa.namespace, serviceAccount=sa.service_account
            )
            for sa in getattr(match, field)
        )
    return pb


def _match_from_proto(name: str, path: str, pb: authorization_pb2.Match) -> authorization.Match:
    def strings(field: str) -> tuple[authorization.StringMatch, ...]:
        return tuple(
            _string_match_from_proto(name, f"{path}.{field}[{i}]", s)
            for i, s in enumerate(getattr(pb, field))
        )

    def networks(field: str) -> tuple[authorization.IpNetwork, ...]:
        return tuple(
            _ip_network(name, f"{path}.{field}[{i}]", a) for i, a in enumerate(getattr(pb, field))
        )

    def ports(field: str) -> tuple[int, ...]:
        # Port 0 is legal in a policy (ztunnel accepts it; it matches nothing).
        return tuple(
            _port(name, f"{path}.{field}[{i}]", p, zero=True)
            for i, p in enumerate(getattr(pb, field))
        )

    def accounts(field: str) -> tuple[authorization.ServiceAccountMatch, ...]:
        return tuple(
            authorization.ServiceAccountMatch(sa.namespace, sa.serviceAccount)
            for sa in getattr(pb, field)
        )

    return authorization.Match(
        namespaces=strings("namespaces"),
        not_namespaces=strings("not_namespaces"),
        principals=strings("principals"),
        not_principals=strings("not_principals"),
        source_ips=networks("source_ips"),
        not_source_ips=networks("not_source_ips"),
        destination_ips=networks("destination_ips"),
        not_destination_ips=networks("not_destination_ips"),
        destination_ports=ports("destination_ports"),
        not_destination_ports=ports("not_destination_ports"),
        service_accounts=accounts("service_accounts"),
        not_service_accounts=accounts("not_service_accounts"),
    )


def _string_match_to_proto(match: authorization.StringMatch) -> authorization_pb2.StringMatch:
    match match.kind:
        case authorization.MatchKind.EXACT:
            return authorization_pb2.StringMatch(exact=match.value)
        case authorization.MatchKind.PREFIX:
            return authorization_pb2.StringMatch(prefix=match.value)
        case authorization.MatchKind.SUFFIX:
            return authorization_pb2.StringMatch(suffix=match.value)
        case authorization.MatchKind.PRESENCE:
            return authorization_pb2.StringMatch(presence=empty_pb2.Empty())


def _string_match_from_proto(
    name: str, path: str, pb: authorization_pb2.StringMatch
) -> authorization.StringMatch:
    kind = pb.WhichOneof("match_type")
    match kind:
        case "exact":
            return authorization.StringMatch(authorization.MatchKind.EXACT, pb.exact)
        case "prefix":
            return authorization.StringMatch(authorization.MatchKind.PREFIX, pb.prefix)
        case "suffix":
            return authorization.StringMatch(authorization.MatchKind.SUFFIX, pb.suffix)
        case "presence":
            return authorization.StringMatch(authorization.MatchKind.PRESENCE)
    # An unset oneof would silently match nothing or everything depending on the reader: refuse.
    raise ResourceError(name, path, "no match_type set")


# --- xDS resources (name, Any) ---


def address_resource(obj: workload.Workload | workload.Service) -> tuple[str, any_pb2.Any]:
    """The xDS name and packed `istio.workload.Address` of a workload (uid) or service (ns/host)."""
    if isinstance(obj, workload.Workload):
        return obj.uid, _pack(workload_pb2.Address(workload=workload_to_proto(obj)))
    return obj.key, _pack(workload_pb2.Address(service=service_to_proto(obj)))


def decode_address(
    resource: any_pb2.Any, *, name: str = ""
) -> workload.Workload | workload.Service:
    """Unpack an Address; when `name` (the xDS resource name) is given it must match the content."""
    pb = _unpack(resource, types.ADDRESS, name, workload_pb2.Address)
    kind = pb.WhichOneof("type")
    decoded: workload.Workload | workload.Service
    if kind == "workload":
        decoded = workload_from_proto(pb.workload)
        key: str = decoded.uid
    elif kind == "service":
        decoded = service_from_proto(pb.service)
        key = decoded.key
    else:
        raise ResourceError(name, "type", "Address has neither workload nor service")
    _check_name(name, key)
    return decoded


def authorization_resource(policy: authorization.Authorization) -> tuple[str, any_pb2.Any]:
    return policy.key, _pack(authorization_to_proto(policy))


def decode_authorization(resource: any_pb2.Any, *, name: str = "") -> authorization.Authorization:
    pb = _unpack(resource, types.AUTHORIZATION, name, authorization_pb2.Authorization)
    decoded = authorization_from_proto(pb)
    _check_name(name, decoded.key)
    return decoded


def resource_version(resource: any_pb2.Any) -> str:
    """A stable content hash: equal resources get equal versions in every process and restart."""
    digest = hashlib.blake2b(resource.SerializeToString(deterministic=True), digest_size=12)
    return digest.hexdigest()


# --- helpers ---


def _pack(msg: message.Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    # Deterministic bytes make the version hash a function of content only.
    packed.Pack(msg, type_url_prefix=_TYPE_PREFIX, deterministic=True)
    return packed


def _unpack(resource: any_pb2.Any, type_url: str, name: str, cls: type[_M]) -> _M:
    if resource.type_url != type_url:
        raise ResourceError(name, "type_url", f"got {resource.type_url!r}, want {type_url!r}")
    try:
        return cls.FromString(resource.value)
    except message.DecodeError as exc:
        full_name = cls.DESCRIPTOR.full_name
        raise ResourceError(name, "value", f"not a valid {full_name}: {exc}") from exc


def _check_name(name: str, key: str) -> None:
    if name and name != key:
        raise ResourceError(name, "name", f"resource name does not match its content key {key!r}")


def _check_identity(name: str, namespace: str, service_account: str, trust_domain: str) -> None:
    """The parts must form a SPIFFE ID, or `Workload.identity` would raise later, far from here."""
    # One part at a time (the others known-good), so the error names the field at fault.
    for field, parts in (
        ("trust_domain", (trust_domain, "a", "a")),
        ("namespace", ("a", namespace, "a")),
        ("service_account", ("a", "a", service_account)),
    ):
        try:
            spiffe.SpiffeId(*parts)
        except spiffe.InvalidSpiffeIdError as exc:
            raise ResourceError(name, field, exc.reason) from exc


def _ip_address(name: str, path: str, raw: bytes) -> ids.IpAddress:
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw)
    if len(raw) == 16:
        return ipaddress.IPv6Address(raw)
    raise ResourceError(name, path, f"{len(raw)} bytes, want 4 or 16")


def _ip_network(name: str, path: str, pb: authorization_pb2.Address) -> authorization.IpNetwork:
    address = _ip_address(name, f"{path}.address", pb.address)
    if pb.length > address.max_prefixlen:
        raise ResourceError(
            name, f"{path}.length", f"{pb.length} exceeds {address.max_prefixlen} bits"
        )
    # Host bits are masked off, as ztunnel's IpNet containment check does.
    return ipaddress.ip_network((address, pb.length), strict=False)


def _port(name: str, path: str, value: int, *, zero: bool) -> int:
    if value > _MAX_PORT or (value == 0 and not zero):
        raise ResourceError(name, path, f"port {value} out of range")
    return value


def _enum(name: str, field: str, value: int, table: dict[int, _E]) -> _E:
    try:
        return table[value]
    except KeyError:
        raise ResourceError(name, field, f"unsupported value {value}") from None
