"""Continuous authorization without sockets: what an xDS batch reports as changed, which tracked
connections a re-check denies, and the registry's bookkeeping (spec section 6, item 6)."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress

import pytest

from meshcore import rbac
from meshcore.identity import spiffe
from meshcore.model import authorization, ids, workload
from meshcore.xds import resources, types
from ztunnel.proxy import connection_manager
from ztunnel.state import proxy_state

WEB = spiffe.SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/web")
BATCH = spiffe.SpiffeId.parse("spiffe://cluster.local/ns/jobs/sa/batch")
STRICT_KEY = ids.policy_key("istio-system", "istio_converted_static_strict")


def _wl(name: str, ip: str, ns: str = "shop", policies: tuple[str, ...] = ()) -> workload.Workload:
    return workload.Workload(
        uid=ids.pod_uid(ns, name),
        name=name,
        namespace=ns,
        addresses=(ipaddress.ip_address(ip),),
        node="n1",
        service_account=name,
        tunnel_protocol=workload.TunnelProtocol.HBONE,
        authorization_policies=tuple(ids.PolicyKey(p) for p in policies),
    )


SERVER = _wl("server", "10.244.1.5")
OTHER = _wl("other", "10.244.2.5", ns="billing")


def _rule(match: authorization.Match) -> authorization.Rule:
    return authorization.Rule((authorization.Clause((match,)),))


def _policy(
    name: str,
    action: authorization.Action,
    *rules: authorization.Rule,
    ns: str = "shop",
    scope: authorization.Scope = authorization.Scope.NAMESPACE,
    dry_run: bool = False,
) -> authorization.Authorization:
    return authorization.Authorization(name, ns, scope, action, tuple(rules), dry_run=dry_run)


DENY, ALLOW = authorization.Action.DENY, authorization.Action.ALLOW
DENY_WEB = _policy(
    "deny-web",
    DENY,
    _rule(authorization.Match(principals=(authorization.StringMatch.from_pattern(WEB.principal),))),
)
ALLOW_BATCH = _policy(
    "allow-batch",
    ALLOW,
    _rule(
        authorization.Match(principals=(authorization.StringMatch.from_pattern(BATCH.principal),))
    ),
)
STRICT = _policy(
    "istio_converted_static_strict",
    DENY,
    _rule(
        authorization.Match(
            not_principals=(authorization.StringMatch(authorization.MatchKind.PRESENCE),)
        )
    ),
    ns="istio-system",
    scope=authorization.Scope.WORKLOAD_SELECTOR,
)
DENY_PORT_9090 = _policy("deny-9090", DENY, _rule(authorization.Match(destination_ports=(9090,))))


def _conn(
    identity: spiffe.SpiffeId | None, src: str = "10.244.1.2", port: int = 8080
) -> rbac.ConnectionInfo:
    return rbac.ConnectionInfo(
        identity, ipaddress.ip_address(src), ipaddress.ip_address("10.244.1.5"), port
    )


def _state(
    *policies: authorization.Authorization, local: workload.Workload = SERVER
) -> proxy_state.ProxyState:
    state = proxy_state.ProxyState()
    state.workloads.insert(local)
    state.workloads.insert(OTHER)
    for policy in policies:
        state.policies.insert(policy)
    return state


# --- what ProxyState reports after an xDS batch ---


def _changes(state: proxy_state.ProxyState) -> list[proxy_state.PolicyChange]:
    seen: list[proxy_state.PolicyChange] = []
    state.on_policy_change(seen.append)
    return seen


def test_policy_batch_reports_scope_namespace_and_keys() -> None:
    state = _state()
    seen = _changes(state)
    global_allow = _policy("mesh", ALLOW, ns="istio-system", scope=authorization.Scope.GLOBAL)
    batch = [resources.authorization_resource(p) for p in (DENY_WEB, STRICT, global_allow)]
    assert state.apply(types.AUTHORIZATION, batch, []) == ()
    assert seen == [
        proxy_state.PolicyChange(
            is_global=True,
            namespaces=frozenset({"shop"}),
            policies=frozenset({DENY_WEB.key, STRICT.key, global_allow.key}),
        )
    ]


def test_unchanged_resend_reports_nothing_and_removal_reports_the_old_policy() -> None:
    state = _state(DENY_WEB)
    seen = _changes(state)
    assert state.apply(types.AUTHORIZATION, [resources.authorization_resource(DENY_WEB)], []) == ()
    assert seen == []
    assert state.apply(types.AUTHORIZATION, [], [DENY_WEB.key]) == ()
    assert seen == [
        proxy_state.PolicyChange(namespaces=frozenset({"shop"}), policies=frozenset({DENY_WEB.key}))
    ]
    assert state.policies.find(DENY_WEB.key) is None


def test_policy_that_moves_namespace_reaches_both() -> None:
    state = _state(DENY_WEB)
    seen = _changes(state)
    # Same key, different scope: the workloads it used to cover must be re-checked as well.
    moved = dataclasses.replace(DENY_WEB, scope=authorization.Scope.GLOBAL)
    assert state.apply(types.AUTHORIZATION, [resources.authorization_resource(moved)], []) == ()
    assert seen == [
        proxy_state.PolicyChange(
            is_global=True, namespaces=frozenset({"shop"}), policies=frozenset({DENY_WEB.key})
        )
    ]


@pytest.mark.parametrize(
    ("update", "reported"),
    [
        pytest.param(
            dataclasses.replace(SERVER, authorization_policies=(STRICT_KEY,)), True, id="list-added"
        ),
        pytest.param(
            dataclasses.replace(SERVER, canonical_name="server-v2"), False, id="other-field"
        ),
        pytest.param(_wl("new", "10.244.1.9", policies=(STRICT_KEY,)), False, id="new-workload"),
    ],
)
def test_workload_update_reports_a_changed_policy_list(
    update: workload.Workload, reported: bool
) -> None:
    state = _state()
    seen = _changes(state)
    assert state.apply(types.ADDRESS, [resources.address_resource(update)], []) == ()
    expected = [proxy_state.PolicyChange(workloads=frozenset({update.uid}))] if reported else []
    assert seen == expected
    assert state.workloads.find(update.uid) == update


def test_failing_listener_does_not_nack_an_applied_batch() -> None:
    state = _state()

    def broken(change: proxy_state.PolicyChange) -> None:
        raise RuntimeError("listener bug")

    state.on_policy_change(broken)
    seen = _changes(state)
    assert state.apply(types.AUTHORIZATION, [resources.authorization_resource(DENY_WEB)], []) == ()
    assert state.policies.find(DENY_WEB.key) == DENY_WEB
    assert len(seen) == 1  # later listeners still run


@pytest.mark.parametrize(
    ("change", "wl", "affected"),
    [
        (proxy_state.PolicyChange(is_global=True), OTHER, True),
        (proxy_state.PolicyChange(namespaces=frozenset({"shop"})), SERVER, True),
        (proxy_state.PolicyChange(namespaces=frozenset({"shop"})), OTHER, False),
        (
            proxy_state.PolicyChange(policies=frozenset({STRICT_KEY})),
            dataclasses.replace(OTHER, authorization_policies=(STRICT_KEY,)),
            True,
        ),
        (proxy_state.PolicyChange(policies=frozenset({STRICT_KEY})), OTHER, False),
        (proxy_state.PolicyChange(workloads=frozenset({OTHER.uid})), OTHER, True),
        (proxy_state.PolicyChange(workloads=frozenset({OTHER.uid})), SERVER, False),
    ],
    ids=[
        "global-covers-all",
        "namespace-match",
        "namespace-other",
        "selected-by-key",
        "key-not-listed",
        "workload-listed",
        "workload-other",
    ],
)
def test_change_affects(
    change: proxy_state.PolicyChange, wl: workload.Workload, affected: bool
) -> None:
    assert change.affects(wl) is affected


# --- deciding again ---


@pytest.mark.parametrize(
    ("policies", "local", "conns", "denied"),
    [
        pytest.param((), SERVER, [_conn(WEB), _conn(None)], [], id="no-policy-permissive"),
        pytest.param((DENY_WEB,), SERVER, [_conn(WEB), _conn(BATCH)], [0], id="deny-principal"),
        pytest.param(
            (ALLOW_BATCH,), SERVER, [_conn(WEB), _conn(BATCH), _conn(None)], [0, 2], id="allow-only"
        ),
        pytest.param(
            (STRICT,),
            dataclasses.replace(SERVER, authorization_policies=(STRICT_KEY,)),
            [_conn(WEB), _conn(None), _conn(BATCH), _conn(None, "10.0.0.9")],
            [1, 3],
            id="strict-refuses-plaintext-only",
        ),
        pytest.param((STRICT,), SERVER, [_conn(None)], [], id="strict-not-selected"),
        pytest.param(
            (DENY_PORT_9090,), SERVER, [_conn(WEB, port=9090), _conn(WEB)], [0], id="port"
        ),
        pytest.param(
            (dataclasses.replace(DENY_WEB, dry_run=True),),
            SERVER,
            [_conn(WEB)],
            [],
            id="dry-run-only-logs",
        ),
        pytest.param(
            (DENY_WEB,), SERVER, [_conn(WEB), _conn(BATCH), _conn(WEB)], [0, 2], id="shared-info"
        ),
    ],
)
def test_build_revocations(
    policies: tuple[authorization.Authorization, ...],
    local: workload.Workload,
    conns: list[rbac.ConnectionInfo],
    denied: list[int],
) -> None:
    state = _state(*policies, local=local)
    manager = connection_manager.ConnectionManager()
    tracked = [manager.track(c, local) for c in conns]
    candidates = manager.find_candidates(state, None)
    revocations, checked = connection_manager.build_revocations(state, candidates)
    assert checked == len(conns)
    assert sorted(tracked.index(r.connection) for r in revocations) == denied
    for r in revocations:
        assert not r.decision.is_allowed
        assert r.reason == connection_manager.late_rejection_reason(r.decision)
    assert all(t.revocation is None for t in tracked)  # deciding closes nothing


def test_one_decision_per_distinct_connection_info() -> None:
    manager = connection_manager.ConnectionManager()
    for _ in range(3):
        manager.track(_conn(WEB), SERVER)
    manager.track(_conn(BATCH), SERVER)
    result = manager.recheck(_state())
    assert (result.decisions, result.checked, result.closed) == (2, 4, 0)


def test_revocations_use_the_current_workload_record() -> None:
    # Tracked with the connect-time record (no policy list); xDS has since added STRICT to it.
    state = _state(STRICT, local=dataclasses.replace(SERVER, authorization_policies=(STRICT_KEY,)))
    manager = connection_manager.ConnectionManager()
    tracked = manager.track(_conn(None), SERVER)
    change = proxy_state.PolicyChange(workloads=frozenset({SERVER.uid}))
    candidates = manager.find_candidates(state, change)
    revocations, _ = connection_manager.build_revocations(state, candidates)
    assert [r.connection for r in revocations] == [tracked]
    # Gone from xDS: the snapshot decides, and it lists no policy.
    state.workloads.remove(SERVER.uid)
    candidates = manager.find_candidates(state, None)
    assert connection_manager.build_revocations(state, candidates) == ([], 1)


@pytest.mark.parametrize(
    ("change", "decided"),
    [
        (proxy_state.PolicyChange(namespaces=frozenset({"billing"})), [OTHER.uid]),
        (proxy_state.PolicyChange(namespaces=frozenset({"jobs"})), []),
        (proxy_state.PolicyChange(is_global=True), [SERVER.uid, OTHER.uid]),
        (proxy_state.PolicyChange(workloads=frozenset({SERVER.uid})), [SERVER.uid]),
        (None, [SERVER.uid, OTHER.uid]),
    ],
    ids=["other-namespace", "no-one", "global", "workload", "everything"],
)
def test_candidates_are_the_affected_workloads(
    change: proxy_state.PolicyChange | None, decided: list[ids.WorkloadUid]
) -> None:
    manager = connection_manager.ConnectionManager()
    manager.track(_conn(WEB), SERVER)
    manager.track(_conn(WEB, "10.244.2.9"), OTHER)
    candidates = manager.find_candidates(_state(), change)
    assert [c.uid for c in candidates] == decided


def test_candidates_follow_a_workload_into_a_selected_policy() -> None:
    # The current record lists the changed key, the connect-time one does not: still affected.
    state = _state(local=dataclasses.replace(SERVER, authorization_policies=(STRICT_KEY,)))
    manager = connection_manager.ConnectionManager()
    manager.track(_conn(None), SERVER)
    change = proxy_state.PolicyChange(policies=frozenset({STRICT_KEY}))
    assert [c.uid for c in manager.find_candidates(state, change)] == [SERVER.uid]


@pytest.mark.parametrize(
    ("sizes", "chunk", "expected"),
    [
        ([3], 2, [[2], [1]]),
        ([2, 2], 2, [[2], [2]]),
        ([1, 1, 1], 2, [[1, 1], [1]]),
        ([5, 1], 3, [[3], [2, 1]]),
        ([], 3, []),
    ],
    ids=["split-one-workload", "exact", "pack-workloads", "span", "empty"],
)
def test_split_bounds_the_decisions_per_chunk(
    sizes: list[int], chunk: int, expected: list[list[int]]
) -> None:
    candidates = [
        connection_manager.Candidate(
            ids.WorkloadUid(f"w{i}"),
            SERVER,
            [(_conn(WEB, f"10.0.{i}.{n}"), {}) for n in range(size)],
        )
        for i, size in enumerate(sizes)
    ]
    chunks = list(connection_manager.split(candidates, chunk))
    assert [[len(c.groups) for c in part] for part in chunks] == expected
    # Nothing lost or repeated, in order.
    flat = [g for part in chunks for c in part for g in c.groups]
    assert flat == [g for c in candidates for g in c.groups]


@pytest.mark.parametrize(
    ("decision", "reason"),
    [
        (
            rbac.Decision(rbac.Verdict.EXPLICITLY_DENIED, ids.policy_key("shop", "deny-web")),
            "connection closed: denied by policy shop/deny-web after a policy update",
        ),
        (
            rbac.Decision(rbac.Verdict.NOT_ALLOWED),
            "connection closed: not allowed by any ALLOW policy after a policy update",
        ),
    ],
    ids=["explicit-deny", "not-allowed"],
)
def test_late_rejection_reason(decision: rbac.Decision, reason: str) -> None:
    assert connection_manager.late_rejection_reason(decision) == reason


# --- the registry ---


def test_recheck_closes_denied_connections_once_and_leaves_the_rest() -> None:
    state = _state()
    manager = connection_manager.ConnectionManager()
    closed: list[tuple[str, str]] = []
    web = manager.track(_conn(WEB), SERVER)
    batch = manager.track(_conn(BATCH), SERVER)
    web.bind(lambda reason: closed.append(("web", reason)))
    batch.bind(lambda reason: closed.append(("batch", reason)))

    state.policies.insert(DENY_WEB)
    assert manager.recheck(state).closed == 1
    assert closed == [
        ("web", "connection closed: denied by policy shop/deny-web after a policy update")
    ]
    assert web.revocation is not None
    assert batch.revocation is None

    # Again: the revoked one is not closed twice, the other is still fine.
    result = manager.recheck(state)
    assert (result.checked, result.closed) == (1, 0)
    assert len(closed) == 1


def test_revoked_before_bind_closes_at_bind() -> None:
    manager = connection_manager.ConnectionManager()
    tracked = manager.track(_conn(None), SERVER)
    tracked.revoke("denied while connecting")
    closed: list[str] = []
    tracked.bind(closed.append)
    assert closed == ["denied while connecting"]


def test_unbound_and_released_connections_are_not_closed() -> None:
    state = _state(DENY_WEB)
    manager = connection_manager.ConnectionManager()
    closed: list[str] = []
    with manager.track(_conn(WEB), SERVER) as tracked:
        tracked.bind(closed.append)
        tracked.unbind()  # the relay ended on its own
        assert len(manager) == 1
        assert manager.recheck(state).closed == 1
    assert closed == []
    assert len(manager) == 0
    assert manager.find_by_workload(SERVER.uid) == []
    assert manager.recheck(state).checked == 0
    tracked.release()  # idempotent
    assert len(manager) == 0


def test_registry_counts_per_workload() -> None:
    manager = connection_manager.ConnectionManager()
    a = manager.track(_conn(WEB), SERVER)
    b = manager.track(_conn(WEB), SERVER)
    c = manager.track(_conn(BATCH), SERVER)
    d = manager.track(_conn(WEB), OTHER)
    assert len(manager) == 4
    assert manager.find_by_workload(SERVER.uid) == [a, b, c]
    a.release()
    assert manager.find_by_workload(SERVER.uid) == [b, c]
    for t in (b, c, d):
        t.release()
    assert len(manager) == 0
    assert manager.find_candidates(_state(), None) == []


def test_closer_failure_does_not_spare_the_others() -> None:
    manager = connection_manager.ConnectionManager()
    closed: list[str] = []

    def broken(reason: str) -> None:
        raise RuntimeError("teardown bug")

    manager.track(_conn(WEB), SERVER).bind(broken)
    manager.track(_conn(WEB, "10.0.0.7"), SERVER).bind(closed.append)
    assert manager.recheck(_state(DENY_WEB)).closed == 2
    assert len(closed) == 1


# --- the watcher, driven through ProxyState.apply as xDS drives it ---


def _watched(
    chunk: int = connection_manager.RECHECK_CHUNK,
) -> tuple[
    proxy_state.ProxyState, connection_manager.ConnectionManager, connection_manager.PolicyWatcher
]:
    state = _state()
    manager = connection_manager.ConnectionManager()
    watcher = connection_manager.PolicyWatcher(state, manager, chunk=chunk)
    return state, manager, watcher


def test_watcher_closes_what_an_update_denies() -> None:
    async def main() -> None:
        state, manager, watcher = _watched(chunk=2)
        loop = asyncio.get_running_loop()
        denied: dict[str, asyncio.Future[str]] = {}
        kept: list[str] = []
        # 5 web clients (denied soon, spread over 3 chunks) and one batch client (kept).
        for n in range(5):
            fut = denied[f"10.0.0.{n}"] = loop.create_future()
            manager.track(_conn(WEB, f"10.0.0.{n}"), SERVER).bind(fut.set_result)
        manager.track(_conn(BATCH), SERVER).bind(kept.append)
        running = asyncio.create_task(watcher.run())
        try:
            batch = [resources.authorization_resource(DENY_WEB)]
            assert state.apply(types.AUTHORIZATION, batch, []) == ()
            reasons = await asyncio.wait_for(asyncio.gather(*denied.values()), 5)
            assert set(reasons) == {
                "connection closed: denied by policy shop/deny-web after a policy update"
            }
            assert kept == []
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)

    asyncio.run(main())


def test_watcher_keeps_changes_that_arrive_before_it_runs() -> None:
    async def main() -> None:
        state, manager, watcher = _watched()
        closed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        manager.track(_conn(None), SERVER).bind(closed.set_result)
        # Two updates before the watcher ever ran: the policy, then the workload selecting it.
        assert (
            state.apply(types.AUTHORIZATION, [resources.authorization_resource(STRICT)], []) == ()
        )
        selected = dataclasses.replace(SERVER, authorization_policies=(STRICT_KEY,))
        assert state.apply(types.ADDRESS, [resources.address_resource(selected)], []) == ()
        running = asyncio.create_task(watcher.run())
        try:
            reason = await asyncio.wait_for(closed, 5)
            assert "istio-system/istio_converted_static_strict" in reason
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)

    asyncio.run(main())


def test_merged_change_covers_both() -> None:
    a = proxy_state.PolicyChange(namespaces=frozenset({"shop"}))
    b = proxy_state.PolicyChange(workloads=frozenset({OTHER.uid}), policies=frozenset({STRICT_KEY}))
    merged = a.merge(b)
    assert merged == proxy_state.PolicyChange(
        namespaces=frozenset({"shop"}),
        policies=frozenset({STRICT_KEY}),
        workloads=frozenset({OTHER.uid}),
    )
    assert merged.affects(SERVER)
    assert merged.affects(OTHER)
    assert a.merge(proxy_state.PolicyChange(is_global=True)).is_global
