-- bmsd schema 000: the TimescaleDB extension and the migrations bookkeeping.
--
-- Every script in sql/ ends by recording itself in bmsd_migrations, so a
-- database set up by the TimescaleDB container's init (which runs these files
-- with psql in name order) is recognised by a later `bmsd migrate`. The row it
-- writes has no checksum; `bmsd migrate` adopts the file's checksum then.

CREATE EXTENSION IF NOT EXISTS timescaledb;

CREATE TABLE IF NOT EXISTS bmsd_migrations (
    name        text PRIMARY KEY,
    -- sha256 of the file as applied; NULL when recorded by container init.
    checksum    text,
    status      text NOT NULL DEFAULT 'applied' CHECK (status IN ('applied', 'skipped')),
    applied_at  timestamptz NOT NULL DEFAULT now(),
    applied_by  text NOT NULL DEFAULT 'init',
    note        text
);

COMMENT ON TABLE bmsd_migrations IS
    'Schema scripts from sql/ applied to this database (see bmsd migrate).';

INSERT INTO bmsd_migrations (name) VALUES ('000_timescaledb.sql') ON CONFLICT (name) DO NOTHING;
