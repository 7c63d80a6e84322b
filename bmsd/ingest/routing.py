"""Match MQTT topics to routes: which stream a message feeds, for which site and device.

A route's topic template names its variable levels, e.g.
``site/{site}/{device}/battery``; its subscription filter replaces them with
``+``. Topic levels are data: they are returned as strings and later bound as
query parameters, never spliced into SQL.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bmsd.config import RouteConfig
from bmsd.streams import BY_NAME

_VARIABLE = re.compile(r"^\{([a-z_]+)\}$")
MAX_SLUG_LENGTH = 64
# Topics whose match is remembered; a fleet has one per device and stream.
_SEEN_MAX = 100_000


@dataclass(frozen=True, slots=True)
class Route:
    """A compiled route."""

    template: str
    stream: str
    device_kind: str
    levels: tuple[str | None, ...]  # literal level, or None for a variable
    site_level: int
    device_level: int

    @property
    def filter(self) -> str:
        """Return the MQTT subscription filter of this route."""
        return "/".join("+" if level is None else level for level in self.levels)

    @property
    def site_kind(self) -> str:
        """Return the kind of site this route's devices belong to."""
        return BY_NAME[self.stream].site_kind


@dataclass(frozen=True, slots=True)
class Match:
    """What a topic resolved to: a device as the registry takes it (`Registrant`,
    bmsd/ingest/registry.py)."""

    route: Route
    site: str
    device: str

    @property
    def stream(self) -> str:
        return self.route.stream

    @property
    def device_kind(self) -> str:
        return self.route.device_kind

    @property
    def site_kind(self) -> str:
        return self.route.site_kind

    @property
    def source(self) -> tuple[str, dict[str, str]]:
        return f"topic route {self.route.template}", {"route": self.route.template}


def compile_route(config: RouteConfig) -> Route:
    """Compile a configured route."""
    levels: list[str | None] = []
    positions: dict[str, int] = {}
    for i, level in enumerate(config.topic.split("/")):
        variable = _VARIABLE.match(level)
        if variable:
            positions[variable.group(1)] = i
            levels.append(None)
        else:
            levels.append(level)
    return Route(config.topic, config.stream, config.device_kind, tuple(levels),
                 positions["site"], positions["device"])


class Router:
    """Find the route of a topic."""

    def __init__(self, routes: tuple[RouteConfig, ...]) -> None:
        self.routes = tuple(compile_route(r) for r in routes)
        self._by_depth: dict[int, list[Route]] = {}
        self._seen: dict[str, Match | str] = {}
        for route in self.routes:
            self._by_depth.setdefault(len(route.levels), []).append(route)

    @property
    def filters(self) -> list[str]:
        """Return the subscription filters, one per route."""
        return [route.filter for route in self.routes]

    def match(self, topic: str) -> Match | str:
        """Return the match of *topic*, or why it has none (remembered per topic)."""
        found = self._seen.get(topic)
        if found is None:
            if len(self._seen) >= _SEEN_MAX:  # a flood of made-up topics: start over
                self._seen.clear()
            found = self._seen[topic] = self._match(topic)
        return found

    def _match(self, topic: str) -> Match | str:
        levels = topic.split("/")
        for route in self._by_depth.get(len(levels), ()):
            if all(want is None or want == got for want, got in zip(route.levels, levels,
                                                                     strict=True)):
                site, device = levels[route.site_level], levels[route.device_level]
                for name, value in (("site", site), ("device", device)):
                    if not value:
                        return f"topic {topic!r}: the {name} level is empty"
                    if len(value) > MAX_SLUG_LENGTH:
                        return (f"topic {topic!r}: the {name} level is longer than"
                                f" {MAX_SLUG_LENGTH} characters")
                return Match(route, site, device)
        return f"topic {topic!r} matches no route in the configuration"
