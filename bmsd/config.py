"""What bmsd can be configured with: every section's frozen model, its defaults and
its checks. `bmsd/config_load.py` reads them from the file, the environment
and the password files; `bmsd/config_text.py` prints them back.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import quote, unquote, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from bmsd.logs import LogFormat
from bmsd.streams import BY_NAME, SPECS, Stream

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
    # A reading older than its device's newest evaluated one has the device's
    # history evaluated again from it, back to this far behind the newest;
    # older ones are stored, not evaluated (docs/alerts.md).
    reevaluate_window_s: PositiveInt = 21_600
    # An alert stored more than this after the reading that raised it is
    # marked raised_late (a gateway's buffer, a backlog).
    late_after_s: PositiveInt = 300
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
    RouteConfig(topic=spec.topic, stream=spec.name, device_kind=spec.device_kind)
    for spec in SPECS)


class SparkplugField(_Frozen):
    """Where a Sparkplug metric goes: a field of the stream, its value times *scale*."""

    field: str
    scale: float = 1.0


class SparkplugMap(_Frozen):
    """Which Sparkplug edge nodes and devices are which bmsd sites and devices, and which
    of their metrics are which fields (docs/sparkplug.md). Patterns are shell-style;
    templates name {group}, {edge_node} and {device} (the edge node's own metrics
    have device "")."""

    group: str = "*"
    edge_node: str = "*"
    device: str = "*"
    site: str = "{edge_node}"
    name: str = "{device}"  # the device's slug; the edge node's own: its name
    stream: Stream | None = None
    device_kind: str = "sparkplug"
    metrics: dict[str, str | SparkplugField] = {}

    @model_validator(mode="after")
    def _fields(self) -> SparkplugMap:
        if self.metrics and self.stream is None:
            raise ValueError("metrics map to fields of a stream: name it (stream = ...)")
        if self.stream is not None:
            columns = BY_NAME[self.stream].model.columns
            for metric, to in self.metrics.items():
                name = to if isinstance(to, str) else to.field
                if name not in columns:
                    raise ValueError(f"metric {metric!r}: {self.stream} has no field {name!r};"
                                     f" its fields: {', '.join(columns)}")
        return self


class SparkplugConfig(_Frozen):
    """bmsd as a Sparkplug B host application (off unless enabled)."""

    enabled: bool = False
    groups: tuple[Annotated[str, Field(pattern=r"^[^/+#]+$")], ...] = ()  # () : every group
    host_id: Annotated[str, Field(pattern=r"^[^/+#]+$")] = "bmsd"
    primary_host: bool = True
    reorder_timeout_s: Annotated[float, Field(gt=0)] = 2.0
    rebirth_min_interval_s: Annotated[float, Field(ge=0)] = 10.0
    map: tuple[SparkplugMap, ...] = ()


class Config(_Frozen):
    """The whole configuration of one bmsd process."""

    database: DatabaseConfig = DatabaseConfig()
    migrate: MigrateConfig = MigrateConfig()
    mqtt: MqttConfig = MqttConfig()
    ingest: IngestConfig = IngestConfig()
    metrics: MetricsConfig = MetricsConfig()
    alerts: AlertsConfig = AlertsConfig()
    routes: tuple[RouteConfig, ...] = DEFAULT_ROUTES
    sparkplug: SparkplugConfig = SparkplugConfig()
    # One of several instances on a host (bmsd@N.service sets BMSD_INSTANCE=N):
    # client id <client_id>-N, metrics port <addr's port>+N.
    instance: Annotated[int, Field(ge=1, le=99)] | None = None
    log_format: LogFormat = "auto"
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
