"""ztunnel's outbound proxy without namespaces: the test's own network namespace plays the pod."""

from __future__ import annotations

import asyncio
import os
import ssl
import typing

import prometheus_client
import pytest

from meshcore.aio import hbone
from meshcore.identity import spiffe
from meshcore.wire import zds
from ztunnel import config as config_mod
from ztunnel import telemetry
from ztunnel.identity import manager
from ztunnel.inpod import pod_network
from ztunnel.proxy import outbound, pool
from ztunnel.proxy.inputs import PodContext, ProxyInputs
from ztunnel.state import proxy_state

CLIENT = spiffe.SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/client")
SERVER = spiffe.SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/server")


class UnavailableCerts:
    """A certificate manager whose CA is unreachable."""

    async def fetch_client_context(self, identity: spiffe.SpiffeId) -> ssl.SSLContext:
        raise manager.CertificateUnavailableError(identity, "CA unreachable: connection refused")


def test_no_certificate_means_no_connection() -> None:
    async def main() -> None:
        cfg = config_mod.Config(
            node_name="n1",
            xds_address="unix:///x",
            ca_address="unix:///x",
            token_file="/x",
            zds_socket="/x",
            connect_timeout=2,
        )
        inputs = ProxyInputs(
            config=cfg,
            state=proxy_state.ProxyState(),
            certs=typing.cast(manager.CertManager, UnavailableCerts()),
            telemetry=telemetry.Telemetry(telemetry.Metrics(prometheus_client.CollectorRegistry())),
        )
        fd = os.open("/proc/self/ns/net", os.O_RDONLY)
        network = pod_network.PodNetwork(fd, "self")
        os.close(fd)
        pod = PodContext(
            uid="u1",
            info=zds.WorkloadInfo("client", "shop", "client"),
            identity=CLIENT,
            node="n1",
            network=network,
        )
        proxy = outbound.OutboundProxy(inputs, pod)
        try:
            key = pool.PoolKey(CLIENT, (SERVER,), ("127.0.0.1", 9), "127.0.0.1")
            with pytest.raises(hbone.HboneConnectError) as err:
                await proxy.pool.fetch(key)
            assert err.value.flag == "IDENTITY_ERROR"
            assert "CA unreachable" in str(err.value)
            assert proxy.pool.count() == 0
        finally:
            proxy.close()
            network.close()

    asyncio.run(main())
