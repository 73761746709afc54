from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from meshcore import envconfig, files


class ExampleConfigError(ValueError):
    pass


def test_write_atomic_replaces_whole_file_with_mode(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "state.json"
    files.write_atomic(str(target), b"old")
    files.write_atomic(str(target), b"new", mode=0o640)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640
    assert sorted(os.listdir(target.parent)) == ["state.json"]  # no temporary file left


def test_write_atomic_failure_keeps_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "state.json"
    files.write_atomic(str(target), b"old")

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        files.write_atomic(str(target), b"new")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["state.json"]


@pytest.mark.parametrize(
    ("env", "call", "message"),
    [
        ({}, lambda e: e.required("NODE_NAME"), "environment variable NODE_NAME is required"),
        ({"T": "soon"}, lambda e: e.seconds("T", 1.0), "T='soon' is not a number of seconds"),
        ({"T": "-1"}, lambda e: e.seconds("T", 1.0), "T='-1' must be positive"),
        ({"A": "nohost"}, lambda e: e.host_port("A", ("", 1)), "A='nohost' must be host:port"),
        ({"LOG_LEVEL": "loud"}, lambda e: e.log_level(), "LOG_LEVEL='loud' is not a log level"),
    ],
    ids=["missing", "not-a-number", "negative", "no-port", "bad-level"],
)
def test_env_errors_name_the_variable(env: dict[str, str], call: object, message: str) -> None:
    with pytest.raises(ExampleConfigError) as err:
        call(envconfig.Env(env, ExampleConfigError))  # type: ignore[operator]
    assert message in str(err.value)


def test_env_values() -> None:
    read = envconfig.Env({"A": "[::1]:15000", "T": "2.5", "X": " v "}, ExampleConfigError)
    assert read.host_port("A", ("", 0)) == ("::1", 15000)
    assert read.seconds("T", 1.0) == 2.5
    assert read.optional("X") == "v"
    assert read.optional("MISSING", "d") == "d"
