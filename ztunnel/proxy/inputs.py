"""What every proxy of every pod shares (ztunnel's ProxyInputs), and one pod's own context."""

from __future__ import annotations

import dataclasses

from meshcore import budget
from meshcore.aio import relay
from meshcore.identity import spiffe
from meshcore.model import ids, workload
from meshcore.wire import zds
from ztunnel import config as config_mod
from ztunnel import telemetry
from ztunnel.identity import manager
from ztunnel.inpod import pod_network
from ztunnel.proxy import connection_manager
from ztunnel.state import proxy_state

# TLS handshakes in progress on all of the node's 15008 listeners. Each holds ~50 KiB of TLS
# buffers until it completes or times out, and floods of unfinished ones leave the process's
# heap fragmented; the mesh's own peers pool their connections, so this is far above need.
MAX_PENDING_HANDSHAKES = 1024


@dataclasses.dataclass
class HandshakeBudget(budget.Budget):
    """How many inbound TLS handshakes may be in progress at once, node-wide."""

    limit: int = MAX_PENDING_HANDSHAKES


@dataclasses.dataclass(frozen=True)
class ProxyInputs:
    config: config_mod.Config
    state: proxy_state.ProxyState
    certs: manager.CertManager
    telemetry: telemetry.Telemetry
    # Authorized inbound connections; app.py makes it re-check them on every policy change.
    connections: connection_manager.ConnectionManager = dataclasses.field(
        default_factory=connection_manager.ConnectionManager
    )
    handshakes: HandshakeBudget = dataclasses.field(default_factory=HandshakeBudget)


@dataclasses.dataclass
class PodContext:
    """One enrolled pod: who it is (from ZDS), its namespace's sockets, its live connections."""

    uid: str
    info: zds.WorkloadInfo
    identity: spiffe.SpiffeId
    node: str
    network: pod_network.PodNetwork
    relays: set[relay.Relay] = dataclasses.field(default_factory=set)
    is_closing: bool = False
    # The last workload found, and the state generation it was found in: every connection
    # looks it up, and it changes only when an xDS update lands.
    _found: tuple[int, workload.Workload] | None = dataclasses.field(
        default=None, init=False, repr=False, compare=False
    )

    def find_workload(self, state: proxy_state.ProxyState) -> workload.Workload | None:
        found = self._found
        if (
            found is not None
            and found[0] == state.generation
            # A store changed in place (tests do) keeps the generation: the record must be
            # the one the store holds under its uid.
            and state.workloads.find(found[1].uid) is found[1]
        ):
            return found[1]
        wl = state.find_local_workload(
            self.node, self.info.namespace, self.info.service_account, self.info.name
        )
        self._found = (state.generation, wl) if wl is not None else None
        return wl

    def fallback_workload(self) -> workload.Workload:
        """A stand-in built from ZDS facts while xDS has not delivered the pod yet."""
        return workload.Workload(
            uid=ids.pod_uid(self.info.namespace, self.info.name),
            name=self.info.name,
            namespace=self.info.namespace,
            addresses=(),
            node=self.node,
            service_account=self.identity.service_account,
            trust_domain=self.identity.trust_domain,
        )
