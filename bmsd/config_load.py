"""Load and validate bmsd's configuration, once, at start-up.

The file is the first of: ``--config``, ``$BMSD_CONFIG``,
``/etc/bmsd/bmsd.toml``; with none, the built-in defaults. A few endpoints
come from the environment and override it (``BMSD_DATABASE_URL``,
``BMSD_MQTT_URL``, ``BMSD_METRICS_ADDR``, and ``BMSD_INSTANCE``, which
bmsd@N.service sets). Passwords, where the URL has none, come from the
systemd credential ``bmsd-database-password`` / ``bmsd-migrate-password`` /
``bmsd-mqtt-password`` (``LoadCredential=``, read from
``$CREDENTIALS_DIRECTORY``), else from a ``password_file`` key, else libpq's
own ``PGPASSFILE`` and service files for the database; each command reads
only the passwords it uses (`load_config`'s *secrets*). Everything is parsed
into frozen pydantic models that are passed down. The configuration comes
from here only; what systemd itself hands a service (``NOTIFY_SOCKET``,
``WATCHDOG_USEC``, ``JOURNAL_STREAM``) is read where it is used.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import SecretStr, ValidationError

from bmsd.config import Config, DatabaseConfig, MigrateConfig, MqttConfig
from bmsd.config_text import explain, read_toml
from bmsd.errors import ConfigError

SYSTEM_CONFIG_PATH = Path("/etc/bmsd/bmsd.toml")

_ENV_OVERRIDES: dict[str, tuple[str, str]] = {
    "BMSD_DATABASE_URL": ("database", "url"),
    "BMSD_MQTT_URL": ("mqtt", "url"),
    "BMSD_METRICS_ADDR": ("metrics", "addr"),
}
#: Top-level keys the environment may set.
_ENV_TOP: dict[str, str] = {"BMSD_INSTANCE": "instance"}


def find_config(path: Path | None, environ: Mapping[str, str] | None = None) -> Path | None:
    """Return the config file to read: *path*, ``$BMSD_CONFIG``, the system one, or None."""
    environ = os.environ if environ is None else environ
    if path is not None:
        return path
    if environ.get("BMSD_CONFIG"):
        return Path(environ["BMSD_CONFIG"])
    return SYSTEM_CONFIG_PATH if SYSTEM_CONFIG_PATH.exists() else None


#: The sections with a password, each read only by the commands that use it.
Secret = Literal["database", "migrate", "mqtt"]
RUN_SECRETS: tuple[Secret, ...] = ("database", "mqtt")


def load_config(
    path: Path | None = None, environ: Mapping[str, str] | None = None,
    secrets: Collection[Secret] = RUN_SECRETS,
) -> Config:
    """Read a TOML file (optional), apply environment overrides, read the passwords of
    the *secrets* sections (those the command uses), and validate.

    Raise `ConfigError` naming the file and the key at fault.
    """
    environ = os.environ if environ is None else environ
    raw: dict[str, object] = {}
    source = "built-in defaults"
    if path is not None:
        source = str(path)
        raw = read_toml(path, "no such config file; pass --config PATH, or copy the example"
                              " (bmsd check-config --example > PATH)")
    set_by: dict[tuple[str, ...], str] = {}  # key -> the environment variable that set it
    for var, (section, key) in _ENV_OVERRIDES.items():
        if environ.get(var):
            table = raw.setdefault(section, {})
            if not isinstance(table, dict):
                raise ConfigError(f"{source}: [{section}] must be a table")
            table[key] = environ[var]
            set_by[(section, key)] = var
    for var, key in _ENV_TOP.items():
        if environ.get(var):
            raw[key] = environ[var]
            set_by[(key,)] = var
    if path is not None:
        _resolve_paths(raw, path.parent)
    for section in ("database", "migrate", "mqtt"):
        table = raw.get(section)
        if isinstance(table, dict) and "password" in table:
            raise ConfigError(f"{source}: [{section}] password: not a key; put the password"
                              " in a file and name it with password_file")
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(explain(source, "the configuration", exc, "config/bmsd.toml",
                                  set_by)) from exc
    config = _with_passwords(config, secrets, source, environ)
    return _as_instance(config) if config.instance is not None else config


#: Keys naming files: relative to the config file's folder, not to where bmsd started.
_PATH_KEYS = {"database": ("password_file",), "migrate": ("password_file",),
              "mqtt": ("password_file", "ca_file", "cert_file", "key_file"),
              "alerts": ("rules_file",)}


def _resolve_paths(raw: dict[str, object], folder: Path) -> None:
    """Make the relative file paths in *raw* relative to *folder* (the config file's)."""
    for section, keys in _PATH_KEYS.items():
        table = raw.get(section)
        if not isinstance(table, dict):
            continue
        for key in keys:
            value = table.get(key)
            if isinstance(value, str) and value and not Path(value).is_absolute():
                table[key] = str(folder / value)


def _as_instance(config: Config) -> Config:
    """Return *config* for instance N: its own client id (and so its own session and
    instance lock) and its own metrics port."""
    n = config.instance
    port = config.metrics.port + (n or 0)
    if port > 65535:
        raise ConfigError(f"instance {n}: metrics port {port} is past 65535; lower the port"
                          " of [metrics] addr")
    return config.model_copy(update={
        "mqtt": config.mqtt.model_copy(update={"client_id": f"{config.mqtt.client_id}-{n}"}),
        "metrics": config.metrics.model_copy(
            update={"addr": f"{config.metrics.addr.rpartition(':')[0]}:{port}"}),
    })


def _with_passwords(config: Config, secrets: Collection[Secret], source: str,
                    environ: Mapping[str, str]) -> Config:
    """Return *config* with the passwords of the *secrets* sections read."""
    wanted = set(secrets)
    if "migrate" in wanted and config.migrate.user is None:
        credentials = environ.get("CREDENTIALS_DIRECTORY")
        if credentials and (Path(credentials) / "bmsd-migrate-password").exists():
            raise ConfigError(f"{source}: [migrate] user is not set, but the systemd"
                              " credential bmsd-migrate-password is given: set user to the"
                              " login that owns the schema (docs/operations.md, 'Install as"
                              " a service')")
        wanted = (wanted - {"migrate"}) | {"database"}  # migrate as the daemon's login
    update: dict[str, object] = {}
    if "database" in wanted:
        update["database"] = _with_password(config.database, config.database.url, "database",
                                            source, environ)
    if "migrate" in wanted:
        update["migrate"] = _with_password(config.migrate, config.migrate_database.url,
                                           "migrate", source, environ)
    if "mqtt" in wanted:
        update["mqtt"] = _with_password(config.mqtt, config.mqtt.url, "mqtt", source, environ)
    return config.model_copy(update=update)


_WithPassword = TypeVar("_WithPassword", "DatabaseConfig", "MigrateConfig", "MqttConfig")


def _with_password(section: _WithPassword, url: str, name: str, source: str,
                   environ: Mapping[str, str]) -> _WithPassword:
    """Return *section* with its password read from its file or systemd credential."""
    if urlsplit(url).password is not None:
        return section
    path, where = section.password_file, f"{source}: [{name}] password_file"
    # The unit's credential first: one file can name the same password_file
    # that root's commands read by hand and that the unit passes as a credential.
    if environ.get("CREDENTIALS_DIRECTORY"):
        candidate = Path(environ["CREDENTIALS_DIRECTORY"]) / f"bmsd-{name}-password"
        if candidate.exists():
            path, where = candidate, f"systemd credential bmsd-{name}-password"
    if path is None:
        return section
    try:
        secret = path.read_text(encoding="utf-8").rstrip("\r\n")
    except FileNotFoundError:
        raise ConfigError(f"{where} = {path}: no such file; create it (mode 0600, the"
                          " password on one line) or remove the key") from None
    except OSError as exc:
        raise ConfigError(f"{where} = {path}: cannot read it ({exc.strerror}); bmsd's user"
                          " must be able to read it") from None
    if not secret:
        return section
    return section.model_copy(update={"password": SecretStr(secret)})


