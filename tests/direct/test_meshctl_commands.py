"""meshctl's object commands against the real local API server on a Unix socket (in-process,
on a background event loop), through `cli.run` exactly as the console script calls it."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator

import pytest
import yaml

from controller.sources.local import apiserver, kinds, store
from meshctl import cli
from meshctl.demo import manifests
from meshctl.playground import paths


class Api:
    def __init__(self) -> None:
        self.state_dir = tempfile.mkdtemp(prefix="mt-", dir="/tmp")
        where = paths.Paths(self.state_dir)
        os.makedirs(where.controller_dir)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.server = apiserver.LocalApiServer(store.ObjectStore(kinds.build_registry()))
        asyncio.run_coroutine_threadsafe(self.server.start(where.api_socket), self._loop).result(10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def meshctl(self, *argv: str, stdin: str = "") -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = cli.run(["--state-dir", self.state_dir, *argv], {}, out, err, io.StringIO(stdin))
        return code, out.getvalue(), err.getvalue()


@pytest.fixture
def api() -> Iterator[Api]:
    a = Api()
    try:
        yield a
    finally:
        a.close()


def test_apply_is_idempotent_and_reports_each_object(api: Api) -> None:
    demo = manifests.build_demo_manifest()
    code, out, err = api.meshctl("apply", "-f", "-", stdin=demo)
    assert (code, err) == (0, "")
    assert out.splitlines()[:2] == [
        "namespace/shop created",
        "deployment.apps/product-catalog created",
    ]
    assert len(out.splitlines()) == 8
    code, out, _ = api.meshctl("apply", "-f", "-", stdin=demo)
    assert code == 0
    assert set(line.rsplit(" ", 1)[1] for line in out.splitlines()) == {"unchanged"}


def test_nothing_is_applied_when_a_later_document_is_broken(api: Api) -> None:
    good = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: first\n"
    code, out, err = api.meshctl(
        "apply", "-f", "-", stdin=good + "---\napiVersion: v1\nkind: Foo\nmetadata:\n  name: x\n"
    )
    assert code == 1
    assert out == ""
    assert err == (
        'error: resource mapping not found for name: "x" namespace: "" from "STDIN": '
        'no matches for kind "Foo" in version "v1"\n'
    )
    code, _, err = api.meshctl("apply", "-f", "-", stdin=good + "---\nkind: [\n")
    assert code == 1
    assert err.startswith("error: error parsing STDIN: yaml: line ")
    code, _, err = api.meshctl("get", "ns", "first")
    assert code == 1
    assert err == 'Error from server (NotFound): namespaces "first" not found\n'


def test_server_validation_errors_are_printed_and_others_still_applied(api: Api) -> None:
    bad_pod = (
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\nspec:\n  containers:\n  - name: a\n"
    )
    good = "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: after\n"
    code, out, err = api.meshctl("apply", "-f", "-", stdin=bad_pod + good)
    assert code == 1
    assert err == (
        'Error from server (Invalid): Pod "web" is invalid: spec.containers[0].command: '
        "Required value\n"
    )
    assert out == "namespace/after created\n"


def test_label_get_and_delete(api: Api) -> None:
    api.meshctl("apply", "-f", "-", stdin=manifests.build_demo_manifest())
    assert api.meshctl("label", "namespace", "shop", "istio.io/dataplane-mode=ambient")[:2] == (
        0,
        "namespace/shop labeled\n",
    )
    code, _, err = api.meshctl("label", "ns", "shop", "istio.io/dataplane-mode=none")
    assert code == 1
    assert "--overwrite is false" in err
    code, out, _ = api.meshctl("get", "ns", "shop", "-o", "yaml")
    assert code == 0
    assert yaml.safe_load(out)["metadata"]["labels"] == {"istio.io/dataplane-mode": "ambient"}

    code, out, _ = api.meshctl("get", "svc", "-n", "shop")
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"]
    assert sorted(r.split()[0] for r in rows) == sorted(manifests.SERVICES)
    assert all(r.split()[2].startswith("10.96.") for r in rows)

    code, out, _ = api.meshctl("get", "workloads")
    assert code == 0
    assert "spiffe://cluster.local/ns/shop/sa/client" in out

    code, out, err = api.meshctl("get", "pods", "-A")
    assert (code, err) == (0, "")
    assert out.splitlines()[0].split()[:2] == ["NAMESPACE", "NAME"]
    code, _, err = api.meshctl("get", "bogus")
    assert code == 2
    assert err.startswith('error: the server doesn\'t have a resource type "bogus"')

    # Unscheduled pods (no node in this test) are removed at once, so --wait returns.
    code, out, _ = api.meshctl("delete", "pod", "client", "-n", "shop")
    assert (code, out) == (0, 'pod "client" deleted\n')
    code, _, err = api.meshctl("delete", "pod", "client", "-n", "shop")
    assert code == 1
    assert err == 'Error from server (NotFound): pods "client" not found\n'
