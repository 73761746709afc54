"""The pod volumes the playground kubelet serves: projected service account tokens.

A waypoint's pod asks for its credential as Istio's does, with a projected volume::

    volumes:
    - name: istio-token
      projected:
        sources:
        - serviceAccountToken: {audience: istio-ca, path: istio-token}
    containers:
    - volumeMounts: [{name: istio-token, mountPath: /var/run/secrets/tokens}]

The kubelet writes each token (`meshcore.identity.tokens.mint_pod_token`: the node vouches
for this pod, uid and service account) into ``<pod dir>/volumes/<volume>/<path>`` (0600) and
bind-mounts that directory at ``mountPath`` in the container's private mount namespace. A bind
mount needs its target to exist, so a missing ``mountPath`` is created on the host as an empty
directory (it stays, empty; the mount itself ends with the container). Other volume types are
refused with a ContainerConfigError naming the field; volumes no container mounts are ignored.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
from collections.abc import Mapping
from typing import Any

from meshcore import files
from meshcore.identity import tokens
from meshctl import podfields
from meshctl.playground import sandbox


@dataclasses.dataclass(frozen=True, slots=True)
class TokenFile:
    path: str  # relative to the volume
    audience: str


@dataclasses.dataclass(frozen=True, slots=True)
class Mount:
    volume: str
    mount_path: str
    tokens: tuple[TokenFile, ...]


def _fail(where: str, message: str) -> sandbox.ContainerConfigError:
    return sandbox.ContainerConfigError(f"{where}: {message}")


def _token_files(volume: Mapping[str, Any], where: str) -> tuple[TokenFile, ...]:
    projected = volume.get("projected")
    if not isinstance(projected, Mapping) or set(volume) - {"name", "projected"}:
        raise _fail(
            where, "only projected serviceAccountToken volumes are supported in the playground"
        )
    sources = projected.get("sources")
    if not isinstance(sources, list) or not sources:
        raise _fail(f"{where}.projected.sources", "Required value")
    out = []
    for i, source in enumerate(sources):
        here = f"{where}.projected.sources[{i}]"
        token = source.get("serviceAccountToken") if isinstance(source, Mapping) else None
        if not isinstance(token, Mapping) or len(source) != 1:
            raise _fail(here, "only serviceAccountToken sources are supported in the playground")
        path = token.get("path")
        if (
            not isinstance(path, str)
            or not path
            or posixpath.isabs(path)
            or ".." in path.split("/")
        ):
            raise _fail(
                f"{here}.serviceAccountToken.path",
                f"must be a relative path without '..', got {path!r}",
            )
        out.append(TokenFile(posixpath.normpath(path), str(token.get("audience") or "")))
    return tuple(out)


def build_mounts(pod: Mapping[str, Any], container: Mapping[str, Any]) -> list[Mount]:
    """The container's volume mounts, checked against the pod's volumes."""
    volumes: dict[str, Mapping[str, Any]] = {}
    for i, volume in enumerate(podfields.spec(pod).get("volumes") or []):
        if not isinstance(volume, Mapping) or not isinstance(volume.get("name"), str):
            raise _fail(f"spec.volumes[{i}].name", "Required value")
        volumes[volume["name"]] = volume
    name = container.get("name", "")
    mounts = []
    for i, mount in enumerate(container.get("volumeMounts") or []):
        where = f"spec.containers[{name}].volumeMounts[{i}]"
        volume_name = mount.get("name") if isinstance(mount, Mapping) else None
        if volume_name not in volumes:
            raise _fail(f"{where}.name", f"no volume named {volume_name!r} in spec.volumes")
        target = mount.get("mountPath")
        if not isinstance(target, str) or not posixpath.isabs(target):
            raise _fail(f"{where}.mountPath", f"must be an absolute path, got {target!r}")
        files_ = _token_files(volumes[volume_name], f"spec.volumes[{volume_name}]")
        mounts.append(Mount(volume_name, posixpath.normpath(target), files_))
    return mounts


def write_volume(pod_dir: str, mount: Mount, node_token: str, claims: tokens.PodClaims) -> str:
    """Write the mount's token files into the pod's directory; the directory to bind-mount."""
    directory = os.path.join(pod_dir, "volumes", mount.volume)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    token = tokens.mint_pod_token(node_token, claims)
    for token_file in mount.tokens:
        path = os.path.join(directory, token_file.path)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        files.write_atomic(path, token.encode(), mode=0o600)
    return directory
