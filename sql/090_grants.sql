-- bmsd schema 090: what the two group roles may do.
--
-- bmsd_ingest writes telemetry and alert state, registers sites and devices,
-- and stages batches in temporary tables; it gets no DDL on the schema and no
-- DELETE, DROP or TRUNCATE. bmsd_reader reads everything and may acknowledge
-- alerts through acknowledge_alert().

REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO bmsd_ingest, bmsd_reader;

DO $$
BEGIN
    EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO bmsd_ingest', current_database());
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO bmsd_reader', current_database());
END
$$;

GRANT SELECT ON ALL TABLES IN SCHEMA public TO bmsd_reader;
-- Later scripts (aggregates, KPI views) are readable too.
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO bmsd_reader;

GRANT SELECT, INSERT ON site_telemetry, battery_telemetry, energy_readings,
    production_data, environmental_data, events, ingest_rejects TO bmsd_ingest;
GRANT SELECT, INSERT ON organizations, sites, devices, device_streams TO bmsd_ingest;
GRANT UPDATE (last_seen_at) ON devices TO bmsd_ingest;
GRANT SELECT ON safety_constraints, energy_tariffs, carbon_factors, bmsd_migrations
    TO bmsd_ingest;
GRANT SELECT, INSERT ON alerts TO bmsd_ingest;
GRANT UPDATE (status, message, value, acknowledged_at, acknowledged_by, resolved_at, details)
    ON alerts TO bmsd_ingest;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO bmsd_ingest;

REVOKE EXECUTE ON FUNCTION acknowledge_alert(bigint, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION acknowledge_alert(bigint, text) TO bmsd_ingest, bmsd_reader;

INSERT INTO bmsd_migrations (name) VALUES ('090_grants.sql') ON CONFLICT (name) DO NOTHING;
