-- bmsd schema 040: alerts, the operational event log, and the dead letters.

CREATE TABLE alerts (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    site_id          integer NOT NULL REFERENCES sites (id),
    device_id        integer NOT NULL REFERENCES devices (id),
    rule_code        text NOT NULL,
    severity         text NOT NULL CHECK (severity IN ('info', 'warning', 'error', 'critical')),
    category         text NOT NULL,
    status           text NOT NULL DEFAULT 'active'
                     CHECK (status IN ('active', 'acknowledged', 'resolved')),
    title            text,
    message          text NOT NULL,
    value            double precision,
    threshold        double precision,
    triggered_at     timestamptz NOT NULL,
    acknowledged_at  timestamptz,
    acknowledged_by  text,
    resolved_at      timestamptz,
    details          jsonb,
    CONSTRAINT resolved_has_time CHECK ((status = 'resolved') = (resolved_at IS NOT NULL)),
    CONSTRAINT acknowledged_has_time
        CHECK (acknowledged_at IS NULL OR acknowledged_by IS NOT NULL)
);

-- At most one unresolved alert per device and rule, enforced here rather
-- than trusted to the daemon.
CREATE UNIQUE INDEX alerts_one_unresolved ON alerts (device_id, rule_code)
    WHERE status <> 'resolved';
CREATE INDEX alerts_site_triggered ON alerts (site_id, triggered_at DESC);

-- Operational log: alert transitions, registrations, acknowledgements.
CREATE TABLE events (
    time       timestamptz NOT NULL DEFAULT now(),
    site_id    integer,
    device_id  integer,
    kind       text NOT NULL,
    message    text NOT NULL,
    details    jsonb
);

SELECT create_hypertable('events', by_range('time', INTERVAL '7 days'));
CREATE INDEX events_site_time ON events (site_id, time DESC);

-- Dead letters: every payload or reading bmsd could not store, with the raw
-- bytes and a reason a person can act on.
CREATE TABLE ingest_rejects (
    received_at  timestamptz NOT NULL DEFAULT now(),
    topic        text NOT NULL,
    route        text,
    reason       text NOT NULL,
    payload      bytea NOT NULL,
    details      jsonb
);

SELECT create_hypertable('ingest_rejects', by_range('received_at', INTERVAL '1 day'));
CREATE INDEX ingest_rejects_topic ON ingest_rejects (topic, received_at DESC);

-- Acknowledge an alert: the one write bmsd_reader may make, so operators can
-- do it from SQL or a Grafana panel without write rights on the table.
CREATE FUNCTION acknowledge_alert(p_alert_id bigint, p_by text)
    RETURNS alerts
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = public, pg_temp
AS $$
DECLARE
    result alerts;
BEGIN
    IF coalesce(btrim(p_by), '') = '' THEN
        RAISE EXCEPTION 'acknowledge_alert: say who acknowledges (second argument)';
    END IF;
    UPDATE alerts
       SET status = 'acknowledged', acknowledged_at = now(), acknowledged_by = p_by
     WHERE id = p_alert_id AND status = 'active'
    RETURNING * INTO result;
    IF NOT FOUND THEN
        SELECT * INTO result FROM alerts WHERE id = p_alert_id;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'acknowledge_alert: there is no alert %', p_alert_id;
        END IF;
        RAISE EXCEPTION 'acknowledge_alert: alert % is already %', p_alert_id, result.status;
    END IF;
    INSERT INTO events (site_id, device_id, kind, message, details)
    VALUES (result.site_id, result.device_id, 'alert_acknowledged',
            format('%s acknowledged by %s', result.rule_code, p_by),
            jsonb_build_object('alert_id', result.id, 'rule_code', result.rule_code));
    RETURN result;
END
$$;

INSERT INTO bmsd_migrations (name) VALUES ('040_operations.sql') ON CONFLICT (name) DO NOTHING;
