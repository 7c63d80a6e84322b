"""Announce committed alert changes: on MQTT, in the log, in the metrics.

Called only after the commit: an alert is announced once it is stored. A
crash between the commit and the announcement loses nothing, since
`AlertPublisher.republish` announces every unresolved alert again at start.
On MQTT each change goes to ``<prefix>/<site>/<device>/<code>`` with QoS 1:
a retained document while unresolved; on resolution a resolved document,
then the retained message is cleared.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import structlog

from bmsd.alerts.rules import SEVERITIES
from bmsd.alerts.state import Alert, Plan, State
from bmsd.metrics import Metrics

log = structlog.get_logger("bmsd.alerts")

#: Sends (topic, payload, retain) with QoS 1.
Publish = Callable[[str, bytes, bool], None]


class AlertPublisher:
    """Say what a committed plan changed."""

    def __init__(self, metrics: Metrics, publish: Publish | None = None,
                 topic_prefix: str | None = "bmsd/alerts") -> None:
        self._metrics = metrics
        self._publish = publish
        self._prefix = topic_prefix

    def committed(self, plan: Plan, state: State) -> None:
        """Announce *plan*, which is committed and applied to *state*."""
        for alert in plan.resolved:
            self._metrics.alert_transitions.labels(alert.code, "resolved").inc()
            log.info("alert_resolved", code=alert.code, site=alert.device.site,
                     device=alert.device.slug, id=alert.id)
            self._announce(alert)
        for alert in plan.raised_and_cleared:
            self._metrics.alert_transitions.labels(alert.code, "triggered").inc()
        for alert in plan.triggered:
            self._metrics.alert_transitions.labels(alert.code, "triggered").inc()
            log.warning("alert_triggered", code=alert.code, site=alert.device.site,
                        device=alert.device.slug, severity=alert.severity, id=alert.id,
                        message=alert.message)
            self._announce(alert)
        if not plan.empty:
            self._metrics.alert_seconds.observe(plan.seconds)
        self.count(state)

    def republish(self, state: State) -> int:
        """Announce every unresolved alert again (after a restart); return how many."""
        for alert in state.open.values():
            self._announce(alert)
        return len(state.open)

    def count(self, state: State) -> None:
        """Set the unresolved-alerts gauges from *state*."""
        counts = dict.fromkeys(SEVERITIES, 0)
        for alert in state.open.values():
            counts[alert.severity] = counts.get(alert.severity, 0) + 1
        for severity, n in counts.items():
            self._metrics.alerts_unresolved.labels(severity).set(n)

    def _announce(self, alert: Alert) -> None:
        if self._publish is None or self._prefix is None:
            return
        topic = f"{self._prefix}/{alert.device.site}/{alert.device.slug}/{alert.code}"
        payload = json.dumps(alert.document()).encode()
        if alert.status == "resolved":
            self._publish(topic, payload, False)
            self._publish(topic, b"", True)  # clears the retained message
        else:
            self._publish(topic, payload, True)
