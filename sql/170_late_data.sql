-- requires: timescaledb-community
-- bmsd schema 170: late data reaches the continuous aggregates.
--
-- The refresh policies of 110 look back a few days. A gateway back from a
-- long outage forwards readings up to the raw retention old (90 days); the
-- daemon stores them (into compressed chunks too) and, in the same
-- transaction, notes each (hypertable, UTC day) they fall on in
-- aggregate_backlog. The job below refreshes those days, level by level
-- (1m before 15m before 1h before 1d), outside any ingest transaction, with
-- the owner's rights: the daemon's role may not refresh aggregates itself.
--
-- * Many late readings of one day are one backlog row; consecutive days are
--   one refresh call per level.
-- * A level whose own retention has passed for a day (energy_readings_1m
--   keeps 30 days) has lost that day's other buckets; it is recomputed in
--   full for the day (force), or the level above would be rebuilt from a
--   part of the day.
-- * A row is removed only if its version is the one refreshed: a reading of
--   the same day committed during the refresh bumps the version and keeps it.
-- The job runs every 15 seconds; an empty backlog costs one query.

CREATE TABLE aggregate_backlog (
    hypertable text NOT NULL,
    day date NOT NULL,  -- UTC
    version bigint NOT NULL DEFAULT 1,
    noted_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (hypertable, day)
);
COMMENT ON TABLE aggregate_backlog IS
    'Days that received readings older than the refresh policies reach; emptied by the bmsd_refresh_backlog job.';

GRANT SELECT, INSERT, UPDATE ON aggregate_backlog TO bmsd_ingest;

CREATE PROCEDURE bmsd_refresh_backlog(job_id integer, config jsonb)
LANGUAGE plpgsql AS $$
DECLARE
    span record;
    level text;
    kept interval;
    first_at timestamptz;
    end_at timestamptz;
    cut timestamptz;
BEGIN
    FOR span IN
        SELECT hypertable, min(day) AS first_day, max(day) AS last_day,
               array_agg(day) AS days, array_agg(version) AS versions
          FROM (SELECT b.*, b.day - (row_number() OVER (PARTITION BY b.hypertable
                                                       ORDER BY b.day))::integer AS island
                  FROM aggregate_backlog b) numbered
         GROUP BY hypertable, island
         ORDER BY hypertable, first_day
    LOOP
        first_at := span.first_day::timestamp AT TIME ZONE 'UTC';
        end_at := (span.last_day + 1)::timestamp AT TIME ZONE 'UTC';
        FOR level IN SELECT jsonb_array_elements_text(config -> 'levels' -> span.hypertable)
        LOOP
            SELECT (j.config ->> 'drop_after')::interval INTO kept
              FROM timescaledb_information.jobs j
             WHERE j.proc_name = 'policy_retention' AND j.hypertable_name = level;
            -- Days before cut may have lost buckets to retention: recompute them whole.
            cut := first_at;
            IF kept IS NOT NULL THEN
                cut := least(end_at, greatest(first_at,
                             date_trunc('day', now() - kept, 'UTC') + INTERVAL '24 hours'));
            END IF;
            IF cut > first_at THEN
                CALL refresh_continuous_aggregate(level::regclass, first_at, cut, force => true);
                COMMIT;
            END IF;
            IF cut < end_at THEN
                CALL refresh_continuous_aggregate(level::regclass, cut, end_at);
                COMMIT;
            END IF;
        END LOOP;
        DELETE FROM aggregate_backlog b
         USING unnest(span.days, span.versions) AS done (day, version)
         WHERE b.hypertable = span.hypertable AND b.day = done.day
           AND b.version = done.version;
        COMMIT;
    END LOOP;
END
$$;

SELECT add_job('bmsd_refresh_backlog', INTERVAL '15 seconds', config => jsonb_build_object(
    'levels', jsonb_build_object(
        'energy_readings', jsonb_build_array('energy_readings_1m', 'energy_readings_15m',
                                             'energy_readings_1h', 'energy_readings_1d'),
        'site_telemetry', jsonb_build_array('site_telemetry_1h', 'site_telemetry_1d'),
        'battery_telemetry', jsonb_build_array('battery_telemetry_1h', 'battery_telemetry_1d'),
        'production_data', jsonb_build_array('production_data_1h', 'production_data_1d'),
        'environmental_data', jsonb_build_array('environmental_data_1h',
                                                'environmental_data_1d'))));

INSERT INTO bmsd_migrations (name) VALUES ('170_late_data.sql') ON CONFLICT (name) DO NOTHING;
