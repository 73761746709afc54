"""Starting a playground container with a command the kernel cannot take."""

from __future__ import annotations

import asyncio
import pathlib

import pytest

from meshctl.playground import containers


@pytest.mark.parametrize(
    ("argv", "env"),
    [(["/bin/true", "a\0b"], {}), (["/bin/true"], {"X": "a\0b"})],
    ids=["nul-in-argument", "nul-in-environment"],
)
def test_a_nul_byte_is_a_start_error_not_a_crash(
    tmp_path: pathlib.Path, argv: list[str], env: dict[str, str]
) -> None:
    """Found by an audit: the kubelet's pod worker looped on the ValueError; a start error
    becomes the container's RunContainerError instead."""

    async def main() -> None:
        with pytest.raises(containers.ContainerStartError, match="embedded null byte"):
            await containers.start(
                argv,
                env=env,
                cwd=str(tmp_path),
                netns_path="/proc/self/ns/net",
                hosts_file="/etc/hosts",
                resolv_file="/etc/resolv.conf",
                log_path=str(tmp_path / "log"),
            )

    asyncio.run(main())
