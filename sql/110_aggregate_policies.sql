-- requires: timescaledb-community
-- bmsd schema 110: refresh policies of the continuous aggregates.
--
-- Two rules fix the offsets (README, "Retention and compression"):
-- * start_offset reaches back far enough that a reading of the oldest age
--   the daemon accepts (ingest.max_reading_age_s, at most 3 days) still
--   lies in the window when it arrives, and again when each level below has
--   refreshed it in turn: 4 days from raw, +1 day for each level above.
-- * start_offset never reaches back past the retention of the level it reads
--   from: a refresh over dropped source data would erase the buckets that
--   are meant to outlive it (_15m reads _1m, which is kept 30 days).
-- end_offset keeps the still-filling bucket out of the materialisation;
-- materialized_only = false answers it from the level below meanwhile.
-- Refreshes recompute only what changed (invalidation log), so wide windows
-- cost little when no late data came in.

SELECT add_continuous_aggregate_policy('energy_readings_1m',
    start_offset => INTERVAL '4 days', end_offset => INTERVAL '1 minute',
    schedule_interval => INTERVAL '1 minute');
SELECT add_continuous_aggregate_policy('energy_readings_15m',
    start_offset => INTERVAL '5 days', end_offset => INTERVAL '15 minutes',
    schedule_interval => INTERVAL '5 minutes');
SELECT add_continuous_aggregate_policy('energy_readings_1h',
    start_offset => INTERVAL '6 days', end_offset => INTERVAL '1 hour',
    schedule_interval => INTERVAL '15 minutes');
SELECT add_continuous_aggregate_policy('energy_readings_1d',
    start_offset => INTERVAL '7 days', end_offset => INTERVAL '1 day',
    schedule_interval => INTERVAL '1 hour');

SELECT add_continuous_aggregate_policy(format('%s_1h', t),
    start_offset => INTERVAL '4 days', end_offset => INTERVAL '1 hour',
    schedule_interval => INTERVAL '15 minutes')
  FROM unnest(ARRAY['site_telemetry', 'battery_telemetry', 'production_data',
                    'environmental_data']) AS t;
SELECT add_continuous_aggregate_policy(format('%s_1d', t),
    start_offset => INTERVAL '5 days', end_offset => INTERVAL '1 day',
    schedule_interval => INTERVAL '1 hour')
  FROM unnest(ARRAY['site_telemetry', 'battery_telemetry', 'production_data',
                    'environmental_data']) AS t;

INSERT INTO bmsd_migrations (name) VALUES ('110_aggregate_policies.sql') ON CONFLICT (name) DO NOTHING;
