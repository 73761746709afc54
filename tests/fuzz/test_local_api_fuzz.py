"""Hypothesis against the local API server and the parsers on both sides of it.

The server runs on its own event loop thread for the whole module; each example is a real HTTP
request over its Unix socket. Properties: every answer is a stored object that passes
validation, or a Status error (never a 500); the parsers raise only their documented errors.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import h11
import hypothesis
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.sources.local import apiserver, kinds, schemas, store, validation
from meshcore.kube import client, errors, selectors

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class ServerThread:
    """A LocalApiServer on an event loop of its own, for synchronous Hypothesis tests."""

    def __init__(self, directory: str) -> None:
        self.socket = os.path.join(directory, "api.sock")
        self._loop = asyncio.new_event_loop()
        self._store = store.ObjectStore(kinds.build_registry())
        self._server = apiserver.LocalApiServer(self._store)
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> ServerThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._server.start(self.socket), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._server.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._store.close()


def request(
    path: str,
    method: str = "GET",
    body: bytes | None = None,
    content_type: str = "application/json",
) -> tuple[int, Any]:
    """One HTTP/1.1 exchange on a fresh blocking connection."""
    conn = h11.Connection(h11.CLIENT)
    headers = [("host", "localhost"), ("content-type", content_type)]
    if body is not None:
        headers.append(("content-length", str(len(body))))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(SOCKET_PATH[0])
        data = conn.send(h11.Request(method=method, target=path, headers=headers)) or b""
        if body:
            data += conn.send(h11.Data(data=body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        sock.sendall(data)
        status, chunks = 0, []
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(sock.recv(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return status, json.loads(b"".join(chunks))


SOCKET_PATH: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def server() -> Iterator[None]:
    directory = tempfile.mkdtemp(prefix="mt-", dir="/tmp")
    try:
        with ServerThread(directory) as thread:
            SOCKET_PATH[:] = [thread.socket]
            status, _ = request(
                "/api/v1/namespaces", "POST", json.dumps({"metadata": {"name": "fuzz"}}).encode()
            )
            assert status == 201
            yield
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def assert_status_error(status: int, answer: Any) -> None:
    assert 400 <= status < 500, answer  # never a 500: bad input is the client's error
    assert isinstance(answer, dict), answer
    assert answer["kind"] == "Status", answer
    assert answer["code"] == status
    assert isinstance(answer["message"], str)
    assert answer["message"]


def _without_scheduling(obj: Any) -> Any:
    """The object minus what the scheduler writes after a pod is created (there are no nodes
    here, so every new pod gets PodScheduled=False right after the create answered)."""
    if not isinstance(obj, dict) or obj.get("kind") != "Pod":
        return obj
    copy = json.loads(json.dumps(obj))
    copy["metadata"].pop("resourceVersion", None)
    conditions = copy.get("status", {}).get("conditions") or []
    kept = [c for c in conditions if c.get("type") != "PodScheduled"]
    if kept:
        copy["status"]["conditions"] = kept
    else:
        copy.get("status", {}).pop("conditions", None)
    return copy


def assert_stored_and_valid(schema: validation.Schema, path: str, answer: Any) -> None:
    status, stored = request(path)
    assert status == 200
    assert _without_scheduling(stored) == _without_scheduling(answer)
    assert validation.validate(schema, stored) == []


# -- strategies ----------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=16,
)
good_names = st.from_regex(r"[a-z][a-z0-9-]{0,8}[a-z0-9]", fullmatch=True)
names = st.sampled_from(range(4)).flatmap(
    lambda i: [good_names, good_names, st.text(max_size=12), json_values][i]
)
ports = st.sampled_from(range(3)).flatmap(
    lambda i: [st.integers(1, 65535), st.integers(-5, 70_000), json_values][i]
)


def maybe(strategy: st.SearchStrategy[Any], weight: int = 4) -> st.SearchStrategy[Any]:
    """Mostly well-formed (`weight` to 1), sometimes anything at all."""
    # sampled_from draws evenly and shrinks towards index 0, the well-formed side.
    return st.sampled_from(range(weight + 1)).flatmap(
        lambda i: json_values if i == weight else strategy
    )


labels = st.dictionaries(
    st.sampled_from(range(4)).flatmap(lambda i: st.text(max_size=8) if i == 3 else good_names),
    maybe(good_names | st.just("")),
    max_size=3,
)


container = st.fixed_dictionaries(
    {
        "name": maybe(good_names),
        "command": maybe(st.lists(st.text(max_size=6), min_size=1, max_size=3)),
    },
    optional={
        "args": maybe(st.lists(st.text(max_size=6), max_size=2)),
        "image": names,
        "ports": maybe(
            st.lists(
                st.fixed_dictionaries(
                    {"containerPort": ports},
                    optional={"name": names, "protocol": maybe(st.sampled_from(["TCP", "UDP"]))},
                ),
                max_size=2,
            )
        ),
        "env": maybe(
            st.lists(
                st.fixed_dictionaries(
                    {"name": names},
                    optional={
                        "value": maybe(st.text(max_size=5)),
                        "valueFrom": maybe(
                            st.fixed_dictionaries(
                                {"fieldRef": st.fixed_dictionaries({"fieldPath": names})}
                            )
                        ),
                    },
                ),
                max_size=2,
            )
        ),
    },
).flatmap(lambda c: st.sampled_from([c, c, c, {**c, "junk": 1}]))
metadata = st.fixed_dictionaries(
    {"name": maybe(good_names)},
    optional={
        "namespace": maybe(st.just("fuzz")),
        "labels": maybe(labels),
        "annotations": maybe(labels),
        "uid": json_values,
        "resourceVersion": maybe(st.just("")),
        "generateName": maybe(good_names),
    },
)
pods = st.fixed_dictionaries(
    {
        "apiVersion": maybe(st.just("v1"), 20),
        "kind": maybe(st.just("Pod"), 20),
        "metadata": maybe(metadata, 10),
        "spec": maybe(
            st.fixed_dictionaries(
                {"containers": maybe(st.lists(container, min_size=1, max_size=2))},
                optional={
                    "nodeName": names,
                    "serviceAccountName": maybe(good_names),
                    "terminationGracePeriodSeconds": ports,
                    "restartPolicy": maybe(st.sampled_from(["Always", "Never"])),
                    "nodeSelector": maybe(labels),
                },
            ),
            10,
        ),
    },
    optional={
        "status": maybe(
            st.fixed_dictionaries(
                {},
                optional={
                    "phase": maybe(st.sampled_from(["Pending", "Running"])),
                    "podIP": maybe(st.ip_addresses(v=4).map(str)),
                },
            )
        ),
    },
)
service_ports = st.lists(
    st.fixed_dictionaries(
        {"port": ports},
        optional={
            "name": names,
            "targetPort": st.one_of(ports, names),
            "protocol": maybe(st.sampled_from(["TCP", "UDP"])),
        },
    ),
    min_size=1,
    max_size=3,
)
services = st.fixed_dictionaries(
    {
        "apiVersion": maybe(st.just("v1"), 20),
        "kind": maybe(st.just("Service"), 20),
        "metadata": maybe(metadata, 10),
        "spec": maybe(
            st.fixed_dictionaries(
                {"ports": maybe(service_ports)},
                optional={
                    "selector": maybe(labels),
                    "clusterIP": maybe(
                        st.sampled_from(["None", "", "10.96.200.1", "10.97.0.1"])
                        | st.ip_addresses(v=4).map(str)
                    ),
                    "type": maybe(st.just("ClusterIP")),
                },
            ),
            10,
        ),
    },
)


# -- properties ----------------------------------------------------------------------------


def _create_then_clean(plural: str, schema: validation.Schema, body: Any) -> None:
    collection = f"/api/v1/namespaces/fuzz/{plural}"
    status, answer = request(collection, "POST", json.dumps(body).encode())
    hypothesis.event(f"status {status}")
    if status == 201:
        name = answer["metadata"]["name"]
        assert_stored_and_valid(schema, f"{collection}/{name}", answer)
        status, _ = request(f"{collection}/{name}?gracePeriodSeconds=0", "DELETE")
        assert status == 200
    else:
        assert_status_error(status, answer)


@SETTINGS
@given(pods)
def test_posted_pods_are_stored_valid_or_refused(body: Any) -> None:
    _create_then_clean("pods", schemas.POD, body)


@SETTINGS
@given(services)
def test_posted_services_are_stored_valid_or_refused(body: Any) -> None:
    _create_then_clean("services", schemas.SERVICE, body)


@SETTINGS
@given(json_values)
def test_any_json_body_is_stored_valid_or_refused(body: Any) -> None:
    _create_then_clean("pods", schemas.POD, body)


@SETTINGS
@given(st.binary(max_size=200), st.sampled_from(["application/json", "application/yaml", "x/y"]))
def test_any_bytes_get_a_status_error(body: bytes, content_type: str) -> None:
    status, answer = request("/api/v1/namespaces/fuzz/services", "POST", body, content_type)
    if status == 201:
        name = answer["metadata"]["name"]
        request(f"/api/v1/namespaces/fuzz/services/{name}", "DELETE")
    else:
        assert_status_error(status, answer)


BASE_POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "target", "labels": {"app": "x"}},
    "spec": {"containers": [{"name": "c", "command": ["true"]}], "nodeName": "n1"},
}


@SETTINGS
@given(
    st.dictionaries(
        st.sampled_from(["metadata", "spec", "status", "kind", "extra"]), json_values, max_size=3
    )
    | json_values,
    st.booleans(),
)
def test_merge_patches_leave_a_valid_object_or_are_refused(patch: Any, status_only: bool) -> None:
    collection = "/api/v1/namespaces/fuzz/pods"
    path = f"{collection}/target"
    status, _ = request(path)
    if status == 404:
        status, created = request(collection, "POST", json.dumps(BASE_POD).encode())
        assert status == 201, created
    target = path + ("/status" if status_only else "")
    status, answer = request(
        target, "PATCH", json.dumps(patch).encode(), "application/merge-patch+json"
    )
    hypothesis.event(f"status {status}")
    if status == 200:
        assert_stored_and_valid(schemas.POD, path, answer)
    else:
        assert_status_error(status, answer)


@SETTINGS
@given(pods, st.booleans(), st.integers(-5, 10**13) | json_values)
def test_replacing_then_deleting_a_pod_is_valid_or_refused(
    body: Any, same_name: bool, grace: Any
) -> None:
    if same_name and isinstance(body.get("metadata"), dict):
        body["metadata"]["name"] = "target"  # get past the URL check to the validation
    collection = "/api/v1/namespaces/fuzz/pods"
    path = f"{collection}/target"
    status, _ = request(path)
    if status == 404:
        status, created = request(collection, "POST", json.dumps(BASE_POD).encode())
        assert status == 201, created
    status, answer = request(path, "PUT", json.dumps(body).encode())
    hypothesis.event(f"PUT {status}")
    if status == 200:
        assert_stored_and_valid(schemas.POD, path, answer)
    else:
        assert_status_error(status, answer)
    options = {"kind": "DeleteOptions", "gracePeriodSeconds": grace}
    status, answer = request(path, "DELETE", json.dumps(options).encode())
    hypothesis.event(f"DELETE {status}")
    if status != 200:
        assert_status_error(status, answer)


@SETTINGS
@given(st.text(max_size=40))
def test_selector_parsers_raise_only_selector_errors(text: str) -> None:
    for parse in (selectors.parse_label_selector, selectors.parse_field_selector):
        try:
            parsed = parse(text)
        except errors.SelectorError:
            continue
        # Whatever parses renders back to something that parses the same.
        assert parse(str(parsed)) == parsed


@SETTINGS
@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_watch_lines_raise_only_protocol_errors(line: bytes) -> None:
    try:
        client._decode_event("unix:///fuzz", line)
    except errors.ApiProtocolError:
        pass


@SETTINGS
@given(st.dictionaries(st.sampled_from(["code", "reason", "message", "details"]), json_values))
def test_any_status_object_becomes_an_api_error(status: dict[str, Any]) -> None:
    error = errors.ApiError.from_status(status, 500)
    assert isinstance(error.code, int)
    assert error.message
