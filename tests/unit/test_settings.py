"""Settings come from NPUSWARM_* variables; a bad value is one clear line at startup."""

from __future__ import annotations

import subprocess
import sys

import pytest

from npuswarm.settings import DEFAULT_ALLOWED_HOST_PATHS, Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("NPUSWARM_"):
            monkeypatch.delenv(name)


def test_defaults_and_env_names(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = Settings.from_env()
    assert defaults.resync_seconds == 30.0
    assert defaults.lost_node_grace_seconds == 120.0
    assert defaults.metrics_port == 8081
    assert defaults.docker_timeout_seconds == 30.0
    assert defaults.swarm_probe_seconds == 15.0
    assert defaults.allowed_host_paths == DEFAULT_ALLOWED_HOST_PATHS == ("/models", "/data")
    monkeypatch.setenv("NPUSWARM_RESYNC_SECONDS", "2")
    monkeypatch.setenv("NPUSWARM_LOST_NODE_GRACE_SECONDS", "0")
    monkeypatch.setenv("NPUSWARM_METRICS_PORT", "9100")
    monkeypatch.setenv("NPUSWARM_DOCKER_TIMEOUT_SECONDS", "5.5")
    monkeypatch.setenv("NPUSWARM_SWARM_PROBE_SECONDS", "1")
    monkeypatch.setenv("NPUSWARM_ALLOWED_HOST_PATHS", " /models/ , /srv//weights,/data/../scratch")
    got = Settings.from_env()
    assert (got.resync_seconds, got.lost_node_grace_seconds, got.metrics_port) == (2.0, 0.0, 9100)
    assert (got.docker_timeout_seconds, got.swarm_probe_seconds) == (5.5, 1.0)
    assert got.allowed_host_paths == ("/models", "/srv/weights", "/scratch")


def test_empty_means_default_and_none_allows_no_host_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NPUSWARM_RESYNC_SECONDS", "")
    monkeypatch.setenv("NPUSWARM_ALLOWED_HOST_PATHS", "")
    assert Settings.from_env().resync_seconds == 30.0
    assert Settings.from_env().allowed_host_paths == DEFAULT_ALLOWED_HOST_PATHS
    monkeypatch.setenv("NPUSWARM_ALLOWED_HOST_PATHS", "none")
    assert Settings.from_env().allowed_host_paths == ()


def test_keyword_construction_for_tests_still_works() -> None:
    assert Settings(lost_node_grace_seconds=5).lost_node_grace_seconds == 5
    with pytest.raises(ValueError, match="lost_node_grace"):
        Settings(lost_node_grace=5)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("NPUSWARM_RESYNC_SECONDS", "0", "greater than 0"),
        ("NPUSWARM_RESYNC_SECONDS", "-1", "greater than 0"),
        ("NPUSWARM_RESYNC_SECONDS", "nan", "finite"),
        ("NPUSWARM_RESYNC_SECONDS", "inf", "finite"),
        ("NPUSWARM_RESYNC_SECONDS", "soon", "valid number"),
        ("NPUSWARM_METRICS_PORT", "8081.5", "valid integer"),
        ("NPUSWARM_METRICS_PORT", "0", "greater than or equal to 1"),
        ("NPUSWARM_METRICS_PORT", "70000", "less than or equal to 65535"),
        ("NPUSWARM_LOST_NODE_GRACE_SECONDS", "-5", "greater than or equal to 0"),
        ("NPUSWARM_DOCKER_TIMEOUT_SECONDS", "0", "greater than 0"),
        ("NPUSWARM_SWARM_PROBE_SECONDS", "0", "greater than 0"),
        ("NPUSWARM_PEERING_LIFETIME_SECONDS", "5", "greater than or equal to 15"),
        ("NPUSWARM_PEERING_LIFETIME_SECONDS", "20.5", "valid integer"),
        ("NPUSWARM_ALLOWED_HOST_PATHS", "models", "not an absolute path"),
        ("NPUSWARM_ALLOWED_HOST_PATHS", "/models,/", "'/' may not be allowed"),
        ("NPUSWARM_ALLOWED_HOST_PATHS", "/etc/ssl", "/etc is always refused"),
        ("NPUSWARM_ALLOWED_HOST_PATHS", "/data/../var/run", "/var/run is always refused"),
    ],
)
def test_bad_values_exit_with_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, fragment: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as caught:
        Settings.from_env()
    message = str(caught.value.code)
    assert "\n" not in message
    assert message.startswith(f"npuswarm: invalid settings: {name}={value!r}")
    assert fragment in message


def test_operator_start_with_a_bad_setting_is_one_line_and_no_traceback() -> None:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("NPUSWARM_")}
    env["NPUSWARM_RESYNC_SECONDS"] = "0"
    result = subprocess.run(
        [sys.executable, "-m", "npuswarm.cli", "run", "--standalone"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "npuswarm: invalid settings: NPUSWARM_RESYNC_SECONDS='0': Input should be greater than 0"
    )


@pytest.mark.parametrize(
    "name", ["NPUSWARM_ROOT_KEY", "NPUSWARM_GATEWAY_ROOT_KEY", "NPUSWARM_GATEWAY_TOKEN"]
)
def test_the_root_key_is_read_under_its_name_and_its_earlier_ones(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setenv(name, "a-root-key-of-32-characters-long!")
    assert Settings.from_env().root_key.get_secret_value() == "a-root-key-of-32-characters-long!"


def test_node_agent_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (Settings.from_env().agent_image, Settings.from_env().agent_port) == ("", 9109)
    monkeypatch.setenv("NPUSWARM_AGENT_IMAGE", "registry.example.com/npuswarm@sha256:abc")
    monkeypatch.setenv("NPUSWARM_AGENT_PORT", "19109")
    settings = Settings.from_env()
    assert settings.agent_image == "registry.example.com/npuswarm@sha256:abc"
    assert settings.agent_port == 19109
    monkeypatch.setenv("NPUSWARM_ROOT_KEY", "short")
    with pytest.raises(SystemExit, match="NPUSWARM_ROOT_KEY=<hidden>"):
        Settings.from_env()
