"""Configuration: the shipped file, errors that name their key, environment overrides."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from pydantic import BaseModel

from bmsd.config import DEFAULT_ROUTES, Config, RouteConfig
from bmsd.config_load import SYSTEM_CONFIG_PATH, load_config
from bmsd.config_text import describe, redact_url
from bmsd.database import connect_kwargs
from bmsd.errors import ConfigError

SHIPPED = Path(__file__).resolve().parent.parent / "config" / "bmsd.toml"
SHIPPED_RULES = SHIPPED.parent / "alerts.toml"


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
    ("[ingest]\nmax_reading_age_s = -1\n", "ingest.max_reading_age_s: Input should be greater"),
    ("[metrics]\naddr = 'localhost'\n", "metrics.addr: must be HOST:PORT"),
    ("[[routes]]\ntopic = 'site/+/x'\nstream = 'site_telemetry'\ndevice_kind = 'x'\n",
     "routes[0].topic: must name the segments {site} and {device}"),
    ("[[routes]]\ntopic = 'a/{site}/{device}'\nstream = 'nope'\ndevice_kind = 'x'\n",
     "routes[0].stream: Input should be 'site_telemetry'"),
    ("[ingest\n", "not valid TOML"),
    ("[mqtt]\nshared_group = 'a/b'\n", "mqtt.shared_group: String should match pattern"),
    ("instance = 100\n", "instance: Input should be less than or equal to 99"),
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


# --- where the configuration and the secrets come from ----------------------------------


def bmsd(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bmsd", *args], capture_output=True,
                          text=True, check=False, timeout=60, cwd=cwd, env=env)


def clean_env(**extra: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items()
            if not k.startswith(("BMSD_", "CREDENTIALS_DIRECTORY", "JOURNAL_STREAM"))}
    return {**keep, **extra}


def test_the_file_comes_from_bmsd_config_and_check_config_shows_what_is_in_effect(
    tmp_path: Path,
) -> None:
    path = tmp_path / "site.toml"
    path.write_text("[database]\nurl = 'postgresql://bmsd:hunter2@db.example:5432/bmsd'\n"
                    "[ingest]\nmax_batch_rows = 77\n")
    run = bmsd("check-config", env=clean_env(BMSD_CONFIG=str(path)), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"# {path}: configuration is valid")
    assert "max_batch_rows = 77" in run.stdout
    assert "postgresql://bmsd:***@db.example:5432/bmsd" in run.stdout
    assert "hunter2" not in run.stdout + run.stderr


def test_without_any_file_the_built_in_defaults_apply(tmp_path: Path) -> None:
    run = bmsd("check-config", env=clean_env(), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    if not SYSTEM_CONFIG_PATH.exists():
        assert run.stdout.startswith("# built-in defaults")
    example = bmsd("check-config", "--example", env=clean_env(), cwd=tmp_path)
    assert example.stdout == SHIPPED.read_text()


def test_passwords_come_from_a_file_or_a_systemd_credential(tmp_path: Path) -> None:
    secret = tmp_path / "db-password"
    secret.write_text("s3cret-from-file\n")
    path = tmp_path / "bmsd.toml"
    path.write_text(f"[database]\nurl = 'postgresql://bmsd@db/bmsd'\npassword_file = '{secret}'\n"
                    "[mqtt]\nurl = 'mqtt://bmsd@broker:1883'\n")
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "bmsd-mqtt-password").write_text("s3cret-credential")
    config = load_config(path, environ={"CREDENTIALS_DIRECTORY": str(credentials)})
    assert config.database.password is not None
    assert config.database.password.get_secret_value() == "s3cret-from-file"
    assert connect_kwargs(config.database, "t")["password"] == "s3cret-from-file"
    assert config.mqtt.password is not None
    assert config.mqtt.password.get_secret_value() == "s3cret-credential"
    shown = describe(config) + repr(config)
    assert "s3cret" not in shown

    # The unit's credential wins over the file (root reads the file by hand).
    (credentials / "bmsd-database-password").write_text("s3cret-db-credential")
    config = load_config(path, environ={"CREDENTIALS_DIRECTORY": str(credentials)})
    assert config.database.password is not None
    assert config.database.password.get_secret_value() == "s3cret-db-credential"

    # A password in the URL wins; an empty file means none.
    secret.write_text("")
    assert load_config(path, environ={}).database.password is None


@pytest.mark.parametrize("problem", ["missing", "unreadable"])
def test_a_secret_file_that_cannot_be_read_is_one_clear_line_and_exit_2(
    tmp_path: Path, problem: str
) -> None:
    secret = tmp_path / "db-password"
    if problem == "unreadable":
        secret.mkdir()  # reading a folder fails for root too
    path = tmp_path / "bmsd.toml"
    path.write_text(f"[database]\npassword_file = '{secret}'\n")
    run = bmsd("check-config", "--config", str(path), env=clean_env(), cwd=tmp_path)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert f"[database] password_file = {secret}" in lines[0]
    assert "Traceback" not in run.stderr


def test_a_password_key_is_refused_with_advice(tmp_path: Path) -> None:
    path = tmp_path / "bmsd.toml"
    path.write_text("[mqtt]\npassword = 'x'\n")
    with pytest.raises(ConfigError, match="put the password in a file and name it with"
                                          " password_file"):
        load_config(path, environ={})


def test_version() -> None:
    run = subprocess.run([sys.executable, "-m", "bmsd", "--version"], capture_output=True,
                         text=True, check=True, timeout=60)
    assert run.stdout.strip() == f"bmsd {version('bmsd')}"


def test_an_instance_gets_its_own_client_id_and_metrics_port(tmp_path: Path) -> None:
    path = tmp_path / "bmsd.toml"
    path.write_text('[mqtt]\nshared_group = "fleet"\n')
    config = load_config(path, environ={"BMSD_INSTANCE": "2"})
    assert config.mqtt.shared_group == "fleet"
    assert config.mqtt.client_id == "bmsd-2"
    assert config.metrics.addr == "127.0.0.1:29110"
    with pytest.raises(ConfigError, match=r"instance \(from \$BMSD_INSTANCE\): Input should"
                                          " be a valid integer"):
        load_config(path, environ={"BMSD_INSTANCE": "blue"})


def test_a_password_in_the_query_string_is_redacted_too() -> None:
    url = "postgresql://ingest@db:5432/bmsd?sslmode=require&password=s3cr%26t&application_name=x"
    redacted = redact_url(url)
    assert "s3cr" not in redacted
    assert redacted == ("postgresql://ingest@db:5432/bmsd?sslmode=require&password=***"
                        "&application_name=x")


def test_check_config_prints_no_password_of_a_query_string(tmp_path: Path) -> None:
    path = tmp_path / "bmsd.toml"
    path.write_text("[database]\nurl = 'postgresql://ingest@db/bmsd?password=s3cret'\n")
    run = bmsd("check-config", "--config", str(path), env=clean_env(), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "s3cret" not in run.stdout + run.stderr
    assert "password=***" in run.stdout


@pytest.mark.parametrize("problem", ["missing", "invalid"])
def test_check_config_refuses_the_rules_file_that_run_would_refuse(
    tmp_path: Path, problem: str,
) -> None:
    rules = tmp_path / "alerts.toml"
    if problem == "invalid":
        rules.write_text("[[rule]]\nthis is not toml\n")
    path = tmp_path / "bmsd.toml"
    path.write_text(f"[alerts]\nrules_file = '{rules}'\n")
    run = bmsd("check-config", "--config", str(path), env=clean_env(), cwd=tmp_path)
    assert run.returncode == 2
    assert str(rules) in run.stderr
    assert "Traceback" not in run.stderr


def test_a_config_path_naming_a_folder_is_one_line_and_exit_2(tmp_path: Path) -> None:
    run = bmsd("check-config", "--config", str(tmp_path), env=clean_env(), cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr.strip() == f"bmsd check-config: {tmp_path}: is a folder; name the file itself"


def test_relative_paths_are_relative_to_the_config_file_not_the_current_folder(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "db-password").write_text("from-the-file\n")
    path = folder / "bmsd.toml"
    path.write_text("[database]\npassword_file = 'db-password'\n"
                    "[alerts]\nrules_file = 'rules/alerts.toml'\n")
    config = load_config(path, environ={})
    assert config.alerts.rules_file == folder / "rules" / "alerts.toml"
    assert config.database.password is not None
    assert config.database.password.get_secret_value() == "from-the-file"


def test_an_error_in_an_environment_override_names_the_variable_not_the_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "bmsd.toml"
    path.write_text("[ingest]\nmax_batch_rows = 100\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={"BMSD_MQTT_URL": "http://broker:1883"})
    message = str(caught.value)
    assert message.startswith("the environment: 1 error(s)")
    assert "mqtt.url (from $BMSD_MQTT_URL): must start with mqtt://" in message
    assert str(path) not in message


def test_the_example_names_every_key_of_the_models() -> None:
    # Keys set, or shown commented out ("# key = value"), in each section of the
    # shipped example, against the fields of the model behind that section.
    named: dict[str, set[str]] = {}
    section = ""
    for line in SHIPPED.read_text().splitlines():
        if header := re.match(r"^\[\[?(\w+)\]\]?", line):
            section = header[1]
        elif key := re.match(r"^#? ?(\w+) = ", line):
            named.setdefault(section, set()).add(key[1])
    expected: dict[str, set[str]] = {}
    for name, field in Config.model_fields.items():
        model = field.annotation
        if name == "routes":
            model = RouteConfig
        if isinstance(model, type) and issubclass(model, BaseModel):
            expected[name] = {k for k, f in model.model_fields.items() if not f.exclude}
        else:
            expected.setdefault("", set()).add(name)
    assert {k: sorted(v) for k, v in named.items()} == {k: sorted(v) for k, v in
                                                       expected.items()}




@pytest.mark.parametrize("case", ["defaults", "example", "everything", "instance"])
def test_check_config_output_reads_back_as_the_same_configuration(
    tmp_path: Path, case: str
) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "db").write_text("s3cret-db\n")
    (tmp_path / "rules.toml").write_text(SHIPPED_RULES.read_text())
    texts = {
        "defaults": "",
        "example": SHIPPED.read_text(),
        "everything": (
            'log_format = "json"\nlog_level = "debug"\n'
            '[database]\nurl = "postgresql://bmsd_app@db.example:6432/fleet?sslmode=require"\n'
            'password_file = "secrets/db"\nstatement_timeout_ms = 5000\n'
            '[migrate]\nuser = "bmsd_owner"\n'
            '[mqtt]\nurl = "mqtts://bmsd@broker.example:8883"\nshared_group = "g1"\n'
            'protocol = "5"\nca_file = "secrets/ca.pem"\n'
            '[ingest]\nmax_batch_rows = 777\nauto_register = false\n'
            'default_timezone = "Europe/Berlin"\n'
            '[alerts]\nrules_file = "rules.toml"\nmqtt_url = "mqtt://other:1883"\n'
            '[metrics]\naddr = "0.0.0.0:9999"\n'
            '[[routes]]\ntopic = "plant/{site}/{device}/e"\nstream = "energy_readings"\n'
            'device_kind = "meter"\noffline_after_s = 120\n'),
        "instance": '[metrics]\naddr = "127.0.0.1:29200"\n',
    }
    path = tmp_path / "bmsd.toml"
    path.write_text(texts[case])
    env = clean_env(BMSD_INSTANCE="3") if case == "instance" else clean_env()
    shown = bmsd("check-config", "--config", str(path), env=env, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    again = tmp_path / "again.toml"
    again.write_text(shown.stdout)
    first = load_config(path, environ={k: v for k, v in env.items() if k.startswith("BMSD_")})
    second = load_config(again, environ={})
    # The instance's client id and port are shown as applied, the number as a comment.
    assert second == first.model_copy(update={"instance": None})
    if case == "instance":
        assert second.mqtt.client_id == "bmsd-3"
        assert second.metrics.port == 29203
    # And it passes check-config itself.
    assert bmsd("check-config", "--config", str(again), env=clean_env(),
                cwd=tmp_path).returncode == 0
