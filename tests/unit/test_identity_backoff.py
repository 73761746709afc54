from __future__ import annotations

import pytest

from ztunnel.identity import manager


@pytest.mark.parametrize(
    ("failures", "seconds"),
    [(1, 0.5), (2, 1.0), (3, 2.0), (9, 128.0), (10, 150.0), (1000, 150.0)],
    ids=["first", "second", "third", "ninth", "capped", "huge"],
)
def test_backoff_doubles_from_half_second_to_150(failures: int, seconds: float) -> None:
    assert manager.backoff_seconds(failures) == seconds
