"""Configuration: the shipped file, errors that name their key, environment overrides."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bmsd.config import DEFAULT_ROUTES, Config, load_config, redact_url
from bmsd.errors import ConfigError

SHIPPED = Path(__file__).resolve().parent.parent / "config" / "bmsd.toml"


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bmsd", "check-config", "--config", str(path)],
                          capture_output=True, text=True, check=False, timeout=60)


def test_shipped_config_is_valid_and_equals_the_defaults() -> None:
    assert load_config(SHIPPED, environ={}) == Config()
    assert load_config(SHIPPED, environ={}).routes == DEFAULT_ROUTES
    run = check(SHIPPED)
    assert run.returncode == 0
    assert "configuration is valid (5 routes)" in run.stdout


@pytest.mark.parametrize(("text", "message"), [
    ("[ingest]\nmax_batch_rows = 0\n", "ingest.max_batch_rows: Input should be greater than 0"),
    ("[ingest]\nmax_bach_rows = 10\n", "ingest.max_bach_rows: unknown key"),
    ("[mqtt]\nurl = 'http://broker'\n", "mqtt.url: must start with mqtt:// or mqtts://"),
    ("[mqtt]\nprotocol = '4'\n", "mqtt.protocol: Input should be '5' or '3.1.1'"),
    ("[ingest]\nmax_reading_age_s = 999999\n", "ingest.max_reading_age_s: Input should be less"),
    ("[metrics]\naddr = 'localhost'\n", "metrics.addr: must be HOST:PORT"),
    ("[[routes]]\ntopic = 'site/+/x'\nstream = 'site_telemetry'\ndevice_kind = 'x'\n",
     "routes[0].topic: must name the segments {site} and {device}"),
    ("[[routes]]\ntopic = 'a/{site}/{device}'\nstream = 'nope'\ndevice_kind = 'x'\n",
     "routes[0].stream: Input should be 'site_telemetry'"),
    ("[ingest\n", "not valid TOML"),
])
def test_a_wrong_value_is_reported_with_its_file_and_key(tmp_path: Path, text: str,
                                                          message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    run = check(path)
    assert run.returncode == 2
    assert str(path) in run.stderr
    assert message in run.stderr


def test_missing_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file; pass --config PATH"):
        load_config(tmp_path / "absent.toml")


def test_environment_overrides_the_file() -> None:
    config = load_config(SHIPPED, environ={
        "BMSD_DATABASE_URL": "postgresql://u:p@db:5432/x",
        "BMSD_MQTT_URL": "mqtts://gw:secret@broker:8883",
        "BMSD_METRICS_ADDR": "0.0.0.0:29200",
    })
    assert config.database.url == "postgresql://u:p@db:5432/x"
    assert config.mqtt.url == "mqtts://gw:secret@broker:8883"
    assert (config.metrics.host, config.metrics.port) == ("0.0.0.0", 29200)  # noqa: S104


def test_passwords_are_redacted_for_logs() -> None:
    assert redact_url("mqtts://gw:secret@broker:8883") == "mqtts://gw:***@broker:8883"
    assert redact_url("postgresql://db/x") == "postgresql://db/x"
