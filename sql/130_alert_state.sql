-- bmsd schema 130: what the alert engine must remember across restarts.
--
-- For each device and stream, the time of the newest reading evaluated (the
-- high-water mark: a reading not newer than it - late, or redelivered after a
-- crash - is stored but changes no alert), and the for_s conditions under
-- way ({"RULE_CODE": {"since": "...", "value": 1.0}}). Written in the same
-- transaction as the readings and the alert changes they caused.

CREATE TABLE alert_marks (
    device_id        integer NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    stream           text NOT NULL,
    evaluated_until  timestamptz NOT NULL,
    pending          jsonb NOT NULL DEFAULT '{}',
    PRIMARY KEY (device_id, stream)
);

GRANT SELECT, INSERT, UPDATE ON alert_marks TO bmsd_ingest;
GRANT SELECT ON alert_marks TO bmsd_reader;

INSERT INTO bmsd_migrations (name) VALUES ('130_alert_state.sql') ON CONFLICT (name) DO NOTHING;
