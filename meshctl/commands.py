"""The API-facing commands (apply, delete, get, label, scale, logs, exec, wait): async functions
that take a connected client and the output streams, and return an exit code.

Expected failures raise `errors.MeshctlError` (the CLI prints ``error: ...``); per-object server
errors are printed kubectl-style (``Error from server (Reason): message``) and make the exit
code 1 without stopping the other objects. The server's warnings about a write (a policy field
ztunnel does not enforce) are printed as kubectl does, ``Warning: text`` on stderr, and do not
change the exit code.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TextIO

import yaml

from meshcore.kube import client as kube_client
from meshcore.kube import errors as kube_errors
from meshcore.kube import objects, resources
from meshctl import check, errors, kinds, labels, manifest, podexec, podfields, tables


@dataclasses.dataclass(frozen=True, slots=True)
class Streams:
    out: TextIO
    err: TextIO


def read_source(path: str, stdin: TextIO) -> tuple[str, str]:
    """(text, name for messages) of ``-f PATH`` (``-`` is stdin)."""
    if path == "-":
        return stdin.read(), "STDIN"
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(), path
    except OSError as exc:
        raise errors.ManifestError(
            f'the path "{path}" cannot be read: {exc.strerror or exc}'
        ) from exc
    except UnicodeDecodeError as exc:
        raise errors.ManifestError(f'the path "{path}" is not UTF-8 text: {exc}') from exc


async def load_manifests(
    api: kube_client.ApiClient, sources: Sequence[tuple[str, str]], namespace: str | None
) -> list[manifest.Resolved]:
    """Parse every file, then resolve every document: all before anything is sent."""
    parsed = [(name, manifest.parse_documents(text, name)) for text, name in sources]
    resolved: list[manifest.Resolved] = []
    for name, docs in parsed:
        resolved += await manifest.resolve_documents(api, docs, name, namespace)
    return resolved


def print_warnings(warnings: Sequence[str], io: Streams) -> None:
    for text in warnings:
        print(f"Warning: {text}", file=io.err)


# Applied after everything else in the same file: a route is judged against the subsets the
# DestinationRules define, so those must exist first.
_APPLIED_LAST = frozenset({(kinds.VIRTUAL_SERVICES.group, kinds.VIRTUAL_SERVICES.kind)})


async def apply(api: kube_client.ApiClient, items: Sequence[manifest.Resolved], io: Streams) -> int:
    code = 0
    for item in sorted(items, key=lambda i: (i.rtype.group, i.rtype.kind) in _APPLIED_LAST):
        with api.collect_warnings() as warnings:
            try:
                _, result = await api.apply(item.obj)
            except kube_errors.ApiError as exc:
                print_warnings(warnings, io)
                print(manifest.format_server_error(exc), file=io.err)
                code = 1
                continue
        print_warnings(warnings, io)
        print(f"{item.ref} {result}", file=io.out)
    return code


async def delete_items(
    api: kube_client.ApiClient,
    items: Sequence[manifest.Resolved],
    io: Streams,
    *,
    wait: bool,
    timeout: float,
) -> int:
    code = 0
    deleted: list[manifest.Resolved] = []
    # Reverse document order: a file that creates a namespace first and then its contents is
    # deleted contents first, so the namespace's cascade does not turn the rest into NotFound.
    for item in reversed(items):
        try:
            await api.delete(item.rtype, item.name, item.namespace)
        except kube_errors.ApiError as exc:
            print(manifest.format_server_error(exc), file=io.err)
            code = 1
            continue
        print(f'{item.rtype.kind.lower()} "{item.name}" deleted', file=io.out)
        deleted.append(item)
    if wait:
        for item in deleted:
            await wait_gone(api, item.rtype, item.name, item.namespace, timeout)
    return code


async def wait_gone(
    api: kube_client.ApiClient,
    rtype: resources.ResourceType,
    name: str,
    namespace: str | None,
    timeout: float,
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            await api.get(rtype, name, namespace)
        except kube_errors.NotFoundError:
            return
        if time.monotonic() > deadline:
            raise errors.MeshctlError(
                f'timed out after {timeout:g}s waiting for {rtype.kind.lower()} "{name}" to be'
                " deleted"
            )
        await asyncio.sleep(0.2)


async def delete_named(
    api: kube_client.ApiClient,
    kind: str,
    names: Sequence[str],
    namespace: str,
    io: Streams,
    *,
    wait: bool,
    timeout: float,
) -> int:
    rtype = kinds.find_resource(kind)
    items = [
        manifest.Resolved(
            rtype,
            {"metadata": {"name": n, **({"namespace": namespace} if rtype.namespaced else {})}},
        )
        for n in names
    ]
    return await delete_items(api, items, io, wait=wait, timeout=timeout)


async def label(
    api: kube_client.ApiClient,
    kind: str,
    name: str,
    namespace: str,
    args: Sequence[str],
    io: Streams,
    *,
    overwrite: bool,
) -> int:
    rtype = kinds.find_resource(kind)
    changes = labels.parse_label_args(args)
    ns = namespace if rtype.namespaced else None
    obj = await api.get(rtype, name, ns)
    plan = labels.build_label_plan(objects.labels(obj), changes, overwrite=overwrite)
    if plan.patch is not None:
        with api.collect_warnings() as warnings:
            await api.patch(rtype, name, ns, plan.patch)
        print_warnings(warnings, io)
    print(f"{manifest.kind_ref(rtype)}/{name} {plan.verb}", file=io.out)
    return 0


def check_replicas(replicas: int) -> None:
    if replicas < 0:
        raise errors.UsageError(f"--replicas must be greater than or equal to 0, got {replicas}")


async def scale(
    api: kube_client.ApiClient,
    rtype: resources.ResourceType,
    name: str,
    namespace: str,
    replicas: int,
    io: Streams,
) -> int:
    """Set `spec.replicas` (a merge patch: the local server has no /scale subresource)."""
    check_replicas(replicas)
    await api.patch(rtype, name, namespace, {"spec": {"replicas": replicas}})
    print(f"{manifest.kind_ref(rtype)}/{name} scaled", file=io.out)
    return 0


def _list_document(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "List", "items": items, "metadata": {}}


def _dump(doc: Any, output: str) -> str:
    if output == "json":
        return json.dumps(doc, indent=4) + "\n"
    return str(yaml.safe_dump(doc, sort_keys=False, default_flow_style=False))


async def get(
    api: kube_client.ApiClient,
    kind: str,
    name: str | None,
    namespace: str,
    io: Streams,
    *,
    all_namespaces: bool,
    output: str,
    explicit_namespace: bool,
    ztunnel_states: Mapping[str, str] | None = None,
) -> int:
    """`ztunnel_states` (node name -> process state) fills the ZTUNNEL column of nodes."""
    is_workloads = kinds.is_workloads(kind)
    rtype = resources.PODS if is_workloads else kinds.find_resource(kind)
    # workloads default to every namespace: the view is about the whole mesh.
    everywhere = all_namespaces or (is_workloads and not explicit_namespace)
    ns = None if everywhere or not rtype.namespaced else namespace
    if name is not None:
        items = [await api.get(rtype, name, namespace if rtype.namespaced else None)]
    else:
        listed = await api.list(rtype, ns)
        items = sorted(listed.items, key=lambda o: (objects.namespace(o), objects.name(o)))
    if output in ("yaml", "json"):
        doc = items[0] if name is not None else _list_document(items)
        io.out.write(_dump(doc, output))
        return 0
    if not items:
        where = f" in {namespace} namespace" if rtype.namespaced and not everywhere else ""
        print(f"No resources found{where}.", file=io.err)
        return 0
    headers, rows = tables.build_rows(
        None if is_workloads else rtype,
        items,
        now=datetime.datetime.now(datetime.UTC),
        wide=output == "wide",
        all_namespaces=everywhere and not is_workloads,
        ztunnel_states=ztunnel_states,
    )
    io.out.write(tables.render_table(headers, rows))
    return 0


async def _poll_until_ready(
    find_pending: Callable[[], Awaitable[list[str]]], what: str, timeout: float, sep: str
) -> None:
    """Poll `find_pending` (what is not Ready yet, described) until it is empty; on timeout
    the error lists what is still pending."""
    deadline = time.monotonic() + timeout
    while pending := await find_pending():
        if time.monotonic() > deadline:
            raise errors.MeshctlError(
                f"timed out after {timeout:g}s waiting for {what} to be Ready: " + sep.join(pending)
            )
        await asyncio.sleep(0.25)


async def wait_pods_ready(
    api: kube_client.ApiClient, namespace: str, names: Sequence[str], timeout: float
) -> None:
    """Poll until every named pod is Ready; the error names the ones that are not, and why."""

    async def find_pending() -> list[str]:
        pending = []
        for n in names:
            try:
                pod = await api.get(resources.PODS, n, namespace)
            except kube_errors.NotFoundError:
                pending.append(f"{n} (not found)")
                continue
            if not podfields.is_pod_ready(pod):
                why = tables.pod_status_text(pod)
                message = tables.pod_message(pod)
                pending.append(f"{n} ({why}{': ' + message if message else ''})")
        return pending

    await _poll_until_ready(find_pending, "pods", timeout, ", ")


def _describe_pod(pod: Mapping[str, Any]) -> str:
    why = tables.pod_status_text(pod)
    message = tables.pod_message(pod)
    ready = "Ready" if podfields.is_pod_ready(pod) else "not Ready"
    return f"{objects.name(pod)} {ready} ({why}{': ' + message if message else ''})"


async def _deployment_pods(
    api: kube_client.ApiClient, deployment: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """The deployment's pods that are not terminating, by name."""
    selector = ",".join(f"{k}={v}" for k, v in sorted(podfields.match_labels(deployment).items()))
    if not selector:
        return []
    listed = await api.list(resources.PODS, objects.namespace(deployment), label_selector=selector)
    return sorted((p for p in listed.items if not objects.is_terminating(p)), key=objects.name)


async def wait_deployments_ready(
    api: kube_client.ApiClient, namespace: str, names: Sequence[str], timeout: float
) -> None:
    """Poll until every named deployment has all its replicas of the current template Ready;
    the error names the ones that have not, with their pods' states."""

    async def find_pending() -> list[str]:
        pending = []
        for n in names:
            try:
                deployment = await api.get(kinds.DEPLOYMENTS, n, namespace)
            except kube_errors.NotFoundError:
                pending.append(f"{n} (not found)")
                continue
            if podfields.is_deployment_ready(deployment):
                continue
            ready = podfields.status_count(deployment, "readyReplicas")
            wanted = podfields.desired_replicas(deployment)
            pods = [_describe_pod(p) for p in await _deployment_pods(api, deployment)]
            pending.append(f"{n} ({ready}/{wanted} ready; pods: {', '.join(pods) or 'none'})")
        return pending

    await _poll_until_ready(find_pending, "deployments", timeout, "; ")


async def find_check_targets(
    api: kube_client.ApiClient, kind: str | None, name: str, namespace: str, port: int
) -> list[tuple[Mapping[str, Any], int]]:
    """What `meshctl check` evaluates: (pod, pod port) for a pod, or for each pod a service
    selects, with the service port resolved to that pod's target port."""
    if kind in (None, "pod"):
        try:
            return [(await api.get(resources.PODS, name, namespace), port)]
        except kube_errors.NotFoundError:
            if kind == "pod":
                raise
    service = await api.get(resources.SERVICES, name, namespace)
    if not any(p.get("port") == port for p in podfields.service_ports(service)):
        known = ", ".join(str(p.get("port")) for p in podfields.service_ports(service))
        raise errors.MeshctlError(f"service {namespace}/{name} has no port {port} (ports: {known})")
    pods = podfields.find_service_members(
        service, (await api.list(resources.PODS, namespace)).items
    )
    if not pods:
        raise errors.MeshctlError(
            f"service {namespace}/{name} has no ready endpoints: its selector matches no ready pod"
        )
    targets = []
    for pod in sorted(pods, key=objects.name):
        target = check.resolve_service_port(service, port, pod)
        if target is None:
            raise errors.MeshctlError(
                f"service {namespace}/{name} port {port}: pod {objects.name(pod)} has no such"
                " target port (a named targetPort none of its containers declares?)"
            )
        targets.append((pod, target))
    return targets


async def find_pod(api: kube_client.ApiClient, ref: str, namespace: str) -> dict[str, Any]:
    """The pod `ref` names: ``NAME``, ``pod/NAME``, or ``deployment/NAME`` (as kubectl, one of
    its pods: the first Ready one by name, else the first)."""
    if "/" not in ref:
        return await api.get(resources.PODS, ref, namespace)
    kind, name = kinds.split_ref([ref])
    rtype = kinds.find_resource(kind)
    if rtype == resources.PODS:
        return await api.get(resources.PODS, name, namespace)
    if rtype != kinds.DEPLOYMENTS:
        raise errors.UsageError(f"cannot pick a pod of {rtype.plural}: use pod/NAME or deploy/NAME")
    deployment = await api.get(rtype, name, namespace)
    pods = await _deployment_pods(api, deployment)
    if not pods:
        raise errors.MeshctlError(f'deployment "{name}" has no pods in namespace "{namespace}"')
    return next((p for p in pods if podfields.is_pod_ready(p)), pods[0])


def _open_log(path: str) -> TextIO:
    try:
        return open(path, encoding="utf-8", errors="replace")  # the caller closes it
    except FileNotFoundError as exc:
        raise podexec.PodAccessError(f"no log yet at {path}") from exc


async def follow_log(
    path: str,
    io: Streams,
    is_alive: Callable[[], Awaitable[bool]],
    *,
    follow: bool,
    poll: float = 0.2,
) -> None:
    """Print the log file; with `follow`, keep printing what is appended while `is_alive()`."""
    f = _open_log(path)
    try:
        io.out.write(f.read())
        io.out.flush()
        while follow:
            chunk = f.read()
            if chunk:
                io.out.write(chunk)
                io.out.flush()
                continue
            if not await is_alive():
                return
            await asyncio.sleep(poll)
    finally:
        f.close()
