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
import re
import tomllib
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import quote, unquote, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from bmsd.errors import ConfigError
from bmsd.streams import SPECS, Stream

SYSTEM_CONFIG_PATH = Path("/etc/bmsd/bmsd.toml")
DEFAULT_DATABASE_URL = "postgresql://127.0.0.1:5432/bmsd"
DEFAULT_MQTT_URL = "mqtt://127.0.0.1:1883"
DEFAULT_METRICS_ADDR = "127.0.0.1:29108"


PositiveInt = Annotated[int, Field(gt=0)]

#: The oldest reading accepted by default: the raw retention of sql/120. The
#: daemon also caps it at each hypertable's actual retention; late readings
#: reach the aggregates through sql/170's backlog job.
DEFAULT_MAX_READING_AGE_S = 90 * 24 * 3600


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DatabaseConfig(_Frozen):
    """Where the database is and how connections behave."""

    url: str = DEFAULT_DATABASE_URL
    # Read at start-up when the URL has no password (module docstring).
    password_file: Path | None = None
    password: SecretStr | None = Field(default=None, exclude=True)
    connect_timeout_s: PositiveInt = 5
    statement_timeout_ms: PositiveInt = 30_000
    # The client gives up on one operation (a batch's whole transaction)
    # after this long, closes the connection and retries (bmsd/database.py).
    operation_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    idle_in_transaction_timeout_ms: PositiveInt = 60_000
    # TCP keepalives and tcp_user_timeout, set on both ends of every
    # connection: the server frees a dead bmsd's sessions and locks within
    # dead_peer_bound_s (docs/failures.md, "Failure behaviour").
    keepalives_idle_s: PositiveInt = 10
    keepalives_interval_s: PositiveInt = 5
    keepalives_count: PositiveInt = 3
    tcp_user_timeout_ms: PositiveInt = 30_000
    retry_max_backoff_s: Annotated[float, Field(gt=0)] = 30.0

    @field_validator("url")
    @classmethod
    def _postgres_url(cls, value: str) -> str:
        if urlsplit(value).scheme not in ("postgresql", "postgres"):
            raise ValueError("must start with postgresql:// (e.g. postgresql://user@host:5432/db)")
        return value

    @model_validator(mode="after")
    def _operation_outlasts_a_statement(self) -> DatabaseConfig:
        if self.operation_timeout_s * 1000 <= self.statement_timeout_ms:
            raise ValueError("operation_timeout_s must be longer than statement_timeout_ms")
        return self

    @property
    def dead_peer_bound_s(self) -> float:
        """Return how long the server keeps the session of a peer that stopped answering."""
        idle = self.keepalives_idle_s + self.keepalives_interval_s * self.keepalives_count
        return float(max(idle, self.tcp_user_timeout_ms / 1000))


class MigrateConfig(_Frozen):
    """Who applies the schema (``bmsd migrate``, ``bmsd create-login``): its owner.

    The daemon's login (member of bmsd_ingest) may not change the schema;
    this one owns the database and may create roles. It connects where
    ``[database]`` says, with the same timeouts.
    """

    # None: migrate as [database]'s own login (one login for everything).
    user: Annotated[str, Field(min_length=1, max_length=63)] | None = None
    password_file: Path | None = None
    password: SecretStr | None = Field(default=None, exclude=True)


class MqttConfig(_Frozen):
    """Where the broker is and how the session is kept."""

    url: str = DEFAULT_MQTT_URL
    password_file: Path | None = None
    password: SecretStr | None = Field(default=None, exclude=True)
    client_id: Annotated[str, Field(min_length=1, max_length=64)] = "bmsd"
    # Several bmsd share one fleet: every route is subscribed as
    # $share/<group>/<filter>, and the broker hands each message to one member.
    shared_group: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] | None = None
    # 3.1.1 drains ~35 % faster with paho-mqtt (no per-message properties to
    # parse; docs/failures.md, "MQTT 5 or 3.1.1"); 5 lets the client set its own window.
    protocol: Literal["5", "3.1.1"] = "3.1.1"
    qos: Literal[1] = 1
    session_expiry_s: PositiveInt = 7 * 24 * 3600
    keepalive_s: PositiveInt = 30
    # The in-flight window: MQTT 5 announces it to the broker (Receive
    # Maximum); with 3.1.1 it must equal the broker's max_inflight_messages.
    receive_maximum: Annotated[int, Field(ge=1, le=65535)] = 1000
    reconnect_max_backoff_s: Annotated[float, Field(gt=0)] = 30.0
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @field_validator("url")
    @classmethod
    def _mqtt_url(cls, value: str) -> str:
        return _check_mqtt_url(value)


def _check_mqtt_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ValueError("must start with mqtt:// or mqtts:// (e.g. mqtt://host:1883)")
    if not parts.hostname:
        raise ValueError("has no host (e.g. mqtt://127.0.0.1:1883)")
    return value


class IngestConfig(_Frozen):
    """How readings are validated, batched and written."""

    max_batch_rows: PositiveInt = 20000
    flush_interval_ms: PositiveInt = 200
    # Commit once no received message waits and the batch is this old (group
    # commit: at low load a message waits about this long plus one round trip;
    # under load batches grow while a commit runs). At flush_interval_ms or more,
    # batches wait for the timer or a full window.
    idle_flush_ms: Annotated[int, Field(ge=0)] = 5
    max_message_bytes: PositiveInt = 256 * 1024
    # Received messages waiting for the ingest loop (bmsd/ingest/inbox.py), besides
    # at most 16 MiB of their payloads. A broker that sends more than this (a
    # window above it) waits until the loop takes some: backpressure, never a stall.
    max_waiting_messages: PositiveInt = 2000
    max_reading_age_s: PositiveInt = DEFAULT_MAX_READING_AGE_S
    max_future_s: PositiveInt = 300
    auto_register: bool = True
    max_new_devices_per_site_per_minute: PositiveInt = 100
    default_organization: str = "default"
    default_timezone: str = "UTC"
    default_grid_frequency_hz: Literal[50, 60] = 50
    shutdown_timeout_s: Annotated[float, Field(gt=0)] = 10.0


class AlertsConfig(_Frozen):
    """Inline alert evaluation."""

    enabled: bool = True
    rules_file: Path | None = None  # default: the shipped config/alerts.toml
    mqtt_prefix: str | None = "bmsd/alerts"  # "" turns publishing off
    # The broker notifications go to, over a connection of their own; default
    # [mqtt] url (the same credentials and TLS files are used).
    mqtt_url: str | None = None
    limits_refresh_s: PositiveInt = 60
    offline_check_s: PositiveInt = 5
    # Notifications the broker has not acknowledged yet, above which no new
    # readings are taken (memory stays bounded; none is dropped).
    max_pending_notifications: PositiveInt = 10_000

    @field_validator("mqtt_url")
    @classmethod
    def _mqtt_url(cls, value: str | None) -> str | None:
        return _check_mqtt_url(value) if value else None


class MetricsConfig(_Frozen):
    """Where the Prometheus endpoint listens."""

    addr: str = DEFAULT_METRICS_ADDR

    @field_validator("addr")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:29108")
        return value

    @property
    def host(self) -> str:
        return self.addr.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.addr.rpartition(":")[2])


_SEGMENT = re.compile(r"\{([a-z_]+)\}")


class RouteConfig(_Frozen):
    """A topic template with named segments, and the stream it feeds."""

    topic: str
    stream: Stream
    device_kind: str
    offline_after_s: PositiveInt | None = None

    @field_validator("topic")
    @classmethod
    def _template(cls, value: str) -> str:
        levels = value.split("/")
        names = [m.group(1) for level in levels for m in [_SEGMENT.fullmatch(level)] if m]
        if sorted(names) != ["device", "site"]:
            raise ValueError(
                "must name the segments {site} and {device} once each, "
                "e.g. 'site/{site}/{device}/telemetry'"
            )
        for level in levels:
            if not _SEGMENT.fullmatch(level) and ("{" in level or "+" in level or "#" in level):
                raise ValueError(f"level {level!r}: use a whole {{name}} segment, not wildcards")
        return value


DEFAULT_ROUTES: tuple[RouteConfig, ...] = tuple(
    RouteConfig(topic=spec.topic, stream=spec.name, device_kind=spec.device_kind)  # type: ignore[arg-type]
    for spec in SPECS)


class Config(_Frozen):
    """The whole configuration of one bmsd process."""

    database: DatabaseConfig = DatabaseConfig()
    migrate: MigrateConfig = MigrateConfig()
    mqtt: MqttConfig = MqttConfig()
    ingest: IngestConfig = IngestConfig()
    metrics: MetricsConfig = MetricsConfig()
    alerts: AlertsConfig = AlertsConfig()
    routes: tuple[RouteConfig, ...] = DEFAULT_ROUTES
    # One of several instances on a host (bmsd@N.service sets BMSD_INSTANCE=N):
    # client id <client_id>-N, metrics port <addr's port>+N.
    instance: Annotated[int, Field(ge=1, le=99)] | None = None
    log_format: Literal["auto", "json", "console", "journal"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @property
    def migrate_database(self) -> DatabaseConfig:
        """Return the connection ``bmsd migrate`` uses: [database]'s, as [migrate]'s login."""
        if self.migrate.user is None:
            return self.database
        parts = urlsplit(self.database.url)
        host = parts.netloc.rpartition("@")[2]
        query = "&".join(item for item in parts.query.split("&")  # the daemon's login's
                         if unquote(item.partition("=")[0]) not in ("user", "password"))
        url = parts._replace(netloc=f"{quote(self.migrate.user, safe='')}@{host}",
                             query=query).geturl()
        return self.database.model_copy(update={"url": url, "password": self.migrate.password,
                                                "password_file": self.migrate.password_file})

    @model_validator(mode="after")
    def _distinct_topics(self) -> Config:
        seen: set[str] = set()
        for route in self.routes:
            if route.topic in seen:
                raise ValueError(f"route topic {route.topic!r} is listed twice")
            seen.add(route.topic)
        return self


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


def describe(config: Config) -> str:
    """Return the effective configuration as TOML, every secret redacted.

    Read back, it gives the same configuration (but for the redacted
    passwords): unset keys are shown commented out.
    """
    lines: list[str] = []
    data = config.model_dump(mode="json", exclude={"routes"})
    for key, value in data.items():
        if key == "instance" and value is not None:  # already applied to what follows
            lines.append(f"# instance = {value}: its client id and metrics port are below")
        elif not isinstance(value, dict):
            lines.append(_toml_line(key, value))
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"\n[{key}]")
            section = getattr(config, key)
            for name, item in value.items():
                if name.endswith("url") and item:
                    item = redact_url(item)
                lines.append(_toml_line(name, item))
            if getattr(section, "password", None) is not None:
                lines.append("# password: read from its file or credential, not shown")
    for route in config.routes:
        lines.append("\n[[routes]]")
        lines += [_toml_line(k, v) for k, v in route.model_dump(mode="json").items()
                  if v is not None]
    return "\n".join(lines)


def _toml_line(key: str, value: object) -> str:
    if value is None:
        return f"# {key} is not set"
    if isinstance(value, bool):
        return f"{key} = {'true' if value else 'false'}"
    if isinstance(value, int | float):
        return f"{key} = {value}"
    return f"{key} = " + '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def read_toml(path: Path, missing: str) -> dict[str, Any]:
    """Read a TOML file; raise ConfigError saying what is wrong with it (*missing*: if absent)."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: {missing}") from None
    except PermissionError:
        raise ConfigError(f"{path}: not readable by this user; check its owner and mode"
                          ) from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder; name the file itself") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


def explain(source: str, what: str, exc: ValidationError, example: str,
            set_by: Mapping[tuple[str, ...], str] | None = None) -> str:
    """Return a validation error as lines a person can act on: file (or environment
    variable, *set_by* a key), key, what is wrong."""
    set_by = set_by or {}
    blamed = [set_by.get(tuple(str(p) for p in err["loc"][:2])) for err in exc.errors()]
    if all(blamed):  # nothing from the file is at fault
        source = "the environment"
    lines = [f"{source}: {exc.error_count()} error(s) in {what}:"]
    for err, var in zip(exc.errors(), blamed, strict=True):
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if var:
            where = f"{where} (from ${var})"
        # An array of tables reads as name[index]: routes[0].topic, rules[2].code.
        where = re.sub(r"^(\w+)\.(\d+)(?=\.|$)", r"\1[\2]", where)
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = f"unknown key (check its spelling against {example})"
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


_CONNINFO_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)")


def redact_url(url: str) -> str:
    """Return *url* with any password replaced by ``***``, for logs, in every form libpq
    takes: in its user info, ``password=`` among its query parameters, and a
    ``key=value`` conninfo string's ``password``."""
    if "://" not in url:  # libpq's key=value form: password=secret or password='se cret'
        return _CONNINFO_PASSWORD.sub(r"\1***", url)
    parts = urlsplit(url)
    netloc, query = parts.netloc, parts.query
    if parts.password is not None:
        netloc = netloc.replace(f":{parts.password}@", ":***@", 1)
    if query:
        query = "&".join("password=***" if unquote(item.partition("=")[0]) == "password"
                         else item for item in query.split("&"))
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return parts._replace(netloc=netloc, query=query).geturl()
