"""The local API server and the meshcore.kube client, talking over a real Unix socket."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import h11
import pytest
import uvloop

from controller.sources.local import apiserver, kinds, persistence, store
from controller.sources.local import errors as local_errors
from meshcore.kube import client, errors, objects, resources

DEADLINE = 10.0


@pytest.fixture
def short_dir() -> Iterator[str]:
    # Unix socket paths must stay under 108 bytes: pytest's tmp_path is too long.
    path = tempfile.mkdtemp(prefix="mt-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run(main: Callable[[], Awaitable[None]], loop: str = "asyncio") -> None:
    """Run `main` and check that it left no task behind."""

    async def checked() -> None:
        await main()
        leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert not leftover, leftover

    if loop == "uvloop":
        uvloop.run(checked())
    else:
        asyncio.run(checked())


@dataclasses.dataclass
class Env:
    store: store.ObjectStore
    server: apiserver.LocalApiServer
    client: client.ApiClient
    socket: str


@contextlib.asynccontextmanager
async def running(directory: str, **store_options: Any) -> AsyncIterator[Env]:
    st = store.ObjectStore(
        kinds.build_registry(),
        store_persistence=persistence.FilePersistence(os.path.join(directory, "store")),
        **store_options,
    )
    sock = os.path.join(directory, "api.sock")
    server = apiserver.LocalApiServer(st)
    await server.start(sock)
    api = client.ApiClient(f"unix://{sock}", timeout=DEADLINE)
    try:
        yield Env(st, server, api, sock)
    finally:
        await api.close()
        await server.close()
        st.close()


def namespace(name: str, **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def node(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]},
    }


def pod(
    name: str, ns: str = "shop", node_name: str = "", grace: int | None = None
) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": "app", "command": ["sleep", "3600"]}]}
    if node_name:
        spec["nodeName"] = node_name
    if grace is not None:
        spec["terminationGracePeriodSeconds"] = grace
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
        "spec": spec,
    }


def service(name: str, ns: str = "shop", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"selector": {"app": name}, "ports": [{"port": 80, "targetPort": 8080}], **spec},
    }


async def collect(
    stream: AsyncIterator[objects.WatchEvent], count: int
) -> list[objects.WatchEvent]:
    events: list[objects.WatchEvent] = []
    async with asyncio.timeout(DEADLINE):
        async for event in stream:
            events.append(event)
            if len(events) == count:
                break
    return events


def version(obj: dict[str, Any]) -> int:
    return int(objects.resource_version(obj))


# -- CRUD --------------------------------------------------------------------------------------


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_crud_for_each_kind(short_dir: str, loop: str) -> None:
    async def main() -> None:
        async with running(short_dir) as env:
            api = env.client
            ns = await api.create(namespace("shop", team="a"))
            assert ns["status"]["phase"] == "Active"
            assert (await api.get(resources.NAMESPACES, "shop"))["metadata"]["uid"] == objects.uid(
                ns
            )
            n1 = await api.create(node("n1"))
            web = await api.create(pod("web"))
            assert web["spec"]["nodeName"] == "n1"  # scheduled onto the only Ready node
            svc = await api.create(service("web"))
            assert svc["spec"]["clusterIP"] == "10.96.0.1"

            listed = await api.list(resources.PODS, "shop")
            assert [objects.name(p) for p in listed.items] == ["web"]
            assert listed.items[0]["kind"] == "Pod"
            assert int(listed.resource_version) == version(svc)
            assert [objects.name(p) for p in (await api.list(resources.PODS)).items] == ["web"]
            assert (await api.list(resources.PODS, "other")).items == []
            names = {objects.name(n) for n in (await api.list(resources.NAMESPACES)).items}
            assert names == {"default", "shop"}

            # replace: a PUT that names the current version, then one that names an old one.
            changed = dict(svc, spec=dict(svc["spec"], selector={"app": "web2"}))
            replaced = await api.replace(changed)
            assert replaced["spec"]["selector"] == {"app": "web2"}
            assert replaced["spec"]["clusterIP"] == "10.96.0.1"
            assert version(replaced) > version(svc)
            with pytest.raises(errors.ConflictError) as err:
                await api.replace(changed)
            assert str(err.value) == (
                'Operation cannot be fulfilled on services "web": the object has been modified; '
                "please apply your changes to the latest version and try again"
            )

            # patch: labels on a node and a namespace, status through the subresource.
            patched = await api.patch(
                resources.NODES, "n1", None, {"metadata": {"labels": {"zone": "a"}}}
            )
            assert objects.labels(patched) == {"zone": "a"}
            assert objects.uid(patched) == objects.uid(n1)
            labelled = await api.patch(
                resources.NAMESPACES,
                "shop",
                None,
                {"metadata": {"labels": {"istio.io/dataplane-mode": "ambient", "team": None}}},
            )
            assert objects.labels(labelled) == {"istio.io/dataplane-mode": "ambient"}
            running_pod = await api.patch(
                resources.PODS,
                "web",
                "shop",
                {"status": {"phase": "Running", "podIP": "10.244.1.5"}, "spec": {"nodeName": "x"}},
                subresource="status",
            )
            assert running_pod["status"]["phase"] == "Running"
            assert running_pod["spec"]["nodeName"] == "n1"  # /status changes status only

            # delete: service and node at once, the namespace through its lifecycle.
            gone = await api.delete(resources.SERVICES, "web", "shop")
            assert gone is not None
            assert objects.name(gone) == "web"
            with pytest.raises(errors.NotFoundError):
                await api.get(resources.SERVICES, "web", "shop")
            await api.delete(resources.NODES, "n1")
            assert (await api.list(resources.PODS)).items == []  # its pods went with it
            await api.delete(resources.NAMESPACES, "shop")
            with pytest.raises(errors.NotFoundError):
                await api.get(resources.NAMESPACES, "shop")

    run(main, loop)


def test_error_statuses_and_messages(short_dir: str) -> None:
    async def main() -> None:
        async with running(short_dir) as env:
            api = env.client
            with pytest.raises(errors.NotFoundError) as not_found:
                await api.create(pod("web"))
            assert str(not_found.value) == 'namespaces "shop" not found'
            assert not_found.value.code == 404

            await api.create(namespace("shop"))
            with pytest.raises(errors.NotFoundError) as missing:
                await api.get(resources.PODS, "nope", "shop")
            assert str(missing.value) == 'pods "nope" not found'
            assert missing.value.details == {"name": "nope", "kind": "pods"}

            await api.create(pod("web"))
            with pytest.raises(errors.AlreadyExistsError) as exists:
                await api.create(pod("web"))
            assert str(exists.value) == 'pods "web" already exists'
            assert exists.value.code == 409

            bad = pod("bad")
            del bad["spec"]["containers"][0]["command"]
            bad["spec"]["contianers"] = []
            with pytest.raises(errors.InvalidError) as invalid:
                await api.create(bad)
            assert str(invalid.value) == (
                'Pod "bad" is invalid: [spec.containers[0].command: Required value, '
                "spec.contianers: Unknown field]"
            )
            assert invalid.value.code == 422
            assert [c["field"] for c in invalid.value.details["causes"]] == [
                "spec.containers[0].command",
                "spec.contianers",
            ]

            await api.create(service("a", clusterIP="10.96.0.1"))
            with pytest.raises(errors.InvalidError) as in_use:
                await api.create(service("b", clusterIP="10.96.0.1"))
            assert str(in_use.value) == (
                'Service "b" is invalid: spec.clusterIP: Invalid value: "10.96.0.1": '
                "provided IP is already allocated: 10.96.0.1"
            )
            with pytest.raises(errors.InvalidError, match="not in the valid range"):
                await api.create(service("c", clusterIP="192.168.0.1"))

            with pytest.raises(errors.ApiError) as selector:
                await api.list(resources.PODS, label_selector="app in web")
            assert selector.value.code == 400
            assert "unable to parse label selector" in str(selector.value)
            with pytest.raises(
                errors.BadRequestError, match=r'field label not supported: "spec\.foo"'
            ):
                await api.list(resources.PODS, field_selector="spec.foo=x")

    run(main)


def test_unknown_kind_via_discovery(short_dir: str) -> None:
    async def main() -> None:
        async with running(short_dir) as env:
            api = env.client
            assert await api.resolve("v1", "Service") == resources.SERVICES
            assert await api.resolve("v1", "Namespace") == resources.NAMESPACES
            assert await api.resolve("apps/v1", "Deployment") == kinds.DEPLOYMENTS
            for api_version, kind in (("v1", "Foo"), ("apps/v1", "StatefulSet"), ("v2", "Pod")):
                with pytest.raises(errors.UnknownKindError) as err:
                    await api.resolve(api_version, kind)
                assert str(err.value) == f'no matches for kind "{kind}" in version "{api_version}"'
            with pytest.raises(errors.UnknownKindError):
                await api.create({"apiVersion": "v1", "kind": "Foo", "metadata": {"name": "x"}})

    run(main)


def test_apply_creates_configures_and_keeps_what_others_wrote(short_dir: str) -> None:
    async def main() -> None:
        async with running(short_dir) as env:
            api = env.client
            await api.create(namespace("shop"))
            manifest = service("web")
            manifest["metadata"]["labels"] = {"app": "web", "tier": "front"}
            created, outcome = await api.apply(manifest)
            assert outcome == "created"
            again, outcome = await api.apply(manifest)
            assert outcome == "unchanged"
            assert version(again) == version(created)
            # Another component annotates the service; a later apply must not remove it.
            await api.patch(
                resources.SERVICES, "web", "shop", {"metadata": {"annotations": {"mesh/x": "1"}}}
            )
            del manifest["metadata"]["labels"]["tier"]
            manifest["spec"]["ports"] = [{"port": 81, "targetPort": 8080}]
            configured, outcome = await api.apply(manifest)
            assert outcome == "configured"
            assert objects.labels(configured) == {"app": "web"}
            assert objects.annotations_of(configured)["mesh/x"] == "1"
            assert configured["spec"]["ports"][0]["port"] == 81
            assert configured["spec"]["clusterIP"] == created["spec"]["clusterIP"]
            assert objects.uid(configured) == objects.uid(created)

    run(main)


# -- watch -------------------------------------------------------------------------------------


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_watch_delivers_changes_in_order(short_dir: str, loop: str) -> None:
    async def main() -> None:
        async with running(short_dir) as env:
            api = env.client
            ns = await api.create(namespace("shop"))
            stream = api.watch(
                resources.SERVICES, "shop", resource_version=objects.resource_version(ns)
            )
            async with contextlib.aclosing(stream):
                await api.create(service("web"))
                await api.patch(
                    resources.SERVICES, "web", "shop", {"metadata": {"labels": {"a": "b"}}}
                )
                await api.create(service("other", "default"))  # another namespace: not seen
                await api.delete(resources.SERVICES, "web", "shop")
                events = await collect(stream, 3)
            assert [e.type for e in events] == ["ADDED", "MODIFIED", "DELETED"]
            versions = [version(e.object) for e in events]
            assert versions == sorted(versions)
            assert len(set(versions)) == 3
            assert objects.labels(events[1].object) == {"a": "b"}

    run(main, loop)


def test_watch_with_field_selector_follows_the_node(short_dir: str) -> None:
    async def main() -> None:
        async with running(short_dir) as env:
            api = env.client
            ns = await api.create(namespace("shop"))
            stream = api.watch(
                resources.PODS,
                resource_version=objects.resource_version(ns),
                field_selector="spec.nodeName=n1",
            )
            async with contextlib.aclosing(stream):
                await api.create(pod("elsewhere", node_name="n2"))
                await api.create(pod("pending"))  # no node yet: not n1's
                await api.create(node("n1"))  # binds "pending" to n1: ADDED for this watch
                await api.create(pod("direct", node_name="n1"))
                await api.delete(resources.PODS, "direct", "shop", grace_period_seconds=0)
                events = await collect(stream, 3)
            assert [(e.type, objects.name(e.object)) for e in events] == [
                ("ADDED", "pending"),
                ("ADDED", "direct"),
                ("DELETED", "direct"),
            ]

    run(main)


def test_watch_from_a_version_older_than_the_history_gets_410(short_dir: str) -> None:
    async def main() -> None:
        async with running(short_dir, history_size=2) as env:
            api = env.client
            start = env.store.resource_version
            for name in ("a", "b", "c"):
                await api.create(namespace(name))
            stream = api.watch(resources.NAMESPACES, resource_version=str(start))
            async with contextlib.aclosing(stream):
                events = [e async for e in stream]
            assert len(events) == 1
            assert events[0].type == "ERROR"
            gone = errors.ApiError.from_status(events[0].object)
            assert isinstance(gone, errors.GoneError)
            assert gone.code == 410
            assert str(gone) == f"too old resource version: {start} (2)"

    run(main)


def test_watch_ends_at_timeout_seconds_and_at_server_close(short_dir: str) -> None:
    async def main() -> None:
        async with running(short_dir) as env:
            stream = env.client.watch(resources.PODS, resource_version="", timeout_seconds=1)
            async with contextlib.aclosing(stream), asyncio.timeout(DEADLINE):
                assert [e async for e in stream] == []
            stream = env.client.watch(resources.PODS, resource_version="")
            async with contextlib.aclosing(stream):
                reader = asyncio.ensure_future(collect(stream, 1))
                # The request is in once the store has a subscriber for it.
                async with asyncio.timeout(DEADLINE):
                    while not env.store.subscriber_count:
                        await asyncio.sleep(0.01)
                await env.server.close()
                assert await reader == []  # ended cleanly: no error, no event

    run(main)


# -- lifecycle ---------------------------------------------------------------------------------


def test_graceful_pod_deletion(short_dir: str) -> None:
    async def main() -> None:
        async with running(short_dir) as env:
            api = env.client
            await api.create(namespace("shop"))
            web = await api.create(pod("web", node_name="n1", grace=5))
            stream = api.watch(
                resources.PODS, "shop", resource_version=objects.resource_version(web)
            )
            async with contextlib.aclosing(stream):
                marked = await api.delete(resources.PODS, "web", "shop")
                assert marked is not None
                assert marked["metadata"]["deletionGracePeriodSeconds"] == 5
                assert objects.is_terminating(marked)
                # Still there, terminating, until the kubelet finishes it.
                assert objects.is_terminating(await api.get(resources.PODS, "web", "shop"))
                with pytest.raises(errors.ConflictError, match="Precondition failed"):
                    await api.delete(
                        resources.PODS, "web", "shop", grace_period_seconds=0, precondition_uid="x"
                    )
                await api.delete(
                    resources.PODS,
                    "web",
                    "shop",
                    grace_period_seconds=0,
                    precondition_uid=objects.uid(web),
                )
                events = await collect(stream, 2)
            assert [e.type for e in events] == ["MODIFIED", "DELETED"]
            assert objects.is_terminating(events[0].object)
            with pytest.raises(errors.NotFoundError):
                await api.get(resources.PODS, "web", "shop")

    run(main)


def test_namespace_deletion_cascades(short_dir: str) -> None:
    async def main() -> None:
        async with running(short_dir) as env:
            api = env.client
            await api.create(namespace("shop"))
            await api.create(namespace("keep"))
            await api.create(pod("web", node_name="n1"))
            await api.create(pod("idle"))  # unscheduled: removed at once
            await api.create(service("web"))
            await api.create(service("web", "keep"))
            terminating = await api.delete(resources.NAMESPACES, "shop")
            assert terminating is not None
            assert terminating["status"]["phase"] == "Terminating"
            assert (await api.list(resources.SERVICES, "shop")).items == []
            left = (await api.list(resources.PODS, "shop")).items
            assert [objects.name(p) for p in left] == ["web"]
            assert objects.is_terminating(left[0])
            with pytest.raises(errors.ForbiddenError, match="is being terminated"):
                await api.create(service("new"))
            await api.delete(resources.PODS, "web", "shop", grace_period_seconds=0)
            with pytest.raises(errors.NotFoundError):
                await api.get(resources.NAMESPACES, "shop")
            assert [objects.name(s) for s in (await api.list(resources.SERVICES)).items] == ["web"]

    run(main)


def test_everything_survives_a_restart(short_dir: str) -> None:
    async def main() -> None:
        async with running(short_dir) as env:
            api = env.client
            await api.create(namespace("shop"))
            await api.create(node("n1"))
            before = {
                "web": await api.create(pod("web")),
                "svc": await api.create(service("web")),
                "db": await api.create(service("db", clusterIP="None")),
            }
            await api.create(service("gone"))
            await api.delete(resources.SERVICES, "gone", "shop")
            last = env.store.resource_version
        async with running(short_dir) as env:
            api = env.client
            assert env.store.resource_version == last
            for key, obj in before.items():
                rtype = resources.PODS if key == "web" else resources.SERVICES
                assert await api.get(rtype, objects.name(obj), "shop") == obj
            # The counter continues, and the restored ClusterIPs stay taken.
            fresh = await api.create(service("api"))
            assert version(fresh) == last + 1
            assert fresh["spec"]["clusterIP"] not in {"10.96.0.1"}
            with pytest.raises(errors.InvalidError, match="already allocated"):
                await api.create(service("copy", clusterIP=before["svc"]["spec"]["clusterIP"]))

    run(main)


# -- robustness --------------------------------------------------------------------------------


class RawConnection:
    """HTTP/1.1 by hand: to send what the client never would."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def open(cls, path: str) -> RawConnection:
        return cls(*await asyncio.open_unix_connection(path))

    async def request(
        self, method: str, path: str, body: bytes = b"", content_type: str = "application/json"
    ) -> tuple[int, dict[str, Any]]:
        if self.conn.our_state is h11.DONE:
            self.conn.start_next_cycle()
        headers = [("host", "localhost"), ("content-length", str(len(body)))]
        if content_type:
            headers.append(("content-type", content_type))
        data = self.conn.send(h11.Request(method=method, target=path, headers=headers)) or b""
        data += self.conn.send(h11.Data(data=body)) or b"" if body else b""
        data += self.conn.send(h11.EndOfMessage()) or b""
        self.writer.write(data)
        await self.writer.drain()
        status, chunks = 0, []
        async with asyncio.timeout(DEADLINE):
            while True:
                event = self.conn.next_event()
                if event is h11.NEED_DATA:
                    self.conn.receive_data(await self.reader.read(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    return status, json.loads(b"".join(chunks))

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@pytest.mark.parametrize(
    ("method", "path", "body", "content_type", "status", "fragment"),
    [
        ("POST", "/api/v1/namespaces", b"{not json", "application/json", 400, "not valid JSON"),
        ("POST", "/api/v1/namespaces", b"[1, 2]", "application/json", 400, "not array"),
        ("POST", "/api/v1/namespaces", b"a: [", "application/yaml", 400, "not valid YAML"),
        ("POST", "/api/v1/namespaces", b"{}", "text/plain", 415, "unsupported media type"),
        (
            "POST",
            "/api/v1/namespaces",
            b'{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}}',
            "application/json",
            400,
            'kind "Pod" of the object does not match the Namespace',
        ),
        (
            "PATCH",
            "/api/v1/namespaces/default",
            b"[]",
            "application/json-patch+json",
            415,
            "unsupported patch type",
        ),
        ("DELETE", "/api/v1/namespaces", b"", "", 405, "does not allow this method"),
        ("POST", "/api/v1/pods", b"{}", "application/json", 405, "does not allow this method"),
        ("GET", "/api/v1/widgets", b"", "", 404, "could not find the requested resource"),
        (
            "GET",
            "/api/v1/pods?watch=true&resourceVersion=x",
            b"",
            "",
            400,
            "invalid resourceVersion",
        ),
        (
            "GET",
            "/api/v1/pods?watch=true&resourceVersion=%C2%B2",  # "²": isdigit(), not int()
            b"",
            "",
            400,
            "invalid resourceVersion",
        ),
        ("DELETE", "/api/v1/namespaces/default?gracePeriodSeconds=soon", b"", "", 400, "integer"),
        ("POST", "/api/v1/namespaces?dryRun=All", b"{}", "application/json", 400, "dryRun"),
    ],
    ids=[
        "bad-json",
        "not-object",
        "bad-yaml",
        "media-type",
        "wrong-kind",
        "json-patch",
        "delete-collection",
        "post-all-namespaces",
        "unknown-resource",
        "bad-version",
        "superscript-version",
        "bad-grace",
        "dry-run",
    ],
)
def test_bad_requests_get_a_status_and_the_connection_keeps_working(
    short_dir: str,
    method: str,
    path: str,
    body: bytes,
    content_type: str,
    status: int,
    fragment: str,
) -> None:
    async def main() -> None:
        async with running(short_dir) as env:
            raw = await RawConnection.open(env.socket)
            try:
                code, answer = await raw.request(method, path, body, content_type)
                assert code == status
                assert answer["kind"] == "Status"
                assert answer["code"] == status
                assert fragment in answer["message"]
                # Same connection, next request: the server still answers.
                code, answer = await raw.request("GET", "/api/v1/namespaces/default")
                assert code == 200
                assert objects.name(answer) == "default"
            finally:
                await raw.close()

    run(main)


def test_huge_body_gets_413_and_the_server_keeps_running(short_dir: str) -> None:
    async def main() -> None:
        async with running(short_dir) as env:
            body = json.dumps({"metadata": {"name": "x", "annotations": {"a": "x" * (4 << 20)}}})
            raw = await RawConnection.open(env.socket)
            try:
                code, answer = await raw.request("POST", "/api/v1/namespaces", body.encode())
            finally:
                await raw.close()
            assert code == 413
            assert answer["reason"] == "RequestEntityTooLarge"
            assert "larger than 3145728 bytes" in answer["message"]
            assert objects.name(await env.client.get(resources.NAMESPACES, "default")) == "default"

    run(main)


def test_the_client_refuses_a_body_no_api_server_takes_before_sending_it(short_dir: str) -> None:
    """Found by an audit: a 50 MB annotation (100 MB once meshctl adds last-applied) ended in
    "connection reset by peer", the server having stopped reading a body it would not take."""

    async def main() -> None:
        async with running(short_dir) as env:
            big = {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": "big", "annotations": {"a": "x" * (4 << 20)}},
            }
            with pytest.raises(errors.RequestEntityTooLargeError) as err:
                await env.client.create(big)
            assert str(err.value).startswith("the request body is 41943")
            assert str(err.value).endswith("larger than the 3145728 bytes an API server accepts")
            with pytest.raises(errors.NotFoundError):
                await env.client.get(resources.NAMESPACES, "big")

    run(main)


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\x01\x02\x03 not http at all\r\n\r\n",
        b"GET /api HTTP/1.1\r\n\r\n",
        b"GET /api HTTP/1.1\r\nbad header line\r\n\r\n",
        b"GET /api HTTP/1.1\r\nhost: x\r\n" + b"x-long: " + b"a" * 100_000,  # never ends
        b"POST /api/v1/namespaces HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nabc",
    ],
    ids=["binary", "no-host", "bad-header", "huge-header", "truncated-body"],
)
def test_garbage_on_the_socket_closes_only_that_connection(short_dir: str, garbage: bytes) -> None:
    async def main() -> None:
        async with running(short_dir) as env:
            reader, writer = await asyncio.open_unix_connection(env.socket)
            writer.write(garbage)
            await writer.drain()
            if garbage.endswith(b"abc"):
                writer.write_eof()  # the body never completes
            # Whatever comes back (a 400, or a reset for unread data), the server ends this
            # connection.
            with contextlib.suppress(ConnectionResetError):
                async with asyncio.timeout(DEADLINE):
                    while await reader.read(65536):
                        pass
            writer.close()
            with contextlib.suppress(ConnectionResetError):
                await writer.wait_closed()
            assert objects.name(await env.client.get(resources.NAMESPACES, "default")) == "default"

    run(main)


def test_socket_file_handling(short_dir: str) -> None:
    async def main() -> None:
        path = os.path.join(short_dir, "api.sock")
        # A socket file nobody listens on (a crashed server) is replaced.
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(path)
        stale.close()
        async with running(short_dir) as env:
            assert os.stat(path).st_mode & 0o777 == 0o600
            second = apiserver.LocalApiServer(env.store)
            with pytest.raises(local_errors.ServerStartError, match="in use by another server"):
                await second.start(path)
            assert objects.name(await env.client.get(resources.NAMESPACES, "default")) == "default"
        assert not os.path.exists(path)
        os.mkfifo(path)
        server = apiserver.LocalApiServer(store.ObjectStore(kinds.build_registry()))
        with pytest.raises(local_errors.ServerStartError, match="exists and is not a socket"):
            await server.start(path)

    run(main)


def test_client_reports_an_unreachable_server(short_dir: str) -> None:
    async def main() -> None:
        path = os.path.join(short_dir, "nobody.sock")
        api = client.ApiClient(f"unix://{path}")
        try:
            with pytest.raises(errors.ApiConnectionError) as err:
                await api.get(resources.NAMESPACES, "default")
            assert path in str(err.value)
        finally:
            await api.close()
        with pytest.raises(errors.KubeConfigError, match="https API servers are not supported"):
            client.ApiClient("https://127.0.0.1:6443")
        with pytest.raises(errors.KubeConfigError, match="must be absolute"):
            client.ApiClient("unix://relative.sock")

    run(main)


def test_client_retries_on_a_pooled_connection_the_server_closed(short_dir: str) -> None:
    async def main() -> None:
        async with running(short_dir) as env:
            api = env.client
            await api.get(resources.NAMESPACES, "default")
            # The server restarts on the same socket while the client holds an idle connection.
            await env.server.close()
            await env.server.start(env.socket)
            assert objects.name(await api.get(resources.NAMESPACES, "default")) == "default"

    run(main)


def test_expect_100_continue_gets_an_interim_answer(short_dir: str) -> None:
    async def main() -> None:
        async with running(short_dir) as env:
            reader, writer = await asyncio.open_unix_connection(env.socket)
            try:
                body = json.dumps({"metadata": {"name": "shop"}}).encode()
                writer.write(
                    b"POST /api/v1/namespaces HTTP/1.1\r\nhost: x\r\n"
                    b"content-type: application/json\r\nexpect: 100-continue\r\n"
                    b"content-length: " + str(len(body)).encode() + b"\r\n\r\n"
                )
                await writer.drain()
                async with asyncio.timeout(DEADLINE):
                    interim = await reader.readuntil(b"\r\n\r\n")
                assert interim.startswith(b"HTTP/1.1 100 ")
                writer.write(body)
                await writer.drain()
                async with asyncio.timeout(DEADLINE):
                    final = await reader.readuntil(b"\r\n\r\n")
                assert final.startswith(b"HTTP/1.1 201 ")
            finally:
                writer.close()
                await writer.wait_closed()
            assert objects.name(await env.client.get(resources.NAMESPACES, "shop")) == "shop"

    run(main)
