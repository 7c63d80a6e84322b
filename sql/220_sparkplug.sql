-- bmsd schema 220: Sparkplug B (docs/sparkplug.md).
--
-- sparkplug_metrics: every metric of an edge node or device that no
-- [[sparkplug.map]] names a field for, as it came: its name, its Sparkplug
-- datatype and unit (from the birth), the value in the column that fits it
-- (numbers and booleans in value, text and times in value_text, arrays,
-- DataSets, Templates and bytes (base64) in value_json), and whether the
-- edge node sent it as historical (store and forward). device_id is the
-- bmsd device the edge node or device was registered as.
CREATE TABLE sparkplug_metrics (
    time        timestamptz NOT NULL,
    device_id   integer NOT NULL,
    name        text NOT NULL,
    datatype    text NOT NULL,
    unit        text,
    value       double precision,
    value_text  text,
    value_json  jsonb,
    historical  boolean NOT NULL DEFAULT false
);
SELECT create_hypertable('sparkplug_metrics', by_range('time', INTERVAL '1 day'));
CREATE UNIQUE INDEX sparkplug_metrics_key ON sparkplug_metrics (device_id, name, time DESC);

-- sparkplug_nodes: each edge node (device '') and device heard from, online
-- or not, with its last birth and death (bmsd's receive times) and the
-- session's bdSeq. The Grafana panel "Sparkplug edge nodes" reads it.
CREATE TABLE sparkplug_nodes (
    group_id       text NOT NULL,
    edge_node      text NOT NULL,
    device         text NOT NULL DEFAULT '',
    device_id      integer REFERENCES devices (id) ON DELETE SET NULL,
    online         boolean NOT NULL,
    bdseq          bigint,
    last_birth_at  timestamptz,
    last_death_at  timestamptz,
    PRIMARY KEY (group_id, edge_node, device)
);

GRANT SELECT, INSERT ON sparkplug_metrics TO bmsd_ingest;
GRANT SELECT, INSERT, UPDATE ON sparkplug_nodes TO bmsd_ingest;

INSERT INTO bmsd_migrations (name) VALUES ('220_sparkplug.sql') ON CONFLICT (name) DO NOTHING;
