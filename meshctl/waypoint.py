"""``meshctl waypoint``: a namespace's waypoint, as ``istioctl waypoint`` manages it.

    meshctl waypoint apply -n shop            # Gateway "waypoint" + label the namespace, wait
    meshctl waypoint apply -n shop --name reviews-wp --no-enroll-namespace
    meshctl waypoint apply -n shop --for all  # also calls to the pods' own IPs
    meshctl waypoint delete -n shop

``apply`` writes a Gateway of class ``istio-waypoint`` with Istio's HBONE listener (the
controller then runs its Deployment and Service), labels the namespace
``istio.io/use-waypoint=<name>`` so ztunnels send its services' traffic through it, after waiting
until the Gateway is Programmed (its pod is ready), saying what it waits for: from then on the
namespace's services are reached only through the waypoint (never around it, even while it is
down). ``delete`` removes
the namespace label (when it names this waypoint) and the Gateway.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from meshcore import ambient_labels
from meshcore.kube import client as kube_client
from meshcore.kube import errors as kube_errors
from meshcore.kube import objects, resources
from meshctl import commands, errors, manifest

USE_WAYPOINT_LABEL = ambient_labels.USE_WAYPOINT
DEFAULT_NAME = "waypoint"
_POLL = 0.25


def build_gateway(
    name: str, namespace: str, waypoint_for: str = ambient_labels.WAYPOINT_FOR_SERVICE
) -> dict[str, Any]:
    return {
        "apiVersion": resources.GATEWAYS.api_version,
        "kind": resources.GATEWAYS.kind,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {ambient_labels.WAYPOINT_FOR: waypoint_for},
        },
        "spec": {
            "gatewayClassName": ambient_labels.WAYPOINT_CLASS,
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
        },
    }


def find_condition(gateway: Mapping[str, Any], kind: str) -> Mapping[str, Any]:
    for condition in (gateway.get("status") or {}).get("conditions") or ():
        if isinstance(condition, Mapping) and condition.get("type") == kind:
            return condition
    return {}


def is_programmed(gateway: Mapping[str, Any]) -> bool:
    condition = find_condition(gateway, "Programmed")
    generation = objects.metadata(gateway).get("generation")
    current = generation is None or condition.get("observedGeneration") == generation
    return condition.get("status") == "True" and current


async def wait_programmed(
    api: kube_client.ApiClient, name: str, namespace: str, timeout: float, io: commands.Streams
) -> None:
    """Poll the Gateway until Programmed; each new reason for waiting is printed once."""
    deadline = time.monotonic() + timeout
    said = ""
    while True:
        gateway = await api.get(resources.GATEWAYS, name, namespace)
        if is_programmed(gateway):
            return
        condition = find_condition(gateway, "Programmed")
        waiting = str(condition.get("message") or "waiting for the controller")
        if condition.get("reason") == "Invalid":
            raise errors.MeshctlError(f"waypoint {namespace}/{name} cannot run: {waiting}")
        if waiting != said:
            print(f"waiting for waypoint {namespace}/{name}: {waiting}", file=io.err)
            said = waiting
        if time.monotonic() > deadline:
            raise errors.MeshctlError(
                f"timed out after {timeout:g}s waiting for waypoint {namespace}/{name} to be "
                f"ready: {waiting} (see `meshctl get pods -n {namespace}` and "
                f"`meshctl logs -n {namespace} deploy/{name}`)"
            )
        await asyncio.sleep(_POLL)


async def apply(
    api: kube_client.ApiClient,
    namespace: str,
    name: str,
    io: commands.Streams,
    *,
    enroll_namespace: bool,
    wait: bool,
    timeout: float,
    waypoint_for: str = ambient_labels.WAYPOINT_FOR_SERVICE,
) -> int:
    try:
        await api.get(resources.NAMESPACES, namespace)
    except kube_errors.NotFoundError:
        raise errors.MeshctlError(f'namespace "{namespace}" not found') from None
    with api.collect_warnings() as warnings:
        _, result = await api.apply(build_gateway(name, namespace, waypoint_for))
    commands.print_warnings(warnings, io)
    print(f"waypoint {namespace}/{name} {result}", file=io.out)
    if wait:
        await wait_programmed(api, name, namespace, timeout, io)
        print(f"waypoint {namespace}/{name} ready", file=io.out)
    if enroll_namespace:
        # After the wait: labelled, the namespace's services are reached only through the
        # waypoint (never around it), so it should be serving by then.
        await commands.label(
            api,
            "namespace",
            namespace,
            namespace,
            [f"{USE_WAYPOINT_LABEL}={name}"],
            io,
            overwrite=True,
        )
    return 0


async def delete(
    api: kube_client.ApiClient, namespace: str, name: str, io: commands.Streams
) -> int:
    ns = await api.get(resources.NAMESPACES, namespace)
    if objects.labels(ns).get(USE_WAYPOINT_LABEL) == name:
        await commands.label(
            api, "namespace", namespace, namespace, [f"{USE_WAYPOINT_LABEL}-"], io, overwrite=True
        )
    try:
        await api.delete(resources.GATEWAYS, name, namespace)
    except kube_errors.ApiError as exc:
        print(manifest.format_server_error(exc), file=io.err)
        return 1
    print(f"waypoint {namespace}/{name} deleted", file=io.out)
    return 0
