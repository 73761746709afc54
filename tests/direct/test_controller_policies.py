"""Policies from the object store to a ztunnel's xDS client, in process: the store, the Feed with
its Translator, the delta xDS server on a Unix socket, and a real DeltaXdsClient decoding what
arrives. A policy change must reach the client as a delta: the policy, and the workloads whose
keys changed, nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from google.protobuf import any_pb2

from controller import feed as feed_mod
from controller.sources.local import kinds
from controller.sources.local import store as store_mod
from controller.translate import policies as policy_translate
from controller.translate import translator as translator_mod
from controller.xds import cache as cache_mod
from controller.xds import server as xds_server
from meshcore import rpc_server
from meshcore.kube import resources
from meshcore.model import authorization, workload
from meshcore.traffic import routes as traffic_routes
from meshcore.xds import client as xds_client
from meshcore.xds import resources as xds_resources
from meshcore.xds import traffic as xds_traffic
from meshcore.xds import types
from tests.direct import grpc_harness
from tests.unit import policy_fixtures as f

DEADLINE = 10.0
TOKEN = "node-token"
UID = "Kubernetes//Pod/shop/web-1"
STATIC = "istio-system/istio_converted_static_strict"


class Recorder:
    """What a ztunnel holds after each push, decoded for real; plus every batch it got."""

    def __init__(self) -> None:
        self.held: dict[str, Any] = {}
        self.batches: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = []

    def apply(
        self, type_url: str, updated: Sequence[tuple[str, any_pb2.Any]], removed: Sequence[str]
    ) -> Sequence[str]:
        for name, value in updated:
            self.held[name] = (
                xds_resources.decode_address(value, name=name)
                if type_url == types.ADDRESS
                else xds_resources.decode_authorization(value, name=name)
            )
        for name in removed:
            self.held.pop(name, None)
        self.batches.append((type_url, tuple(n for n, _ in updated), tuple(removed)))
        return ()

    def keys_of(self, uid: str) -> tuple[str, ...]:
        held = self.held.get(uid)
        return held.authorization_policies if isinstance(held, workload.Workload) else ()


async def _eventually(condition: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


_run = grpc_harness.run
state_dir = grpc_harness.state_dir


def _registry(*, with_policies: bool = True) -> kinds.KindRegistry:
    served = list(kinds.build_core_kinds())
    if with_policies:
        served += [
            kinds.ServedKind(policy_translate.AUTHORIZATION_POLICIES),
            kinds.ServedKind(policy_translate.PEER_AUTHENTICATIONS),
        ]
    return kinds.KindRegistry(served)


def _seed(store: store_mod.ObjectStore) -> None:
    store.create(
        resources.NODES,
        {
            "metadata": {"name": "n1"},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]},
        },
    )
    for name in ("shop", "istio-system"):
        store.create(resources.NAMESPACES, {"metadata": {"name": name}})
    store.create(
        resources.PODS,
        {
            "metadata": {"name": "web-1", "namespace": "shop", "labels": {"app": "web"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "app", "command": ["sleep", "1"]}]},
        },
    )
    store.patch(
        resources.PODS,
        "web-1",
        "shop",
        {"status": {"podIP": "10.244.1.5", "phase": "Running"}},
        subresource="status",
    )


@contextlib.asynccontextmanager
async def _controller(
    store: store_mod.ObjectStore, socket: pathlib.Path
) -> AsyncIterator[feed_mod.Feed]:
    """The controller's feed and xDS server, as app.py wires them (root namespace istio-system)."""
    cache = cache_mod.ResourceCache()
    feed = feed_mod.Feed(
        store,
        lambda: translator_mod.Translator(
            trust_domain="cluster.local",
            cluster_id="Kubernetes",
            domain="cluster.local",
            root_namespace="istio-system",
        ),
        cache,
    )
    feeding = asyncio.create_task(feed.run())
    server = rpc_server.new_server()
    servicer = xds_server.XdsServer(cache, authenticate=lambda t: "n1" if t == TOKEN else None)
    xds_server.register(server, servicer)
    rpc_server.add_listener(server, f"unix://{socket}")
    try:
        await asyncio.wait_for(feed.synced.wait(), DEADLINE)
        await server.start()
        yield feed
    finally:
        servicer.close()
        await server.stop(DEADLINE)
        feeding.cancel()
        await asyncio.wait([feeding])


@contextlib.asynccontextmanager
async def _subscribed(
    state_dir: pathlib.Path, node_id: str, type_urls: list[str], handler: xds_client.ResourceHandler
) -> AsyncIterator[None]:
    """A real DeltaXdsClient of node n1 on the controller's socket, running while inside."""
    token_file = state_dir / "token"
    token_file.write_text(TOKEN)
    client = xds_client.DeltaXdsClient(
        f"unix://{state_dir / 'xds.sock'}",
        node_id=node_id,
        node_metadata={"NODE_NAME": "n1"},
        token_file=str(token_file),
        cluster_id="Kubernetes",
        type_urls=type_urls,
        handler=handler,
        backoff_min=0.01,
        backoff_max=0.1,
    )
    task = asyncio.create_task(client.run())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.wait([task])


@contextlib.asynccontextmanager
async def _ztunnel(state_dir: pathlib.Path) -> AsyncIterator[Recorder]:
    recorder = Recorder()
    node_id = "ztunnel~10.0.0.9~zt.istio-system~istio-system.svc.cluster.local"
    async with _subscribed(state_dir, node_id, [types.ADDRESS, types.AUTHORIZATION], recorder):
        yield recorder


def test_policy_changes_reach_ztunnel_as_deltas(state_dir: pathlib.Path) -> None:
    async def main() -> None:
        store = store_mod.ObjectStore(_registry())
        _seed(store)
        # Present before the controller starts: comes in through the first sync.
        store.create(
            policy_translate.PEER_AUTHENTICATIONS, f.pa("default", "istio-system", mode="STRICT")
        )
        async with _controller(store, state_dir / "xds.sock"), _ztunnel(state_dir) as zt:
            # Each type comes in its own response, so wait for both, not just the key.
            await _eventually(
                lambda: zt.keys_of(UID) == (STATIC,) and STATIC in zt.held, "the static policy"
            )
            static = zt.held[STATIC]
            assert static.action is authorization.Action.DENY

            # A selector policy: the policy and the one workload it selects, nothing more.
            seen = len(zt.batches)
            store.create(
                policy_translate.AUTHORIZATION_POLICIES,
                f.ap(
                    "allow-frontend",
                    selector={"app": "web"},
                    rules=[
                        {"from": [f.source(principals=["cluster.local/ns/default/sa/frontend"])]}
                    ],
                ),
            )
            await _eventually(
                lambda: (
                    zt.keys_of(UID) == ("shop/allow-frontend", STATIC)
                    and "shop/allow-frontend" in zt.held
                ),
                "the selector key and its policy",
            )
            pushed = {name for _, updated, _ in zt.batches[seen:] for name in updated}
            assert pushed == {"shop/allow-frontend", UID}

            # A rule change: only the policy moves.
            seen = len(zt.batches)
            store.patch(
                policy_translate.AUTHORIZATION_POLICIES,
                "allow-frontend",
                "shop",
                {"spec": {"action": "DENY"}},
            )
            await _eventually(
                lambda: zt.held["shop/allow-frontend"].action is authorization.Action.DENY,
                "the DENY version",
            )
            assert [b[1] for b in zt.batches[seen:]] == [("shop/allow-frontend",)]

            # Deleted: withdrawn, and the workload stops listing it.
            store.delete(policy_translate.AUTHORIZATION_POLICIES, "allow-frontend", "shop")
            await _eventually(lambda: "shop/allow-frontend" not in zt.held, "the withdrawal")
            await _eventually(lambda: zt.keys_of(UID) == (STATIC,), "the key gone")

            # Namespace PERMISSIVE overrides mesh STRICT.
            store.create(
                policy_translate.PEER_AUTHENTICATIONS, f.pa("open", "shop", mode="PERMISSIVE")
            )
            await _eventually(lambda: zt.keys_of(UID) == (), "no STRICT key")
        store.close()

    _run(main())


def test_store_without_istio_kinds_still_syncs(state_dir: pathlib.Path) -> None:
    async def main() -> None:
        store = store_mod.ObjectStore(_registry(with_policies=False))
        _seed(store)
        async with _controller(store, state_dir / "xds.sock") as feed, _ztunnel(state_dir) as zt:
            await _eventually(lambda: UID in zt.held, "the workload")
            assert feed.translator.snapshot().policies == ()
        store.close()

    _run(main())


class TrafficRecorder:
    """What a waypoint holds of the traffic objects, decoded for real."""

    def __init__(self) -> None:
        self.held: dict[str, dict[str, Any]] = {}

    def apply(
        self, type_url: str, updated: Sequence[tuple[str, any_pb2.Any]], removed: Sequence[str]
    ) -> Sequence[str]:
        assert type_url == types.TRAFFIC
        for name, value in updated:
            self.held[name] = xds_traffic.decode_traffic_object(name, value)
        for name in removed:
            self.held.pop(name, None)
        return ()


@contextlib.asynccontextmanager
async def _waypoint(state_dir: pathlib.Path) -> AsyncIterator[TrafficRecorder]:
    recorder = TrafficRecorder()
    node_id = "waypoint~10.244.1.9~waypoint.shop~shop.svc.cluster.local"
    async with _subscribed(state_dir, node_id, [types.TRAFFIC], recorder):
        yield recorder


REVIEWS_RULE = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "DestinationRule",
    "metadata": {"name": "reviews", "namespace": "shop"},
    "spec": {"host": "reviews", "subsets": [{"name": "v1", "labels": {"version": "v1"}}]},
}
REVIEWS_ROUTE = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "VirtualService",
    "metadata": {"name": "reviews", "namespace": "shop"},
    "spec": {
        "hosts": ["reviews"],
        "http": [{"route": [{"destination": {"host": "reviews", "subset": "v1"}}]}],
    },
}
VS = "VirtualService/shop/reviews"
DR = "DestinationRule/shop/reviews"
BOUND = "AuthorizationPolicy/shop/api-readers"


def test_traffic_objects_reach_waypoints_as_they_change(state_dir: pathlib.Path) -> None:
    async def main() -> None:
        store = store_mod.ObjectStore(kinds.build_registry())
        _seed(store)
        store.create(resources.DESTINATION_RULES, REVIEWS_RULE, "shop")  # in the first sync
        async with _controller(store, state_dir / "xds.sock"), _waypoint(state_dir) as wp:
            await _eventually(lambda: DR in wp.held, "the DestinationRule")
            store.create(resources.VIRTUAL_SERVICES, REVIEWS_ROUTE, "shop")
            await _eventually(lambda: VS in wp.held, "the VirtualService")
            table = traffic_routes.build_route_table(wp.held[VS])  # the waypoint's translation
            assert table.routes[0].destinations[0].host == "reviews.shop.svc.cluster.local"
            assert "status" not in wp.held[VS]

            # Only policies bound by targetRefs are the waypoint's.
            store.create(
                policy_translate.AUTHORIZATION_POLICIES,
                f.ap("selected", selector={"app": "web"}, rules=[{}]),
            )
            store.create(
                policy_translate.AUTHORIZATION_POLICIES,
                f.ap(
                    "api-readers",
                    rules=[{}],
                    targetRefs=[{"kind": "Service", "group": "", "name": "reviews"}],
                ),
            )
            await _eventually(lambda: BOUND in wp.held, "the bound policy")
            assert "AuthorizationPolicy/shop/selected" not in wp.held
            store.patch(
                policy_translate.AUTHORIZATION_POLICIES,
                "api-readers",
                "shop",
                {"spec": {"targetRefs": None, "selector": {"matchLabels": {"app": "web"}}}},
            )
            await _eventually(lambda: BOUND not in wp.held, "the policy no longer bound")

            # Telemetry too: its tracing sampling is the waypoint's.
            store.create(
                resources.TELEMETRIES,
                {
                    "apiVersion": "telemetry.istio.io/v1",
                    "kind": "Telemetry",
                    "metadata": {"name": "tracing", "namespace": "shop"},
                    "spec": {"tracing": [{"randomSamplingPercentage": 25}]},
                },
                "shop",
            )
            await _eventually(lambda: "Telemetry/shop/tracing" in wp.held, "the Telemetry")

            store.delete(resources.VIRTUAL_SERVICES, "reviews", "shop")
            await _eventually(lambda: VS not in wp.held, "the VirtualService withdrawn")
            assert DR in wp.held
        store.close()

    _run(main())
