"""Topic routing: templates, filters, and topics that match nothing."""

from __future__ import annotations

from bmsd.config import DEFAULT_ROUTES, RouteConfig
from bmsd.ingest import routing
from bmsd.ingest.routing import Match, Router

ROUTER = Router(DEFAULT_ROUTES)


def test_default_routes_subscribe_with_single_level_wildcards() -> None:
    assert ROUTER.filters == ["site/+/+/telemetry", "site/+/+/battery", "factory/+/+/energy",
                              "factory/+/+/production", "factory/+/+/environment"]


def test_a_topic_resolves_to_its_stream_site_and_device() -> None:
    match = ROUTER.match("factory/demo/compressor-1/energy")
    assert isinstance(match, Match)
    assert (match.route.stream, match.site, match.device) == (
        "energy_readings", "demo", "compressor-1")
    assert match.route.site_kind == "factory"
    battery = ROUTER.match("site/alpha/pack-7/battery")
    assert isinstance(battery, Match)
    assert (battery.route.stream, battery.route.device_kind) == ("battery_telemetry",
                                                                 "battery_pack")


def test_segments_may_sit_anywhere_and_in_any_order() -> None:
    router = Router((RouteConfig(topic="bms/{device}/at/{site}", stream="battery_telemetry",
                                 device_kind="battery_pack"),))
    match = router.match("bms/pack-1/at/north")
    assert isinstance(match, Match)
    assert (match.site, match.device) == ("north", "pack-1")
    assert router.filters == ["bms/+/at/+"]


def test_topics_that_match_nothing_say_why() -> None:
    assert ROUTER.match("site/alpha/pack-1/unknown") == (
        "topic 'site/alpha/pack-1/unknown' matches no route in the configuration")
    assert ROUTER.match("site//pack-1/battery") == (
        "topic 'site//pack-1/battery': the site level is empty")
    long = "d" * 65
    assert ROUTER.match(f"site/a/{long}/battery") == (
        f"topic 'site/a/{long}/battery': the device level is longer than 64 characters")


def test_remembered_matches_stay_bounded_under_a_flood_of_made_up_topics() -> None:
    router = Router(DEFAULT_ROUTES)
    for n in range(routing._SEEN_MAX + 10):
        assert isinstance(router.match(f"site/s{n}/d/telemetry"), Match)
    assert len(router._seen) <= routing._SEEN_MAX
    again = router.match("site/s1/d/telemetry")
    assert isinstance(again, Match)
    assert (again.site, again.device) == ("s1", "d")
    assert isinstance(router.match("nowhere/x"), str)
    assert router.match("nowhere/x") == router.match("nowhere/x")
