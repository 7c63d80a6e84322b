-- requires: timescaledb-community
-- bmsd schema 120: compression and retention.
--
-- Raw hypertables: compressed after 7 days (segment by device, newest first),
-- dropped after 90 days. Aggregates: _1m kept 30 days, _15m and _1h 2 years,
-- _1d 10 years. events 1 year, ingest_rejects 30 days. Resolved alerts are
-- kept (alerts is a plain table). To change one later, see README
-- ("Retention and compression"): remove_retention_policy + add_retention_policy.

ALTER TABLE site_telemetry SET (timescaledb.compress,
    timescaledb.compress_segmentby = 'device_id', timescaledb.compress_orderby = 'time DESC');
ALTER TABLE battery_telemetry SET (timescaledb.compress,
    timescaledb.compress_segmentby = 'device_id', timescaledb.compress_orderby = 'time DESC');
ALTER TABLE energy_readings SET (timescaledb.compress,
    timescaledb.compress_segmentby = 'device_id', timescaledb.compress_orderby = 'time DESC');
ALTER TABLE production_data SET (timescaledb.compress,
    timescaledb.compress_segmentby = 'device_id', timescaledb.compress_orderby = 'time DESC');
ALTER TABLE environmental_data SET (timescaledb.compress,
    timescaledb.compress_segmentby = 'device_id', timescaledb.compress_orderby = 'time DESC');

SELECT add_compression_policy(t, INTERVAL '7 days'),
       add_retention_policy(t, INTERVAL '90 days')
  FROM unnest(ARRAY['site_telemetry', 'battery_telemetry', 'energy_readings',
                    'production_data', 'environmental_data']::regclass[]) AS t;

SELECT add_retention_policy('energy_readings_1m', INTERVAL '30 days');
SELECT add_retention_policy(t, INTERVAL '2 years')
  FROM unnest(ARRAY['energy_readings_15m', 'energy_readings_1h', 'site_telemetry_1h',
                    'battery_telemetry_1h', 'production_data_1h',
                    'environmental_data_1h']::regclass[]) AS t;
SELECT add_retention_policy(t, INTERVAL '10 years')
  FROM unnest(ARRAY['energy_readings_1d', 'site_telemetry_1d', 'battery_telemetry_1d',
                    'production_data_1d', 'environmental_data_1d']::regclass[]) AS t;

SELECT add_retention_policy('events', INTERVAL '1 year');
SELECT add_retention_policy('ingest_rejects', INTERVAL '30 days');

INSERT INTO bmsd_migrations (name) VALUES ('120_compression_retention.sql') ON CONFLICT (name) DO NOTHING;
