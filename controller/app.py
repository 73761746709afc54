"""The controller's composition root: local store and API, translation, xDS, CA."""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import signal
import sys

from controller import config as config_mod
from controller import feed as feed_mod
from controller.ca import authz
from controller.ca import service as ca_service
from controller.sources.local import (
    apiserver,
    deployments,
    kinds,
    persistence,
    policystatus,
    serviceentries,
    waypoints,
)
from controller.sources.local import errors as local_errors
from controller.sources.local import store as store_mod
from controller.translate import translator as translator_mod
from controller.xds import cache as cache_mod
from controller.xds import server as xds_server
from meshcore import log, rpc_server
from meshcore.aio import runtime
from meshcore.identity import ca as ca_mod
from meshcore.identity import tokens
from meshcore.kube import resources

logger = logging.getLogger("controller")


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _build_authorizer(
    feed: feed_mod.Feed, store: store_mod.ObjectStore, trust_domain: str
) -> authz.CallerAuthorizer:
    """The CA issues an identity to a node only when a pod with it runs there (spec 5.4), and
    to a pod only its own, while it runs."""
    return authz.CallerAuthorizer(
        lambda node, identity: feed.translator.has_identity_on_node(node, identity),
        lambda namespace, name: store.find(resources.PODS, name, namespace),
        trust_domain,
    )


async def run(cfg: config_mod.Config) -> None:
    loop = asyncio.get_running_loop()
    os.makedirs(cfg.state_dir, mode=0o700, exist_ok=True)

    # Local source: persisted Kubernetes-shaped objects behind a list/watch API.
    store = store_mod.ObjectStore(
        kinds.build_registry(
            root_namespace=cfg.root_namespace, dry_run_enabled=cfg.dry_run_policies
        ),
        store_persistence=persistence.FilePersistence(cfg.store_dir),
        service_cidr=cfg.service_cidr,
        system_namespaces=(cfg.root_namespace,),
    )
    api = apiserver.LocalApiServer(store)
    await api.start(cfg.local_api_socket)

    # The local control plane's controllers: Deployments become pods, and AuthorizationPolicies
    # get their ZtunnelAccepted status (started with the tasks).
    deployment_controller = deployments.DeploymentController(store)
    policy_status = policystatus.PolicyStatusController(
        store, root_namespace=cfg.root_namespace, dry_run_enabled=cfg.dry_run_policies
    )
    # ServiceEntries without spec.addresses get a VIP per host in their status.
    service_entry_addresses = serviceentries.ServiceEntryAllocator(store)
    waypoint_deployer = waypoints.WaypointDeployer(
        store,
        waypoints.WaypointSettings(
            command=cfg.waypoint_command,
            xds_address=cfg.waypoint_xds_address or cfg.xds_listen,
            trust_domain=cfg.trust_domain,
            cluster_id=cfg.cluster_id,
            domain=cfg.domain,
            log_level=cfg.log_level,
            otlp_endpoint=cfg.waypoint_otlp_endpoint,
        ),
    )

    # Translation into workloads, services and policies, kept in the xDS cache.
    cache = cache_mod.ResourceCache()
    feed = feed_mod.Feed(
        store,
        lambda: translator_mod.Translator(
            trust_domain=cfg.trust_domain,
            cluster_id=cfg.cluster_id,
            domain=cfg.domain,
            root_namespace=cfg.root_namespace,
            dry_run_policies=cfg.dry_run_policies,
        ),
        cache,
    )

    # The CA and the node credentials it authenticates callers with.
    authority = ca_mod.CertificateAuthority.load_or_create(cfg.ca_dir, cfg.trust_domain, _now())
    node_tokens = tokens.NodeTokens(tokens.load_or_create_secret(cfg.token_secret_file))

    # One gRPC server for delta xDS and CreateCertificate.
    authorizer = _build_authorizer(feed, store, cfg.trust_domain)
    ads = xds_server.XdsServer(
        cache, authenticate=authz.build_xds_authenticator(node_tokens, authorizer)
    )
    certificates = ca_service.CertificateService(authority, node_tokens, authorizer, clock=_now)
    grpc_server = rpc_server.new_server()
    xds_server.register(grpc_server, ads)
    ca_service.register(grpc_server, certificates)
    rpc_server.add_listener(grpc_server, cfg.xds_listen)
    if cfg.xds_listen.startswith("unix://"):
        # The socket only accepts node proxies of this machine; keep it private to root.
        os.chmod(cfg.xds_listen.removeprefix("unix://"), 0o600)

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    try:
        async with asyncio.TaskGroup() as group:
            feeding = group.create_task(feed.run(), name="feed")
            deploying = group.create_task(deployment_controller.run(), name="deployments")
            statusing = group.create_task(policy_status.run(), name="policy-status")
            allocating = group.create_task(
                service_entry_addresses.run(), name="service-entry-addresses"
            )
            waypointing = group.create_task(waypoint_deployer.run(), name="waypoints")
            await feed.synced.wait()
            await grpc_server.start()
            logger.info(
                "controller started",
                extra=log.fields(
                    api=cfg.local_api_socket, xds=cfg.xds_listen, trust_domain=cfg.trust_domain
                ),
            )
            await stop.wait()
            feeding.cancel()
            deploying.cancel()
            statusing.cancel()
            allocating.cancel()
            waypointing.cancel()
    finally:
        ads.close()
        await grpc_server.stop(2)
        await api.close()
        store.close()
        logger.info("controller stopped")


def main() -> None:
    try:
        cfg = config_mod.Config.from_env(os.environ)
    except config_mod.ConfigError as exc:
        print(f"mesh-controller: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    log.configure(cfg.log_level)
    try:
        runtime.run(run(cfg))
    except (ca_mod.CaError, local_errors.CorruptStoreError) as exc:
        print(f"mesh-controller: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
