"""How long ztunnel takes to re-authorize its live inbound connections after a policy update.

Run: `python -m bench.recheck [connections]` (default 10,000). Every connection is tracked in a
real `ConnectionManager`; updates go through `ProxyState.apply` with encoded xDS resources, as
the xDS client delivers them, and the real `PolicyWatcher` closes what they deny.

Printed:
- `recheck`: one synchronous `ConnectionManager.recheck` of everything, nothing denied: the raw
  cost of deciding. "distinct clients" gives every connection its own client (address and
  identity), the worst case; "100 clients" is the same number of connections from 100 callers,
  so connections share a decision (pooled HBONE connections from a few callers look like this).
- `xDS apply -> closed`: from `apply` of a GLOBAL DENY that matches 1 connection in 8 until the
  last of them is closed, on a running event loop; "loop held" is the longest the event loop
  went without running anything else meanwhile (the watcher yields between chunks).
- the same for a NAMESPACE policy in another namespace: nothing needs deciding.
"""

from __future__ import annotations

import asyncio
import ipaddress
import statistics
import sys
import time

from meshcore import rbac
from meshcore.identity import spiffe
from meshcore.model import authorization, ids, workload
from meshcore.xds import resources, types
from ztunnel.proxy import connection_manager
from ztunnel.state import proxy_state

WORKLOADS = 20  # local pods on the node; the connections are spread evenly over them
REPEATS = 7
DENIED_NAMESPACE = "client-7"  # 1 client namespace in 8


def _workloads() -> list[workload.Workload]:
    return [
        workload.Workload(
            uid=ids.pod_uid("shop", f"pod-{i}"),
            name=f"pod-{i}",
            namespace="shop",
            addresses=(ipaddress.ip_address(f"10.244.0.{i + 1}"),),
            node="n1",
            service_account=f"sa-{i % 4}",
            tunnel_protocol=workload.TunnelProtocol.HBONE,
        )
        for i in range(WORKLOADS)
    ]


def _rule(match: authorization.Match) -> tuple[authorization.Rule, ...]:
    return (authorization.Rule((authorization.Clause((match,)),)),)


def _allow_policy() -> authorization.Authorization:
    """A namespace ALLOW of the usual size: a handful of principals, two ports."""
    principals = [
        authorization.StringMatch.from_pattern(f"cluster.local/ns/client-{i}/sa/*")
        for i in range(8)
    ]
    principals.append(authorization.StringMatch.from_pattern("cluster.local/ns/shop/*"))
    match = authorization.Match(principals=tuple(principals), destination_ports=(8080, 9090))
    return authorization.Authorization(
        "allow-clients",
        "shop",
        authorization.Scope.NAMESPACE,
        authorization.Action.ALLOW,
        _rule(match),
    )


def _deny_policy(namespace: str, scope: authorization.Scope) -> authorization.Authorization:
    match = authorization.Match(
        namespaces=(authorization.StringMatch.from_pattern(DENIED_NAMESPACE),)
    )
    return authorization.Authorization(
        "deny-client-7", namespace, scope, authorization.Action.DENY, _rule(match)
    )


def _client(index: int, clients: int | None) -> int:
    return index if clients is None else index % clients


def _connection(index: int, clients: int | None, wl: workload.Workload) -> rbac.ConnectionInfo:
    client = _client(index, clients)
    identity = spiffe.SpiffeId.for_workload(f"client-{client % 8}", f"sa-{client}")
    return rbac.ConnectionInfo(
        source_identity=identity,
        source_ip=ipaddress.ip_address(0x0A000000 + client),
        destination_ip=wl.addresses[0],
        destination_port=8080,
    )


def _setup(
    count: int, clients: int | None, on_close: connection_manager.Closer
) -> tuple[proxy_state.ProxyState, connection_manager.ConnectionManager]:
    state = proxy_state.ProxyState()
    wls = _workloads()
    for wl in wls:
        state.workloads.insert(wl)
    state.policies.insert(_allow_policy())
    manager = connection_manager.ConnectionManager()
    for i in range(count):
        wl = wls[i % len(wls)]
        manager.track(_connection(i, clients, wl), wl).bind(on_close)
    return state, manager


def _recheck_only(count: int, clients: int | None) -> list[float]:
    state, manager = _setup(count, clients, lambda reason: None)
    times = []
    for _ in range(REPEATS):
        result = manager.recheck(state)
        assert (result.checked, result.closed) == (count, 0)
        times.append(result.seconds)
    return times


async def _apply_and_close(
    count: int, clients: int | None, deny: authorization.Authorization
) -> tuple[float, float]:
    """Seconds from `apply` until every denied connection is closed, and the longest loop stall."""
    loop = asyncio.get_running_loop()
    expected = 0
    if deny.scope is authorization.Scope.GLOBAL:
        expected = sum(
            f"client-{_client(i, clients) % 8}" == DENIED_NAMESPACE for i in range(count)
        )
    closed = 0
    all_closed = loop.create_future()

    def on_close(reason: str) -> None:
        nonlocal closed
        closed += 1
        if closed == expected:
            all_closed.set_result(None)

    state, manager = _setup(count, clients, on_close)
    watcher = connection_manager.PolicyWatcher(state, manager)
    running = asyncio.create_task(watcher.run())
    longest = 0.0
    stop = False

    async def ticker() -> None:
        # Measures how long the loop is held: the gap between two turns of this coroutine.
        nonlocal longest
        last = time.perf_counter()
        while not stop:
            await asyncio.sleep(0)
            now = time.perf_counter()
            longest = max(longest, now - last)
            last = now

    ticking = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    try:
        started = time.perf_counter()
        assert state.apply(types.AUTHORIZATION, [resources.authorization_resource(deny)], []) == ()
        if expected:
            await asyncio.wait_for(all_closed, 10)
        else:
            for _ in range(3):  # give the watcher its turn: it must find nothing to decide
                await asyncio.sleep(0)
        elapsed = time.perf_counter() - started
    finally:
        stop = True
        await ticking
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
    assert closed == expected, (closed, expected)
    return elapsed, longest


def _report(label: str, times: list[float], extra: str = "") -> None:
    median = statistics.median(times)
    print(f"{label:<52} median {median * 1000:8.2f} ms  max {max(times) * 1000:8.2f} ms{extra}")


def main(argv: list[str]) -> None:
    count = int(argv[0]) if argv else 10_000
    print(f"{count} tracked inbound connections over {WORKLOADS} local workloads")
    print(f"(watcher chunk: {connection_manager.RECHECK_CHUNK} decisions)\n")
    for clients, label in ((None, "distinct clients"), (100, "100 clients")):
        times = _recheck_only(count, clients)
        per = statistics.median(times) / count * 1e6
        _report(f"recheck, all allowed, {label}", times, f"  ({per:.2f} us/connection)")
    scenarios = (
        ("GLOBAL deny, distinct clients", None, authorization.Scope.GLOBAL, "istio-system"),
        ("GLOBAL deny, 100 clients", 100, authorization.Scope.GLOBAL, "istio-system"),
        ("deny in another namespace", None, authorization.Scope.NAMESPACE, "billing"),
    )
    for label, clients, scope, namespace in scenarios:
        runs = [
            asyncio.run(_apply_and_close(count, clients, _deny_policy(namespace, scope)))
            for _ in range(REPEATS)
        ]
        held = max(r[1] for r in runs)
        _report(
            f"xDS apply -> closed: {label}",
            [r[0] for r in runs],
            f"  loop held <= {held * 1000:.2f} ms",
        )


if __name__ == "__main__":
    main(sys.argv[1:])
