"""Istio's AuthorizationPolicy and PeerAuthentication through the real local API server on a
Unix socket: v1 and v1beta1 are one set of objects, discovery lists both, a write of a policy
with fields ztunnel does not enforce answers with Warning headers, and `ApiClient` and
`meshctl apply` show them."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import yaml

from controller.sources.local import apiserver, kinds, store
from meshcore.kube import client, errors, objects, resources
from tests.direct import meshctl_harness

DEADLINE = 10.0
AP_V1 = kinds.AUTHORIZATION_POLICIES
AP_BETA = dataclasses.replace(AP_V1, version="v1beta1")
PA_V1 = kinds.PEER_AUTHENTICATIONS
FRONTEND = "cluster.local/ns/default/sa/frontend"
HTTP_WARNING = "spec.rules[0].to[0].operation.methods: HTTP attribute: ztunnel enforces L4 only"
NOTHING_LEFT_WARNING = "spec.rules: no rule is left that ztunnel can match"


def ap(name: str, spec: dict[str, Any], *, ns: str = "shop", version: str = "v1") -> dict[str, Any]:
    return {
        "apiVersion": f"security.istio.io/{version}",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


ALLOW_FRONTEND = {"action": "ALLOW", "rules": [{"from": [{"source": {"principals": [FRONTEND]}}]}]}
GET_ONLY = {
    "selector": {"matchLabels": {"app": "server"}},
    "action": "ALLOW",
    "rules": [{"to": [{"operation": {"methods": ["GET"], "ports": ["7000"]}}]}],
}


@dataclasses.dataclass
class Env:
    store: store.ObjectStore
    api: client.ApiClient
    socket: str


@contextlib.asynccontextmanager
async def running(**client_options: Any) -> AsyncIterator[Env]:
    directory = tempfile.mkdtemp(prefix="pol-")
    st = store.ObjectStore(kinds.build_registry())
    st.create(resources.NAMESPACES, {"metadata": {"name": "shop"}})
    sock = os.path.join(directory, "api.sock")
    server = apiserver.LocalApiServer(st)
    await server.start(sock)
    api = client.ApiClient(f"unix://{sock}", timeout=DEADLINE, **client_options)
    try:
        yield Env(st, api, sock)
    finally:
        await api.close()
        await server.close()
        st.close()
        shutil.rmtree(directory, ignore_errors=True)


def run(main: Callable[[], Awaitable[None]]) -> None:
    async def checked() -> None:
        await main()
        leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert not leftover, leftover

    asyncio.run(checked())


async def raw_request(
    sock: str, method: str, path: str, body: bytes = b"", content_type: str = "application/json"
) -> tuple[int, list[tuple[str, str]], bytes]:
    """One request on a fresh connection; (status, headers, body) as they came on the wire."""
    reader, writer = await asyncio.open_unix_connection(sock)
    try:
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        writer.write(head.encode() + body)
        async with asyncio.timeout(DEADLINE):
            data = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    raw_head, _, payload = data.partition(b"\r\n\r\n")
    status_line, *lines = raw_head.decode("utf-8").split("\r\n")
    headers = [(k.lower(), v.strip()) for k, _, v in (line.partition(":") for line in lines)]
    return int(status_line.split()[1]), headers, payload


# -- versions --------------------------------------------------------------------------------


def test_v1_and_v1beta1_are_the_same_objects() -> None:
    async def main() -> None:
        async with running() as env:
            api = env.api
            created = await api.create(ap("allow-frontend", ALLOW_FRONTEND))
            assert created["apiVersion"] == "security.istio.io/v1"
            as_beta = await api.get(AP_BETA, "allow-frontend", "shop")
            assert as_beta["apiVersion"] == "security.istio.io/v1beta1"
            assert as_beta["spec"] == ALLOW_FRONTEND
            assert objects.uid(as_beta) == objects.uid(created)

            # Created as v1beta1, read as v1; stored as v1 either way.
            beta = await api.create(ap("deny-ssh", _deny_port("22"), version="v1beta1"))
            assert beta["apiVersion"] == "security.istio.io/v1beta1"
            assert (await api.get(AP_V1, "deny-ssh", "shop"))["apiVersion"] == (
                "security.istio.io/v1"
            )
            assert env.store.get(AP_V1, "deny-ssh", "shop")["apiVersion"] == (
                "security.istio.io/v1"
            )

            listed = await api.list(AP_BETA, "shop")
            assert [objects.name(o) for o in listed.items] == ["allow-frontend", "deny-ssh"]
            assert {o["apiVersion"] for o in listed.items} == {"security.istio.io/v1beta1"}

            # Update and patch through v1beta1; the v1 view follows.
            as_beta["metadata"]["labels"] = {"team": "web"}
            replaced = await api.replace(as_beta)
            assert replaced["apiVersion"] == "security.istio.io/v1beta1"
            patched = await api.patch(AP_BETA, "deny-ssh", "shop", {"spec": _deny_port("23")})
            assert patched["apiVersion"] == "security.istio.io/v1beta1"
            v1 = await api.get(AP_V1, "allow-frontend", "shop")
            assert objects.labels(v1) == {"team": "web"}
            assert (await api.get(AP_V1, "deny-ssh", "shop"))["spec"] == _deny_port("23")
            assert v1["metadata"]["generation"] == 1  # labels are not spec

            deleted = await api.delete(AP_BETA, "deny-ssh", "shop")
            assert deleted is not None
            assert deleted["apiVersion"] == "security.istio.io/v1beta1"
            with pytest.raises(errors.NotFoundError):
                await api.get(AP_V1, "deny-ssh", "shop")

    run(main)


def _deny_port(port: str) -> dict[str, Any]:
    return {"action": "DENY", "rules": [{"to": [{"operation": {"ports": [port]}}]}]}


def test_a_v1beta1_watch_streams_v1beta1_objects() -> None:
    async def main() -> None:
        async with running() as env:
            listed = await env.api.list(AP_BETA, "shop")
            events = env.api.watch(
                AP_BETA, "shop", resource_version=listed.resource_version, timeout_seconds=5
            )
            async with contextlib.aclosing(events):
                await env.api.create(ap("p", ALLOW_FRONTEND))
                async with asyncio.timeout(DEADLINE):
                    event = await anext(events)
            assert (event.type, objects.name(event.object)) == ("ADDED", "p")
            assert event.object["apiVersion"] == "security.istio.io/v1beta1"

    run(main)


def test_a_body_of_the_other_version_is_refused_at_a_url() -> None:
    async def main() -> None:
        async with running() as env:
            body = yaml.safe_dump(ap("p", ALLOW_FRONTEND, version="v1")).encode()
            status, _, payload = await raw_request(
                env.socket,
                "POST",
                "/apis/security.istio.io/v1beta1/namespaces/shop/authorizationpolicies",
                body,
                "application/yaml",
            )
            assert status == 400
            assert b"security.istio.io/v1beta1) expected at this URL" in payload
            assert env.store.list(AP_V1).items == []

    run(main)


def test_discovery_resolves_both_versions() -> None:
    async def main() -> None:
        async with running() as env:
            for version in ("v1", "v1beta1"):
                api_version = f"security.istio.io/{version}"
                rtype = await env.api.resolve(api_version, "AuthorizationPolicy")
                assert (rtype.version, rtype.plural, rtype.namespaced) == (
                    version,
                    "authorizationpolicies",
                    True,
                )
                pa = await env.api.resolve(api_version, "PeerAuthentication")
                assert pa.plural == "peerauthentications"
            status, _, payload = await raw_request(env.socket, "GET", "/apis/security.istio.io")
            assert status == 200
            group = yaml.safe_load(payload)
            assert [v["version"] for v in group["versions"]] == ["v1", "v1beta1"]
            assert group["preferredVersion"]["version"] == "v1"

    run(main)


# -- validation ------------------------------------------------------------------------------


def test_an_invalid_policy_is_rejected_whole_with_every_field_path() -> None:
    async def main() -> None:
        async with running() as env:
            spec = {
                "action": "ALLOW",
                "rules": [
                    {"from": [{"source": {"principal": ["x"]}}]},
                    {"to": [{"operation": {"ports": [7000]}}]},
                ],
            }
            with pytest.raises(errors.InvalidError) as caught:
                await env.api.create(ap("bad", spec))
            assert caught.value.message == (
                'AuthorizationPolicy "bad" is invalid: [spec.rules[0].from[0].source.principal: '
                "Unknown field, spec.rules[1].to[0].operation.ports[0]: Invalid value: 7000: must "
                "be of type string]"
            )
            with pytest.raises(errors.InvalidError, match="ztunnel does not support the AUDIT"):
                await env.api.create(ap("bad", {"action": "AUDIT", "rules": [{}]}))
            assert env.store.list(AP_V1).items == []

            # An update that breaks a stored policy leaves it as it was.
            await env.api.create(ap("good", ALLOW_FRONTEND))
            with pytest.raises(errors.InvalidError):
                await env.api.patch(AP_V1, "good", "shop", {"spec": {"action": "CUSTOM"}})
            assert env.store.get(AP_V1, "good", "shop")["spec"] == ALLOW_FRONTEND

    run(main)


# -- warnings --------------------------------------------------------------------------------


def test_a_write_with_unenforced_fields_answers_warning_headers() -> None:
    async def main() -> None:
        async with running() as env:
            body = yaml.safe_dump(ap("get-only", GET_ONLY)).encode()
            path = "/apis/security.istio.io/v1/namespaces/shop/authorizationpolicies"
            status, headers, _ = await raw_request(
                env.socket, "POST", path, body, "application/yaml"
            )
            assert status == 201
            warnings = [v for k, v in headers if k == "warning"]
            assert len(warnings) == 2
            assert warnings[0].startswith(f'299 - "{HTTP_WARNING}')
            assert warnings[1].startswith(f'299 - "{NOTHING_LEFT_WARNING}')
            assert env.store.find(AP_V1, "get-only", "shop") is not None  # warned, not refused

            # None for a policy ztunnel enforces as written.
            status, headers, _ = await raw_request(
                env.socket,
                "POST",
                path,
                yaml.safe_dump(ap("l4", ALLOW_FRONTEND)).encode(),
                "application/yaml",
            )
            assert status == 201
            assert [v for k, v in headers if k == "warning"] == []

    run(main)


def test_the_client_reports_warnings_to_its_handler_and_collectors() -> None:
    async def main() -> None:
        seen: list[str] = []
        async with running(on_warning=seen.append) as env:
            api = env.api
            with api.collect_warnings() as warnings:
                await api.create(ap("get-only", GET_ONLY))
            assert len(warnings) == 2
            assert warnings[0].startswith(HTTP_WARNING)
            assert warnings[1].startswith(NOTHING_LEFT_WARNING)
            assert seen == warnings

            # Reads get no warnings; nor do writes outside the block.
            with api.collect_warnings() as quiet:
                await api.get(AP_V1, "get-only", "shop")
                await api.create(ap("l4", ALLOW_FRONTEND))
            assert quiet == []

            # Status writes are a controller's, not a person's: no warnings.
            with api.collect_warnings() as status_writes:
                await api.patch(
                    AP_V1, "get-only", "shop", {"status": {"conditions": []}}, subresource="status"
                )
            assert status_writes == []

            # Tasks sharing the client each see their own.
            async def write(name: str, spec: dict[str, Any]) -> list[str]:
                with api.collect_warnings() as mine:
                    await api.create(ap(name, spec))
                return mine

            http, l4 = await asyncio.gather(write("a", GET_ONLY), write("b", ALLOW_FRONTEND))
            assert len(http) == 2
            assert l4 == []

    run(main)


def test_apply_reports_warnings_again_only_when_it_writes() -> None:
    async def main() -> None:
        async with running() as env:
            with env.api.collect_warnings() as first:
                _, result = await env.api.apply(ap("get-only", GET_ONLY))
            assert result == "created"
            assert len(first) == 2
            with env.api.collect_warnings() as again:
                _, result = await env.api.apply(ap("get-only", GET_ONLY))
            assert (result, again) == ("unchanged", [])  # as kubectl: no request, no warning

    run(main)


# -- meshctl ---------------------------------------------------------------------------------


playground = meshctl_harness.playground


SEED = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-frontend
  namespace: default
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        principals:
        - cluster.local/ns/default/sa/frontend
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: istio-system
spec:
  mtls:
    mode: STRICT
"""


def test_the_seed_examples_apply_cleanly(playground: meshctl_harness.Playground) -> None:
    code, out, err = playground.meshctl("apply", "-f", "-", stdin=SEED)
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "authorizationpolicy.security.istio.io/allow-frontend created",
        "peerauthentication.security.istio.io/default created",
    ]
    code, out, err = playground.meshctl("apply", "-f", "-", stdin=SEED)
    assert (code, err) == (0, "")
    assert [line.rsplit(" ", 1)[1] for line in out.splitlines()] == ["unchanged"] * 2

    code, out, _ = playground.meshctl("get", "ap")
    assert code == 0
    assert out.splitlines()[0].split() == ["NAME", "ACTION", "AGE"]
    assert out.splitlines()[1].split()[:2] == ["allow-frontend", "ALLOW"]
    code, out, _ = playground.meshctl("get", "peerauthentications", "-A")
    assert code == 0
    assert out.splitlines()[0].split() == ["NAMESPACE", "NAME", "MODE", "AGE"]
    assert out.splitlines()[1].split()[:3] == ["istio-system", "default", "STRICT"]

    code, out, _ = playground.meshctl("get", "pa", "default", "-n", "istio-system", "-o", "yaml")
    assert code == 0
    assert yaml.safe_load(out)["spec"] == {"mtls": {"mode": "STRICT"}}

    code, out, _ = playground.meshctl("delete", "ap", "allow-frontend")
    assert code == 0
    assert playground.store.find(AP_V1, "allow-frontend", "default") is None


def test_apply_prints_warnings_on_stderr_and_succeeds(
    playground: meshctl_harness.Playground,
) -> None:
    playground.meshctl(
        "apply", "-f", "-", stdin="apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n"
    )
    manifest = yaml.safe_dump(ap("get-only", GET_ONLY, version="v1beta1"))
    code, out, err = playground.meshctl("apply", "-f", "-", stdin=manifest)
    assert code == 0
    assert out == "authorizationpolicy.security.istio.io/get-only created\n"
    lines = err.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"Warning: {HTTP_WARNING}")
    assert lines[1].startswith(f"Warning: {NOTHING_LEFT_WARNING}")

    # Changed: written again, warned again.
    changed = {**GET_ONLY, "rules": [{"to": [{"operation": {"paths": ["/a"], "ports": ["1"]}}]}]}
    code, out, err = playground.meshctl(
        "apply", "-f", "-", stdin=yaml.safe_dump(ap("get-only", changed))
    )
    assert (code, out) == (0, "authorizationpolicy.security.istio.io/get-only configured\n")
    assert err.startswith("Warning: spec.rules[0].to[0].operation.paths: HTTP attribute")


def test_apply_refuses_audit_with_istios_words(playground: meshctl_harness.Playground) -> None:
    playground.meshctl(
        "apply", "-f", "-", stdin="apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n"
    )
    manifest = yaml.safe_dump(ap("audit", {"action": "AUDIT", "rules": [{}]}))
    code, out, err = playground.meshctl("apply", "-f", "-", stdin=manifest)
    assert (code, out) == (1, "")
    assert err == (
        'Error from server (Invalid): AuthorizationPolicy "audit" is invalid: spec.action: '
        'Unsupported value: "AUDIT": ztunnel does not support the AUDIT action\n'
    )


PORT_LEVEL = """\
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata:
  name: db
spec:
  selector:
    matchLabels:
      app: db
  mtls:
    mode: STRICT
  portLevelMtls:
    9090:
      mode: PERMISSIVE
"""


def test_port_level_mtls_from_yaml_applies_and_reapplies_unchanged(
    playground: meshctl_harness.Playground,
) -> None:
    code, out, err = playground.meshctl("apply", "-f", "-", stdin=PORT_LEVEL)
    assert (code, err) == (0, "")
    assert out == "peerauthentication.security.istio.io/db created\n"
    stored = playground.store.get(PA_V1, "db", "default")
    assert stored["spec"]["portLevelMtls"] == {"9090": {"mode": "PERMISSIVE"}}
    code, out, _ = playground.meshctl("apply", "-f", "-", stdin=PORT_LEVEL)
    assert (code, out) == (0, "peerauthentication.security.istio.io/db unchanged\n")


def test_the_root_namespace_always_exists(playground: meshctl_harness.Playground) -> None:
    code, _, err = playground.meshctl("delete", "namespace", "istio-system")
    assert code == 1
    assert err == (
        'Error from server (Forbidden): namespaces "istio-system" is forbidden: this namespace '
        "may not be deleted\n"
    )
    assert playground.store.find(resources.NAMESPACES, "istio-system") is not None
