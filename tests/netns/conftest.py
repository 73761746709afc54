"""Shared fixtures for the netns tests: a unique prefix per test and guaranteed cleanup."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.netns import netns_util


@pytest.fixture
def netns_prefix(request: pytest.FixtureRequest) -> str:
    return netns_util.unique_prefix(request.node.name)


@pytest.fixture
def namespaces(netns_prefix: str) -> Iterator[netns_util.Namespaces]:
    """Namespaces and links for one test; all removed afterwards, also when the test fails."""
    topology = netns_util.Namespaces(netns_prefix)
    try:
        yield topology
    finally:
        topology.cleanup()
