"""The controller's Config: the policy knobs (root namespace, dry-run policies)."""

from __future__ import annotations

import pytest

from controller import config

BASE = {
    "CONTROLLER_STATE_DIR": "/tmp/x",
    "XDS_LISTEN": "unix:///tmp/x/xds.sock",
    "LOCAL_API_SOCKET": "/tmp/x/api.sock",
}


def test_defaults() -> None:
    cfg = config.Config.from_env(BASE)
    assert cfg.root_namespace == "istio-system"
    assert cfg.dry_run_policies is False


@pytest.mark.parametrize(
    ("env", "root", "dry_run"),
    [
        ({"ROOT_NAMESPACE": "mesh-root"}, "mesh-root", False),
        ({"AMBIENT_ENABLE_DRY_RUN_AUTHORIZATION_POLICY": "true"}, "istio-system", True),
        ({"AMBIENT_ENABLE_DRY_RUN_AUTHORIZATION_POLICY": "0"}, "istio-system", False),
    ],
    ids=["root", "dry-run-on", "dry-run-off"],
)
def test_policy_knobs(env: dict[str, str], root: str, dry_run: bool) -> None:
    cfg = config.Config.from_env({**BASE, **env})
    assert (cfg.root_namespace, cfg.dry_run_policies) == (root, dry_run)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ROOT_NAMESPACE": "Istio_System"}, "ROOT_NAMESPACE='Istio_System' is not a namespace"),
        (
            {"AMBIENT_ENABLE_DRY_RUN_AUTHORIZATION_POLICY": "maybe"},
            "AMBIENT_ENABLE_DRY_RUN_AUTHORIZATION_POLICY='maybe' is not true or false",
        ),
    ],
    ids=["bad-root", "bad-dry-run"],
)
def test_bad_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(config.ConfigError) as bad:
        config.Config.from_env({**BASE, **env})
    assert message in str(bad.value)


def test_waypoint_settings() -> None:
    cfg = config.Config.from_env(BASE)
    assert cfg.waypoint_command[1:] == ("-m", "waypoint")  # this interpreter, by default
    assert (cfg.waypoint_xds_address, cfg.waypoint_otlp_endpoint) == ("", "")
    cfg = config.Config.from_env(
        {
            **BASE,
            "WAYPOINT_COMMAND": "/opt/py/bin/python -X 'dev mode' -m waypoint",
            "WAYPOINT_XDS_ADDRESS": "dns:///controller:15012",
            "WAYPOINT_OTLP_ENDPOINT": "http://collector.obs:4318",
        }
    )
    assert cfg.waypoint_command == ("/opt/py/bin/python", "-X", "dev mode", "-m", "waypoint")
    assert cfg.waypoint_xds_address == "dns:///controller:15012"
    assert cfg.waypoint_otlp_endpoint == "http://collector.obs:4318"


def test_a_waypoint_command_that_does_not_parse_is_named() -> None:
    with pytest.raises(config.ConfigError, match=r"WAYPOINT_COMMAND=.*No closing quotation"):
        config.Config.from_env({**BASE, "WAYPOINT_COMMAND": "python -m 'waypoint"})
