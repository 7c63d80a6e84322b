"""Announce committed alert changes: on MQTT, in the log, in the metrics.

Called only after the commit: an alert is announced once it is stored. A
crash between the commit and the announcement loses nothing, since
`AlertPublisher.republish` announces every unresolved alert again at start.
On MQTT each change goes to ``<prefix>/<site>/<device>/<code>`` with QoS 1:
a retained document while unresolved; on resolution a resolved document,
then the retained message is cleared (unless another alert of the rule is
open by then, which stays retained).

Readings that arrive late may change alerts already announced
(bmsd/alerts/history.py): a revised alert is announced again with
``"revised": true``, a withdrawn one with ``"status": "withdrawn"``; an alert
raised from late readings carries ``"raised_late": true``.
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
            self._announce(alert, state)
        for alert in plan.raised_and_cleared:
            self._metrics.alert_transitions.labels(alert.code, "triggered").inc()
        for alert in plan.triggered:
            self._metrics.alert_transitions.labels(alert.code, "triggered").inc()
            log.warning("alert_triggered", code=alert.code, site=alert.device.site,
                        device=alert.device.slug, severity=alert.severity, id=alert.id,
                        message=alert.message, raised_late=alert.raised_late)
            self._announce(alert, state)
        self._corrections(plan, state)
        if not plan.empty:
            self._metrics.alert_seconds.observe(plan.seconds)
        self.count(state)

    def _corrections(self, plan: Plan, state: State) -> None:
        metrics = self._metrics
        for stream, count in plan.replays.items():
            metrics.alert_replays.labels(stream).inc(count)
        for stream, count in plan.unevaluated.items():
            metrics.readings_not_evaluated.labels(stream).inc(count)
        late = sum(a.raised_late for a in (*plan.triggered, *plan.raised_and_cleared))
        if late:
            metrics.alert_corrections.labels("raised_late").inc(late)
        for kind, alerts in (("revised", plan.revised), ("withdrawn", plan.withdrawn)):
            if not alerts:
                continue
            metrics.alert_corrections.labels(kind).inc(len(alerts))
            for alert in alerts:
                log.warning(f"alert_{kind}", code=alert.code, site=alert.device.site,
                            device=alert.device.slug, id=alert.id,
                            triggered_at=alert.triggered_at.isoformat(),
                            resolved_at=alert.resolved_at and alert.resolved_at.isoformat())
                self._announce(alert, state, kind)

    def republish(self, state: State) -> int:
        """Announce every unresolved alert again (after a restart); return how many."""
        for alert in state.open.values():
            self._announce(alert, state)
        return len(state.open)

    def count(self, state: State) -> None:
        """Set the unresolved-alerts gauges from *state*."""
        counts = dict.fromkeys(SEVERITIES, 0)
        for alert in state.open.values():
            counts[alert.severity] = counts.get(alert.severity, 0) + 1
        for severity, n in counts.items():
            self._metrics.alerts_unresolved.labels(severity).set(n)

    def _announce(self, alert: Alert, state: State, revision: str | None = None) -> None:
        if self._publish is None or self._prefix is None:
            return
        topic = f"{self._prefix}/{alert.device.site}/{alert.device.slug}/{alert.code}"
        document = alert.document()
        if revision == "withdrawn":
            document["status"] = "withdrawn"
        elif revision is not None:
            document["revised"] = True
        payload = json.dumps(document).encode()
        if document["status"] in ("active", "acknowledged"):
            self._publish(topic, payload, True)
            return
        self._publish(topic, payload, False)
        now_open = state.open.get((alert.device.id, alert.code))
        if now_open is None:
            self._publish(topic, b"", True)  # clears the retained message
        elif revision is not None:  # the open one stays what a new subscriber gets
            self._publish(topic, json.dumps(now_open.document()).encode(), True)
