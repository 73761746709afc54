"""Numbers from configs and wire formats are ASCII digits, nothing else `str.isdigit()` takes."""

from __future__ import annotations

import pytest

from meshcore import digits, envconfig


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0", True), ("8080", True), ("", False), ("-1", False), ("²", False), ("٣", False)],
)
def test_is_digits(text: str, expected: bool) -> None:
    assert digits.is_digits(text) is expected


def test_a_superscript_in_an_environment_number_is_a_config_error_not_a_crash() -> None:
    class ConfigError(ValueError):
        pass

    env = envconfig.Env({"WORKERS": "²", "ADDR": "0.0.0.0:80²"}, ConfigError)
    with pytest.raises(ConfigError, match="WORKERS='²' must be a positive whole number"):
        env.count("WORKERS", 1)
    with pytest.raises(ConfigError, match="must be host:port"):
        env.host_port("ADDR", ("0.0.0.0", 1))
