"""Projected service account token volumes in the playground kubelet: what a pod may ask for,
and the token file it gets (a pod token its node vouches with)."""

from __future__ import annotations

import os
import pathlib
import stat
from typing import Any

import pytest

from meshcore.identity import tokens
from meshctl.playground import sandbox, volumes

TOKEN_VOLUME = {
    "name": "istio-token",
    "projected": {
        "sources": [{"serviceAccountToken": {"audience": "istio-ca", "path": "istio-token"}}]
    },
}
MOUNT = {"name": "istio-token", "mountPath": "/var/run/secrets/tokens/"}


def _pod(*pod_volumes: Any) -> dict[str, Any]:
    return {"spec": {"volumes": list(pod_volumes)}}


def _container(*mounts: Any) -> dict[str, Any]:
    return {"name": "istio-proxy", "volumeMounts": list(mounts)}


def test_token_volume_mount() -> None:
    [mount] = volumes.build_mounts(_pod(TOKEN_VOLUME), _container(MOUNT))
    assert mount == volumes.Mount(
        "istio-token", "/var/run/secrets/tokens", (volumes.TokenFile("istio-token", "istio-ca"),)
    )
    # A container without mounts gets none, whatever the pod declares.
    assert volumes.build_mounts(_pod(TOKEN_VOLUME), {"name": "app"}) == []


@pytest.mark.parametrize(
    ("pod_volumes", "mount", "error"),
    [
        (
            [TOKEN_VOLUME],
            {"name": "other", "mountPath": "/x"},
            r"volumeMounts\[0\]\.name: no volume named 'other'",
        ),
        (
            [TOKEN_VOLUME],
            {"name": "istio-token", "mountPath": "relative"},
            r"mountPath: must be an absolute path",
        ),
        (
            [{"name": "data", "emptyDir": {}}],
            {"name": "data", "mountPath": "/data"},
            r"spec\.volumes\[data\]: only projected serviceAccountToken",
        ),
        (
            [{"name": "cm", "projected": {"sources": [{"configMap": {"name": "x"}}]}}],
            {"name": "cm", "mountPath": "/cm"},
            r"spec\.volumes\[cm\]\.projected\.sources\[0\]: only serviceAccountToken sources",
        ),
        (
            [
                {
                    "name": "t",
                    "projected": {
                        "sources": [{"serviceAccountToken": {"path": "../../etc/passwd"}}]
                    },
                }
            ],
            {"name": "t", "mountPath": "/t"},
            r"serviceAccountToken\.path: must be a relative path without '\.\.'",
        ),
        (
            [{"name": "t", "projected": {}}],
            {"name": "t", "mountPath": "/t"},
            r"projected\.sources: Required value",
        ),
    ],
    ids=[
        "unknown-volume",
        "relative-mount",
        "other-type",
        "other-source",
        "escaping-path",
        "no-sources",
    ],
)
def test_refused_volumes_name_the_field(pod_volumes: list[Any], mount: Any, error: str) -> None:
    with pytest.raises(sandbox.ContainerConfigError, match=error):
        volumes.build_mounts(_pod(*pod_volumes), _container(mount))


def test_written_token_is_a_private_pod_token(tmp_path: pathlib.Path) -> None:
    secret = b"s" * 32
    node_token = tokens.NodeTokens(secret).mint("node-1")
    claims = tokens.PodClaims("node-1", "shop", "waypoint-abc", "uid-1", "waypoint")
    [mount] = volumes.build_mounts(_pod(TOKEN_VOLUME), _container(MOUNT))
    directory = volumes.write_volume(str(tmp_path), mount, node_token, claims)
    assert directory == str(tmp_path / "volumes" / "istio-token")
    path = os.path.join(directory, "istio-token")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with open(path, encoding="ascii") as f:
        assert tokens.NodeTokens(secret).verify_caller(f.read()) == claims
