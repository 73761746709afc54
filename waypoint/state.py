"""What a waypoint serves from, kept from its two xDS subscriptions: `Address` (services and
the workloads behind them) and this mesh's traffic objects (VirtualService, DestinationRule,
HTTPRoute, AuthorizationPolicy bound by targetRefs). It is every seam the engine reads
(`engine.RouteTables`, `exchange.Endpoints`, `engine.DestinationRules`, `engine.Policies`,
`engine.Workloads`) and the listener's `tunnel.ServiceResolver`.

Updates are all or nothing per xDS response: everything is decoded and translated off to the
side first; any error rejects the whole batch (the NACK names each object and field) and the
state stays as it was.

Lookups follow Istio's waypoint: a service without a VirtualService or HTTPRoute gets a default
route to itself; several route objects for one host are taken in name order, the first that
names the host wins; a destination's subset selects the endpoints whose pod labels match the
DestinationRule's subset labels, and an unknown subset has no endpoints.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from google.protobuf import any_pb2

from meshcore import istio_labels
from meshcore.identity import spiffe
from meshcore.model import ids, workload
from meshcore.policy import errors as policy_errors
from meshcore.policy import spec as policy_spec
from meshcore.traffic import destinations, httproutes, routes
from meshcore.xds import resources as xds_resources
from meshcore.xds import traffic, types
from waypoint import telemetry, upstream

_SERVICE_KINDS = ("Service", "ServiceEntry")
DEFAULT_SAMPLE_PERCENT = 1.0  # Istio's meshConfig defaultConfig.tracing.sampling
_GATEWAY_KINDS = ("Gateway",)


class WaypointState:
    def __init__(self, *, namespace: str, name: str, domain: str = routes.DEFAULT_DOMAIN) -> None:
        """`namespace`/`name`: the waypoint's own Gateway (policies may target it)."""
        self._namespace = namespace
        self._name = name
        self._domain = domain
        self._workloads: dict[str, workload.Workload] = {}
        self._services: dict[str, workload.Service] = {}
        self._routes: dict[str, routes.RouteTable] = {}
        self._rules: dict[str, destinations.DestinationRule] = {}
        # Each bound policy with its targetRefs (the spec keeps only which field holds them).
        self._policies: dict[str, tuple[policy_spec.PolicySpec, list[dict[str, Any]]]] = {}
        self._telemetries: dict[str, dict[str, Any]] = {}
        self._reindex()
        self._reindex_traffic()

    # -- xDS (meshcore.xds.client.ResourceHandler) --

    def apply(
        self, type_url: str, updated: Sequence[tuple[str, any_pb2.Any]], removed: Sequence[str]
    ) -> Sequence[str]:
        if type_url == types.ADDRESS:
            return self._apply_addresses(updated, removed)
        if type_url == types.TRAFFIC:
            return self._apply_traffic(updated, removed)
        return [f"type {type_url} is not served by this waypoint"]

    def _apply_addresses(
        self, updated: Sequence[tuple[str, any_pb2.Any]], removed: Sequence[str]
    ) -> list[str]:
        decoded: list[workload.Workload | workload.Service] = []
        errors = []
        for name, resource in updated:
            try:
                decoded.append(xds_resources.decode_address(resource, name=name))
            except xds_resources.ResourceError as exc:
                errors.append(str(exc))
        if errors:
            return errors
        for name in removed:
            self._workloads.pop(name, None)
            self._services.pop(name, None)
        for obj in decoded:
            if isinstance(obj, workload.Workload):
                self._workloads[obj.uid] = obj
            else:
                self._services[obj.key] = obj
        self._reindex()
        return []

    def _apply_traffic(
        self, updated: Sequence[tuple[str, any_pb2.Any]], removed: Sequence[str]
    ) -> list[str]:
        translated: list[tuple[str, Any]] = []
        errors = []
        for name, resource in updated:
            try:
                obj = traffic.decode_traffic_object(name, resource)
                translated.append((name, self._translate(obj)))
            except (
                xds_resources.ResourceError,
                routes.TrafficConfigError,
                policy_errors.PolicyError,
            ) as exc:
                errors.append(str(exc))  # each error names its object
        if errors:
            return errors
        for name in removed:
            for held in (self._routes, self._rules, self._policies, self._telemetries):
                held.pop(name, None)
        for name, value in translated:
            if isinstance(value, dict):
                self._telemetries[name] = value
            elif isinstance(value, routes.RouteTable):
                self._routes[name] = value
            elif isinstance(value, destinations.DestinationRule):
                self._rules[name] = value
            else:
                self._policies[name] = value
        self._reindex_traffic()
        return []

    def _translate(
        self, obj: dict[str, Any]
    ) -> (
        routes.RouteTable
        | destinations.DestinationRule
        | tuple[policy_spec.PolicySpec, list[dict[str, Any]]]
        | dict[str, Any]
    ):
        kind = obj["kind"]
        if kind == "Telemetry":
            return obj  # read as it is: only its tracing sampling matters here
        if kind == "VirtualService":
            return routes.build_route_table(obj, self._domain)
        if kind == "HTTPRoute":
            return httproutes.build_route_table(obj, self._domain)
        if kind == "DestinationRule":
            return destinations.build_destination_rule(obj, self._domain)
        spec = obj.get("spec") or {}
        refs = [r for r in (spec.get("targetRefs") or [spec.get("targetRef")]) if r]
        return policy_spec.parse_authorization_policy(obj), refs

    def _reindex(self) -> None:
        """Address lookups, rebuilt on every Address batch (requests only read them)."""
        self._by_host = {svc.hostname: svc for svc in self._services.values()}
        self._default_tables: dict[tuple[str, int], routes.RouteTable] = {}
        self._vips: dict[tuple[str, int], str] = {
            (str(address), mapping.service_port): svc.hostname
            for svc in self._services.values()
            for address in svc.addresses
            for mapping in svc.ports
        }
        self._members: dict[ids.ServiceKey, list[workload.Workload]] = {}
        self._by_address: dict[str, workload.Workload] = {}
        # The addresses of the pods that name this waypoint as their own.
        me = (self._namespace, f"{self._name}.{self._namespace}.svc.{self._domain}")
        self._own_workloads: set[str] = set()
        for wl in sorted(self._workloads.values(), key=lambda w: w.uid):
            for binding in wl.services:
                self._members.setdefault(binding.service, []).append(wl)
            for address in wl.addresses:
                self._by_address[str(address)] = wl
                if wl.waypoint is not None and wl.waypoint.hostname == me:
                    self._own_workloads.add(str(address))
            if wl.hostname:
                self._by_address[wl.hostname] = wl  # a DNS endpoint is dialled by its name

    def _reindex_traffic(self) -> None:
        """Traffic lookups, rebuilt on every traffic batch; name order decides between objects
        that claim the same host."""
        self._table_by_host: dict[str, routes.RouteTable] = {}
        for name in sorted(self._routes):
            for host in self._routes[name].hosts:
                self._table_by_host.setdefault(host, self._routes[name])
        self._rule_by_host: dict[str, destinations.DestinationRule] = {}
        self._wildcard_rules: list[destinations.DestinationRule] = []
        for name in sorted(self._rules):
            rule = self._rules[name]
            if rule.host.startswith("*"):
                self._wildcard_rules.append(rule)
            else:
                self._rule_by_host.setdefault(rule.host, rule)
        # (target kind, namespace, name) -> the policies bound to it, as (object name, spec).
        self._bound: dict[tuple[str, str, str], list[tuple[str, policy_spec.PolicySpec]]] = {}
        for name in sorted(self._policies):
            policy, refs = self._policies[name]
            targets = set()
            for ref in refs:
                kind = ref.get("kind", "")
                if kind in _GATEWAY_KINDS:
                    targets.add(("gateway", policy.ref.namespace, ref.get("name", "")))
                elif kind in _SERVICE_KINDS:
                    targets.add(("service", policy.ref.namespace, ref.get("name", "")))
            for target in targets:
                self._bound.setdefault(target, []).append((name, policy))

    # -- tunnel.ServiceResolver --

    def resolve(self, address: str, port: int) -> str | None:
        """The service a VIP:port names; or, for a pod whose own ``istio.io/use-waypoint`` names
        this waypoint, the pod's address itself (its traffic is routed to that very pod)."""
        normalized = str(ipaddress.ip_address(address))
        service = self._vips.get((normalized, port))
        if service is not None:
            return service
        return normalized if normalized in self._own_workloads else None

    # -- engine.RouteTables --

    def find_route_table(self, host: str, port: int) -> routes.RouteTable | None:
        table = self._table_by_host.get(host)
        if table is not None:
            return table
        if host not in self._by_host and host not in self._own_workloads:
            return None
        table = self._default_tables.get((host, port))
        if table is None:
            table = self._default_tables[host, port] = routes.RouteTable(
                namespace="",
                name="default",
                hosts=(host,),
                routes=(
                    routes.HttpRoute(
                        name="default",
                        matches=(),
                        destinations=(routes.Destination(host, None, port, routes.FULL_WEIGHT),),
                    ),
                ),
            )
        return table

    # -- exchange.Endpoints --

    def find_endpoints(
        self, host: str, subset: str | None, port: int | None
    ) -> Sequence[upstream.Endpoint]:
        service = self._by_host.get(host)
        if service is None and host in self._own_workloads and port is not None:
            wl = self._by_address[host]  # a pod's own traffic: to that pod, at the port asked
            return [(host, port)] if wl.is_healthy and subset is None else ()
        if service is None or port is None or service.port(port) is None:
            return ()
        selector: tuple[tuple[str, str], ...] = ()
        if subset is not None:
            rule = self.find_destination_rule(host)
            found = rule.subset(subset) if rule is not None else None
            if found is None:
                return ()  # an unknown subset has no endpoints
            selector = found.labels
        endpoints = []
        for wl in self._members.get(service.key, ()):
            binding = wl.binding(service.key)
            address = str(wl.addresses[0]) if wl.addresses else wl.hostname
            if not wl.is_healthy or not address or binding is None:
                continue
            if selector and not wl.has_labels(selector):
                continue
            target = binding.target_port(port) or port
            endpoints.append((address, target))
        return endpoints

    # -- engine.DestinationRules --

    def find_destination_rule(self, host: str) -> destinations.DestinationRule | None:
        found = self._rule_by_host.get(host)
        if found is not None:
            return found
        for rule in self._wildcard_rules:
            if host.endswith(rule.host[1:]):
                return rule
        return None

    # -- engine.Policies --

    def find_policies(self, host: str, port: int) -> Sequence[policy_spec.PolicySpec]:
        """Bound to this waypoint's Gateway or to the service `host`, in object-name order."""
        found = dict(self._bound.get(("gateway", self._namespace, self._name), ()))
        service = self._by_host.get(host)
        if service is not None:
            found.update(self._bound.get(("service", service.namespace, service.name), ()))
        return [found[name] for name in sorted(found)]

    # -- tracing --

    def tracing_sample_percent(
        self, root_namespace: str = policy_spec.DEFAULT_ROOT_NAMESPACE
    ) -> float:
        """The sampling percentage Istio's Telemetry gives this waypoint: one bound to its
        Gateway, else its namespace's, else the mesh-wide one (root namespace), else Istio's
        default of 1%. A Telemetry that disables span reporting gives 0."""
        scopes: list[list[dict[str, Any]]] = [[], [], []]
        for name in sorted(self._telemetries):
            obj = self._telemetries[name]
            meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
            namespace = meta.get("namespace")
            refs = [r for r in (spec.get("targetRefs") or [spec.get("targetRef")]) if r]
            if refs:
                if namespace == self._namespace and any(
                    r.get("kind") in _GATEWAY_KINDS and r.get("name") == self._name for r in refs
                ):
                    scopes[0].append(spec)
            elif spec.get("selector"):
                continue  # a workload selector never picks a waypoint here
            elif namespace == self._namespace:
                scopes[1].append(spec)
            elif namespace == root_namespace:
                scopes[2].append(spec)
        for scope in scopes:
            for spec in scope:
                for tracing in spec.get("tracing") or ():
                    if tracing.get("disableSpanReporting"):
                        return 0.0
                    if "randomSamplingPercentage" in tracing:
                        return float(tracing["randomSamplingPercentage"])
        return DEFAULT_SAMPLE_PERCENT

    # -- origin.HboneConnector, origin.MeshConnector --

    def is_in_mesh(self, endpoint: upstream.Endpoint) -> bool:
        """Reached over HBONE: every endpoint but those known not to be in the mesh (a pod
        ztunnel does not capture, a MESH_EXTERNAL ServiceEntry's endpoint), which get plain
        TCP. An unknown endpoint is tried over HBONE, where no identity can match it."""
        wl = self._by_address.get(endpoint[0])
        return wl is None or wl.has_hbone

    def expected_identities(self, endpoint: upstream.Endpoint) -> list[spiffe.SpiffeId]:
        """Who may answer at `endpoint`: its workload's identity; nobody when it is unknown
        (the tunnel then fails its identity check: closed, not open)."""
        wl = self._by_address.get(endpoint[0])
        return [wl.identity] if wl is not None else []

    # -- engine.Workloads --

    def describe_endpoint(self, endpoint: upstream.Endpoint) -> tuple[str, ...]:
        wl = self._by_address.get(endpoint[0])
        if wl is None:
            return telemetry.UNKNOWN_SIDE
        return istio_labels.workload_labels(wl, None)
