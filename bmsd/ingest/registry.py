"""Resolve site and device slugs to device ids, registering new ones on first sight.

The cache is filled lazily and never forgets a known device. Registration
is capped per site and minute (``ingest.max_new_devices_per_site_per_minute``,
also the cap on new sites per minute), so a flood of made-up topics cannot
grow the tables or this cache faster than that.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg
from psycopg.types.json import Jsonb

from bmsd.config import IngestConfig
from bmsd.errors import DatabaseError

_FIND_DEVICE = """
    SELECT d.id FROM devices d JOIN sites s ON s.id = d.site_id
     WHERE s.slug = %(site)s AND d.slug = %(device)s
"""
_FIND_SITE = "SELECT id FROM sites WHERE slug = %(site)s"
_ADD_ORGANIZATION = """
    INSERT INTO organizations (slug, name) VALUES (%(org)s, %(org)s)
    ON CONFLICT (slug) DO NOTHING
"""
_ADD_SITE = """
    INSERT INTO sites (organization_id, slug, name, kind, timezone, nominal_grid_frequency_hz)
    SELECT id, %(site)s, %(site)s, %(site_kind)s, %(timezone)s, %(grid_hz)s
      FROM organizations WHERE slug = %(org)s
    ON CONFLICT (slug) DO NOTHING
"""
_ADD_DEVICE = """
    INSERT INTO devices (site_id, slug, kind)
    SELECT id, %(device)s, %(kind)s FROM sites WHERE slug = %(site)s
    ON CONFLICT (site_id, slug) DO NOTHING
    RETURNING id, site_id
"""
_ADD_EVENT = """
    INSERT INTO events (site_id, device_id, kind, message, details)
    VALUES (%(site_id)s, %(device_id)s, 'device_registered', %(message)s, %(details)s)
"""
_ADD_DEVICE_STREAM = """
    INSERT INTO device_streams (device_id, stream) VALUES (%s, %s)
    ON CONFLICT DO NOTHING
"""
_NEGATIVE_TTL_S = 60.0
_NEGATIVE_MAX = 10_000


@dataclass(frozen=True, slots=True)
class Unresolved:
    """Why a device could not be resolved."""

    category: str
    reason: str


class Registrant(Protocol):
    """A device as a message names it, and what it is registered as on first sight: a
    topic route's match (bmsd/ingest/routing.py), a Sparkplug device
    (bmsd/ingest/sparkplug.py)."""

    @property
    def site(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def stream(self) -> str | None: ...  # its readings' stream; None: it has none
    @property
    def device_kind(self) -> str: ...
    @property
    def site_kind(self) -> str: ...
    @property
    def source(self) -> tuple[str, dict[str, str]]: ...  # how it was seen: said, and as data


class Registry:
    """Device ids by (site, device) slug, backed by the database."""

    def __init__(self, config: IngestConfig,
                 on_register: Callable[[Registrant], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._ids: dict[tuple[str, str], int] = {}
        self._streams: set[tuple[int, str | None]] = set()
        self._unknown: dict[tuple[str, str], float] = {}
        self._recent: dict[str, deque[float]] = {}
        self._on_register = on_register
        self._clock = clock

    def cached(self, match: Registrant) -> int | None:
        """Return the device id of *match* if `resolve` needs no statement for it."""
        device_id = self._ids.get((match.site, match.device))
        if device_id is None or (device_id, match.stream) not in self._streams:
            return None
        return device_id

    def resolve(self, conn: psycopg.Connection[Any], match: Registrant) -> int | Unresolved:
        """Return the device id of *match*, registering it if allowed, and noting its
        stream (device_streams).

        Database errors propagate: the caller retries the whole message.
        """
        key = (match.site, match.device)
        device_id = self._ids.get(key)
        if device_id is None:
            found = self._lookup_or_register(conn, match)
            if isinstance(found, Unresolved):
                return found
            device_id = self._ids[key] = found
        stream_key = (device_id, match.stream)
        if stream_key not in self._streams:
            if match.stream is not None:
                with conn.transaction():
                    conn.execute(_ADD_DEVICE_STREAM, stream_key)
            self._streams.add(stream_key)
        return device_id

    def _lookup_or_register(self, conn: psycopg.Connection[Any],
                            match: Registrant) -> int | Unresolved:
        key = (match.site, match.device)
        now = self._clock()
        if self._unknown.get(key, 0.0) > now:
            return _unknown(match)
        params = {"site": match.site, "device": match.device}
        with conn.transaction():
            row = conn.execute(_FIND_DEVICE, params).fetchone()
        if row is not None:
            return int(row[0])
        if not self._config.auto_register:
            if len(self._unknown) >= _NEGATIVE_MAX:
                self._unknown.clear()
            self._unknown[key] = now + _NEGATIVE_TTL_S
            return _unknown(match)
        return self._register(conn, match, now)

    def _register(self, conn: psycopg.Connection[Any], match: Registrant,
                  now: float) -> int | Unresolved:
        cap = self._config.max_new_devices_per_site_per_minute
        recent = self._recent.setdefault(match.site, deque())
        while recent and recent[0] <= now - 60:
            recent.popleft()
        if len(recent) >= cap:
            return Unresolved("registration_limit", (
                f"site {match.site!r}: more than {cap} new devices in the last minute"
                " (ingest.max_new_devices_per_site_per_minute); device"
                f" {match.device!r} was not registered, its reading is kept here"))
        params = {
            "org": self._config.default_organization, "site": match.site,
            "site_kind": match.site_kind, "timezone": self._config.default_timezone,
            "grid_hz": self._config.default_grid_frequency_hz, "device": match.device,
            "kind": match.device_kind,
        }
        with conn.transaction():
            if conn.execute(_FIND_SITE, params).fetchone() is None:
                sites = self._recent.setdefault("", deque())
                while sites and sites[0] <= now - 60:
                    sites.popleft()
                if len(sites) >= cap:
                    return Unresolved("registration_limit", (
                        f"more than {cap} new sites in the last minute; site {match.site!r}"
                        " was not registered, its reading is kept here"))
                sites.append(now)
                conn.execute(_ADD_ORGANIZATION, params)
                conn.execute(_ADD_SITE, params)
            added = conn.execute(_ADD_DEVICE, params).fetchone()
            if added is None:  # registered concurrently by another bmsd
                row = conn.execute(_FIND_DEVICE, params).fetchone()
                if row is None:  # ON CONFLICT found it, so it exists: the database misbehaves
                    raise DatabaseError(f"device {match.device!r} of {match.site!r} is"
                                        " neither new nor found")
                return int(row[0])
            device_id, site_id = int(added[0]), int(added[1])
            said, details = match.source
            conn.execute(_ADD_EVENT, {
                "site_id": site_id, "device_id": device_id,
                "message": f"registered {match.device_kind} {match.device!r}"
                           f" on first sight ({said})",
                "details": Jsonb(details),
            })
        recent.append(now)
        if self._on_register:
            self._on_register(match)
        return device_id


def _unknown(match: Registrant) -> Unresolved:
    return Unresolved("unknown_device", (
        f"unknown device {match.device!r} of site {match.site!r}: auto_register is off;"
        " add it to the devices table"))
