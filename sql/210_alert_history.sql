-- bmsd schema 210: alerts that are a function of each device's readings in
-- time order, however they arrived (bmsd/alerts/history.py; docs/alerts.md,
-- "Readings out of order").
--
-- raised_at: the time of the reading that raised the alert (triggered_at is
-- the reading that started its condition, for_s or more before); alerts
-- stored before this script took triggered_at. raised_late: stored more than
-- [alerts] late_after_s after that reading was taken (a gateway's buffer, a
-- backlog). A late reading may revise a stored alert (its raise or its
-- resolution) or withdraw it (deleted; an alert_withdrawn event keeps it).

ALTER TABLE alerts ADD COLUMN raised_at timestamptz,
                   ADD COLUMN raised_late boolean NOT NULL DEFAULT false;
UPDATE alerts SET raised_at = triggered_at WHERE raised_at IS NULL;

-- The stored alerts a device's history is compared with: those not resolved
-- before the oldest reading that arrived out of order.
CREATE INDEX alerts_device_resolved ON alerts (device_id, resolved_at);

GRANT UPDATE (raised_at, threshold) ON alerts TO bmsd_ingest;
GRANT DELETE ON alerts TO bmsd_ingest;

INSERT INTO bmsd_migrations (name) VALUES ('210_alert_history.sql') ON CONFLICT (name) DO NOTHING;
