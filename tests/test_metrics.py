"""The metrics' own helpers: what Prometheus scrapes is what plain observe would give."""

from __future__ import annotations

import math
import random

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bmsd.metrics import observe_many

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


def test_observing_many_at_once_scrapes_as_observing_each() -> None:
    rng = random.Random(7)
    # Values on the bounds too: a bucket holds what is <= its bound.
    amounts = [rng.choice([rng.uniform(0, 400), rng.choice(BUCKETS), 0.0]) for _ in range(5000)]
    scraped = []
    for many in (False, True):
        registry = CollectorRegistry()
        histogram = Histogram("lag_seconds", "lag", buckets=BUCKETS, registry=registry)
        for start in range(0, len(amounts), 700):
            chunk = amounts[start:start + 700]
            if many:
                observe_many(histogram, chunk)
            else:
                for amount in chunk:
                    histogram.observe(amount)
        text = generate_latest(registry).decode()
        scraped.append({(sample.name, sample.labels.get("le")): sample.value
                        for family in text_string_to_metric_families(text)
                        for sample in family.samples if sample.name != "lag_seconds_created"})
    one_by_one, at_once = scraped
    assert one_by_one[("lag_seconds_count", None)] == len(amounts)
    assert one_by_one[("lag_seconds_bucket", "0.005")] > 0
    assert {k: v for k, v in at_once.items() if k[0] != "lag_seconds_sum"} == {
        k: v for k, v in one_by_one.items() if k[0] != "lag_seconds_sum"}
    # The same sum, added in another order.
    assert math.isclose(at_once[("lag_seconds_sum", None)], one_by_one[("lag_seconds_sum", None)])
