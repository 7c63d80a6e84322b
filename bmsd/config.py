"""Load and validate bmsd's configuration, once, at start-up.

The file is TOML; a few secrets and endpoints come from the environment and
override it (``BMSD_DATABASE_URL``, ``BMSD_MQTT_URL``, ``BMSD_METRICS_ADDR``).
Everything is parsed into frozen pydantic models that are passed down; no
other module reads the environment.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bmsd.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("config/bmsd.toml")
DEFAULT_DATABASE_URL = "postgresql://127.0.0.1:5432/bmsd"
DEFAULT_MQTT_URL = "mqtt://127.0.0.1:1883"
DEFAULT_METRICS_ADDR = "127.0.0.1:29108"

#: The hypertables a route can feed.
Stream = Literal[
    "site_telemetry", "battery_telemetry", "energy_readings", "production_data",
    "environmental_data",
]
STREAMS: tuple[str, ...] = Stream.__args__  # type: ignore[attr-defined]

PositiveInt = Annotated[int, Field(gt=0)]

#: The oldest reading the daemon may be configured to accept. The refresh
#: windows of the aggregates (sql/110_aggregate_policies.sql) start 4 days
#: back, and raw chunks are compressed after 7 days: a reading older than
#: this might miss an aggregate level.
MAX_READING_AGE_LIMIT_S = 3 * 24 * 3600


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DatabaseConfig(_Frozen):
    """Where the database is and how connections behave."""

    url: str = DEFAULT_DATABASE_URL
    pool_min_size: Annotated[int, Field(ge=1)] = 1
    pool_max_size: Annotated[int, Field(ge=1)] = 4
    connect_timeout_s: PositiveInt = 5
    statement_timeout_ms: PositiveInt = 30_000
    retry_max_backoff_s: Annotated[float, Field(gt=0)] = 30.0

    @field_validator("url")
    @classmethod
    def _postgres_url(cls, value: str) -> str:
        if urlsplit(value).scheme not in ("postgresql", "postgres"):
            raise ValueError("must start with postgresql:// (e.g. postgresql://user@host:5432/db)")
        return value


class MqttConfig(_Frozen):
    """Where the broker is and how the session is kept."""

    url: str = DEFAULT_MQTT_URL
    client_id: Annotated[str, Field(min_length=1, max_length=64)] = "bmsd"
    # 3.1.1 drains ~35 % faster with paho-mqtt (no per-message properties to
    # parse; README, "MQTT 5 or 3.1.1"); 5 lets the client set its own window.
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
        parts = urlsplit(value)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ValueError("must start with mqtt:// or mqtts:// (e.g. mqtt://host:1883)")
        if not parts.hostname:
            raise ValueError("has no host (e.g. mqtt://127.0.0.1:1883)")
        return value


class IngestConfig(_Frozen):
    """How readings are validated, batched and written."""

    max_batch_rows: PositiveInt = 5000
    flush_interval_ms: PositiveInt = 200
    max_message_bytes: PositiveInt = 256 * 1024
    max_reading_age_s: Annotated[int, Field(gt=0, le=MAX_READING_AGE_LIMIT_S)] = (
        MAX_READING_AGE_LIMIT_S)
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
    limits_refresh_s: PositiveInt = 60
    offline_check_s: PositiveInt = 5


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


DEFAULT_ROUTES: tuple[RouteConfig, ...] = (
    RouteConfig(topic="site/{site}/{device}/telemetry", stream="site_telemetry",
                device_kind="site_controller"),
    RouteConfig(topic="site/{site}/{device}/battery", stream="battery_telemetry",
                device_kind="battery_pack"),
    RouteConfig(topic="factory/{site}/{device}/energy", stream="energy_readings",
                device_kind="meter"),
    RouteConfig(topic="factory/{site}/{device}/production", stream="production_data",
                device_kind="machine"),
    RouteConfig(topic="factory/{site}/{device}/environment", stream="environmental_data",
                device_kind="sensor"),
)


class Config(_Frozen):
    """The whole configuration of one bmsd process."""

    database: DatabaseConfig = DatabaseConfig()
    mqtt: MqttConfig = MqttConfig()
    ingest: IngestConfig = IngestConfig()
    metrics: MetricsConfig = MetricsConfig()
    alerts: AlertsConfig = AlertsConfig()
    routes: tuple[RouteConfig, ...] = DEFAULT_ROUTES
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

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


def load_config(
    path: Path | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """Read a TOML file (optional), apply environment overrides, and validate.

    Raise `ConfigError` naming the file and the key at fault.
    """
    environ = os.environ if environ is None else environ
    raw: dict[str, object] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(
                f"{path}: no such config file; pass --config PATH or copy config/bmsd.toml"
            ) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    for var, (section, key) in _ENV_OVERRIDES.items():
        if environ.get(var):
            table = raw.setdefault(section, {})
            if not isinstance(table, dict):
                raise ConfigError(f"{source}: [{section}] must be a table")
            table[key] = environ[var]
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_explain(source, exc)) from exc


def _explain(source: str, exc: ValidationError) -> str:
    lines = [f"{source}: {exc.error_count()} error(s) in the configuration:"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if where.startswith("routes."):
            where = "routes[" + where.removeprefix("routes.").replace(".", "].", 1)
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown key (check its spelling against config/bmsd.toml)"
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


def redact_url(url: str) -> str:
    """Return *url* with any password replaced by ``***``, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()
