"""From source objects to xDS: every store change goes through the translator into the cache.

The feed subscribes first and lists second, so no change can fall between the two; replaying
an object the list already delivered is harmless because translation is state-based. If the
subscription overflows (the translator fell too far behind), the feed rebuilds from a fresh
list and the cache sends connected proxies only the differences.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any

from google.protobuf import any_pb2

from controller.sources.local import store as store_mod
from controller.translate import policies as policy_translate
from controller.translate import translator as translator_mod
from controller.xds import cache as cache_mod
from meshcore import log
from meshcore.kube import objects, resources
from meshcore.model import workload
from meshcore.xds import resources as xds_resources
from meshcore.xds import traffic, types

logger = logging.getLogger("controller.feed")

# The kinds the translator reads, in the order that makes a first sync cheapest: pods last, so
# each is built once, with its services, policy keys and waypoint Gateways already known.
TRANSLATED_KINDS = (
    resources.NAMESPACES,
    resources.GATEWAYS,
    resources.SERVICES,
    resources.SERVICE_ENTRIES,
    policy_translate.AUTHORIZATION_POLICIES,
    policy_translate.PEER_AUTHENTICATIONS,
    resources.PODS,
)
# The kinds waypoints get as they are (`meshcore.xds.traffic`), besides the translated ones.
TRAFFIC_KINDS = (
    resources.VIRTUAL_SERVICES,
    resources.DESTINATION_RULES,
    resources.HTTP_ROUTES,
    resources.TELEMETRIES,
    policy_translate.AUTHORIZATION_POLICIES,
)


class Feed:
    def __init__(
        self,
        object_store: store_mod.ObjectStore,
        make_translator: Callable[[], translator_mod.Translator],
        cache: cache_mod.ResourceCache,
    ) -> None:
        self._store = object_store
        self._make_translator = make_translator
        self.translator = make_translator()
        self._cache = cache
        self.synced = asyncio.Event()

    async def run(self) -> None:
        while True:
            subscription = self._store.subscribe(None, since=self._store.resource_version)
            self._resync()
            self.synced.set()
            async for event in subscription:
                if event.type == objects.ERROR:
                    logger.warning("store subscription overflowed; resyncing")
                    break
                self._apply(event.type, event.object)

    def _resync(self) -> None:
        """Rebuild everything from the store and replace the cache contents in one step."""
        fresh = self._make_translator()
        for rtype in TRANSLATED_KINDS:
            if self._store.registry.find(rtype) is None:
                continue  # a store without Istio's kinds simply has no policies
            for obj in self._store.list(rtype).items:
                fresh.apply(objects.ADDED, obj, kind=rtype.kind)
        self.translator = fresh
        everything = fresh.snapshot()
        # Policies first, as in `_apply`: workloads then list only keys the cache holds.
        self._cache.replace(
            types.AUTHORIZATION,
            dict(xds_resources.authorization_resource(p) for p in everything.policies),
        )
        self._cache.replace(
            types.ADDRESS,
            _addresses(everything.workloads, everything.services),
        )
        self._cache.replace(
            types.TRAFFIC,
            dict(
                traffic.traffic_resource(obj)
                for rtype in TRAFFIC_KINDS
                if self._store.registry.find(rtype) is not None
                for obj in self._store.list(rtype).items
                if traffic.is_for_waypoints(obj)
            ),
        )
        logger.info(
            "controller state synced",
            extra=log.fields(
                workloads=len(everything.workloads),
                services=len(everything.services),
                policies=len(everything.policies),
            ),
        )

    def _apply(self, event_type: str, obj: dict[str, Any]) -> None:
        if obj.get("kind") in traffic.KINDS:
            self._apply_traffic(event_type, obj)
        changes = self.translator.apply(event_type, obj, kind=obj.get("kind"))
        for error in changes.errors:
            logger.warning("object not translated", extra=log.fields(error=str(error)))
        # Policies a workload is about to list go out first, and policies it stopped listing
        # last, so no workload names a policy the cache does not hold (ztunnel skips such a key,
        # which for an ALLOW or DENY policy means enforcing less than configured).
        if changes.policies:
            self._cache.update(
                types.AUTHORIZATION,
                dict(xds_resources.authorization_resource(p) for p in changes.policies),
            )
        if (
            changes.workloads
            or changes.services
            or changes.removed_workloads
            or changes.removed_services
        ):
            self._cache.update(
                types.ADDRESS,
                _addresses(changes.workloads, changes.services),
                [*changes.removed_workloads, *changes.removed_services],
            )
        if changes.removed_policies:
            self._cache.update(types.AUTHORIZATION, {}, list(changes.removed_policies))

    def _apply_traffic(self, event_type: str, obj: dict[str, Any]) -> None:
        """Waypoints get the object as it is now, or its removal (also when an
        AuthorizationPolicy stops being bound by targetRefs)."""
        if event_type != objects.DELETED and traffic.is_for_waypoints(obj):
            self._cache.update(types.TRAFFIC, dict([traffic.traffic_resource(obj)]))
        else:
            name = traffic.resource_name(
                str(obj.get("kind")), objects.namespace(obj), objects.name(obj)
            )
            self._cache.update(types.TRAFFIC, {}, [name])


def _addresses(
    workloads: Iterable[workload.Workload], services: Iterable[workload.Service]
) -> dict[str, any_pb2.Any]:
    """Address resources (workloads and services share the one xDS type), keyed by name."""
    resources_by_name = dict(map(xds_resources.address_resource, workloads))
    resources_by_name.update(map(xds_resources.address_resource, services))
    return resources_by_name
