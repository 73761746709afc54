"""`bench/c/netbench.c`'s interleaved ping-pong, against echo servers in real namespaces.

The benchmark's latency ratios rest on this mode: every path measured in turn, block by block,
each over its own connection dialled from its own pod's namespace.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from collections.abc import Iterator

import pytest

from bench import measure
from tests.netns import netns_util

PORT = 7000


class Echo:
    """Echoes every byte; records, across all servers, which one answered each round trip."""

    def __init__(self, name: str, listener: socket.socket, order: list[str]) -> None:
        self.name = name
        self.listener = listener
        self.order = order
        self.connections = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # the listener was closed: the test is over
                return
            self.connections += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def stop(self) -> None:
        # shutdown() wakes the thread blocked in accept(); close() alone would not.
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(1):
                self.order.append(self.name)  # the client waits for the echo: no race
                conn.sendall(data)


@pytest.fixture
def netbench(tmp_path_factory: pytest.TempPathFactory) -> str:
    return measure.build_netbench(str(tmp_path_factory.mktemp("netbench")))


@pytest.fixture
def echoes(namespaces: netns_util.Namespaces) -> Iterator[dict[str, tuple[str, Echo]]]:
    order: list[str] = []
    servers: dict[str, tuple[str, Echo]] = {}
    for name in ("a", "b"):
        ns = namespaces.add(name)
        listener = netns_util.tcp_listener(ns, PORT, host="127.0.0.1")
        servers[name] = (ns.path, Echo(name, listener, order))
    try:
        yield servers
    finally:
        for _, echo in servers.values():
            echo.stop()


def runs(order: list[str]) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for name in order:
        if out and out[-1][0] == name:
            out[-1] = (name, out[-1][1] + 1)
        else:
            out.append((name, 1))
    return out


def run_both(
    netbench: str, echoes: dict[str, tuple[str, Echo]], mode: str, count: int, block: int
) -> list[dict[str, float]]:
    """`netbench MODE COUNT BLOCK` over both echoes; each path's figures, checked for count."""
    argv = [netbench, mode, str(count), str(block)]
    for name in ("a", "b"):
        # Both servers listen on 127.0.0.1:7000: only a dial from inside each namespace reaches it.
        argv += [echoes[name][0], "127.0.0.1", str(PORT)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    paths: list[dict[str, float]] = json.loads(done.stdout)["paths"]
    assert [(p["count"], p["errors"]) for p in paths] == [(count, 0), (count, 0)]
    assert all(0 < p["p50_us"] <= p["p99_us"] for p in paths)
    return paths


def test_paths_are_measured_in_turn_each_from_its_own_namespace(
    netbench: str, echoes: dict[str, tuple[str, Echo]]
) -> None:
    run_both(netbench, echoes, "i", 250, 100)

    echo_a, echo_b = echoes["a"][1], echoes["b"][1]
    assert (echo_a.connections, echo_b.connections) == (1, 1)
    # 1,000 warm-up round trips each, then blocks of 100 in turn, the last one short.
    expected = [("a", 1000), ("b", 1000)] + [("a", 100), ("b", 100)] * 2 + [("a", 50), ("b", 50)]
    assert runs(echo_a.order) == expected


def test_connection_rates_are_measured_in_turn_each_from_its_own_namespace(
    netbench: str, echoes: dict[str, tuple[str, Echo]]
) -> None:
    paths = run_both(netbench, echoes, "c", 30, 20)

    assert all(p["conns_per_s"] > 0 for p in paths)
    echo_a, echo_b = echoes["a"][1], echoes["b"][1]
    # One connection per echo: 100 warm-up each, then blocks of 20 in turn, the last one short.
    assert (echo_a.connections, echo_b.connections) == (130, 130)
    expected = [("a", 100), ("b", 100), ("a", 20), ("b", 20), ("a", 10), ("b", 10)]
    assert runs(echo_a.order) == expected


def test_a_missing_namespace_is_named_and_nothing_is_measured(
    netbench: str, echoes: dict[str, tuple[str, Echo]]
) -> None:
    path_a, echo_a = echoes["a"]
    missing = path_a + "-gone"
    argv = [netbench, "i", "10", "5", path_a, "127.0.0.1", str(PORT), missing, "127.0.0.1", "1"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)

    assert done.returncode != 0
    assert missing in done.stderr
    assert done.stdout == ""
    assert echo_a.order == []
