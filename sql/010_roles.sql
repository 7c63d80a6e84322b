-- bmsd schema 010: the two group roles, created without login.
--
-- Roles belong to the whole cluster, not to one database: a second database
-- on the same server must migrate cleanly, so each creation tolerates a role
-- that already exists (also when another migration creates it concurrently).
-- Grant them to login roles of your own, e.g.
--   CREATE ROLE bmsd_app LOGIN PASSWORD '...' IN ROLE bmsd_ingest;
--   CREATE ROLE grafana  LOGIN PASSWORD '...' IN ROLE bmsd_reader;

DO $$
BEGIN
    CREATE ROLE bmsd_ingest NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END
$$;

DO $$
BEGIN
    CREATE ROLE bmsd_reader NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END
$$;

COMMENT ON ROLE bmsd_ingest IS 'What the bmsd daemon needs: write telemetry, no DDL.';
COMMENT ON ROLE bmsd_reader IS 'Read-only access for Grafana and operators; may acknowledge alerts.';

INSERT INTO bmsd_migrations (name) VALUES ('010_roles.sql') ON CONFLICT (name) DO NOTHING;
