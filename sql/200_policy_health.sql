-- requires: timescaledb-community
-- bmsd schema 200: are the policies working? Told by their effect, not by job status.
--
-- A job's status says little: on PostgreSQL 15.20 with TimescaleDB 2.28.3
-- every background job run ends as Failed ("cannot drop portal while it is
-- being set up") after its work committed, and a job failing for real looks
-- the same. So policy_health measures what each policy promises against the
-- data: one row per (object, policy), with
--   behind_s   how far the data is behind the promise, in seconds (0: kept);
--   allowed_s  how far behind it may legitimately be: TimescaleDB starts a
--              job whose last run failed up to 5 schedule intervals later
--              (job_stat.c, MAX_INTERVALS_BACKOFF), and on 15.20 + 2.28.3
--              every run counts as failed; a refresh also leaves the
--              still-filling bucket, and the late-data job needs one run;
--   detail     what was measured, for a person.
-- compression  the oldest chunk still uncompressed although older than
--              compress_after: behind by how long it has been due;
-- retention    the oldest chunk kept although older than drop_after;
-- refresh      an aggregate's materialisation watermark behind the newest
--              raw reading it should cover (now - end_offset at most);
-- late data    the oldest day in aggregate_backlog not yet refreshed
--              (readings older than the refresh windows, sql/170).
-- Cost: catalog reads (a few hundred chunks at 90 days' retention), two
-- index probes per aggregate for the newest reading of its raw table and the
-- oldest in its refresh window, and its watermark: independent of the number of sites. bmsd reads it at
-- scrape time, at most once per 15 s (bmsd_policy_behind_seconds).

CREATE FUNCTION policy_health_now()
    RETURNS TABLE (object text, policy text, behind_s double precision,
                   allowed_s double precision, detail text)
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path = public, pg_temp
AS $$
DECLARE
    job record;
    agg record;
    newest timestamptz;
    watermark timestamptz;
    due timestamptz;
    width interval;
    oldest timestamptz;
    pending integer;
BEGIN
    -- Compression and retention: the oldest chunk the policy should have handled.
    FOR job IN
        SELECT j.hypertable_name AS name, j.schedule_interval, j.config,
               coalesce(ca.materialization_hypertable_name, j.hypertable_name) AS stored_in,
               p.policy, p.key, p.done
          FROM timescaledb_information.jobs j
          LEFT JOIN timescaledb_information.continuous_aggregates ca
            ON ca.view_name = j.hypertable_name
          JOIN (VALUES ('policy_compression', 'compression', 'compress_after', 'compressed'),
                       ('policy_retention', 'retention', 'drop_after', 'dropped'))
               AS p (proc_name, policy, key, done) ON p.proc_name = j.proc_name
    LOOP
        -- Compression leaves compressed chunks behind it; retention leaves none.
        SELECT min(c.range_end), count(*) INTO oldest, pending
          FROM timescaledb_information.chunks c
         WHERE c.hypertable_name = job.stored_in
           AND c.range_end < now() - (job.config ->> job.key)::interval
           AND NOT (job.policy = 'compression' AND c.is_compressed);
        object := job.name; policy := job.policy;
        detail := format('%s chunk(s) older than %s %s not %s',
                         pending, job.key, job.config ->> job.key, job.done);
        behind_s := coalesce(extract(epoch FROM now()
                        - (job.config ->> job.key)::interval - oldest), 0);
        allowed_s := 5 * extract(epoch FROM job.schedule_interval);
        RETURN NEXT;
    END LOOP;

    -- Refresh: each aggregate's watermark against the newest reading of its raw table.
    FOR agg IN
        SELECT j.hypertable_name AS name, j.schedule_interval,
               (j.config ->> 'end_offset')::interval AS end_offset,
               (j.config ->> 'start_offset')::interval AS start_offset,
               c.mat_hypertable_id, f.bucket_width,
               format('%I.%I', root.schema_name, root.table_name) AS raw_table
          FROM timescaledb_information.jobs j
          JOIN _timescaledb_catalog.continuous_agg c ON c.user_view_name = j.hypertable_name
          JOIN _timescaledb_catalog.continuous_aggs_bucket_function f
            ON f.mat_hypertable_id = c.mat_hypertable_id
          -- Hierarchical aggregates read the level below; the data comes from the root.
          CROSS JOIN LATERAL (
              WITH RECURSIVE up AS (
                  SELECT c.raw_hypertable_id AS id
                  UNION ALL
                  SELECT p.raw_hypertable_id FROM up
                    JOIN _timescaledb_catalog.continuous_agg p ON p.mat_hypertable_id = up.id)
              SELECT h.schema_name, h.table_name
                FROM up JOIN _timescaledb_catalog.hypertable h ON h.id = up.id
               WHERE NOT EXISTS (SELECT 1 FROM _timescaledb_catalog.continuous_agg p
                                  WHERE p.mat_hypertable_id = up.id)) root
         WHERE j.proc_name = 'policy_refresh_continuous_aggregate'
    LOOP
        -- Two statements: each is one index probe (min/max over the time index);
        -- one with both aggregates would scan every row.
        EXECUTE format('SELECT max(time) FROM %s', agg.raw_table) INTO newest;
        EXECUTE format('SELECT min(time) FROM %s WHERE time >= $1', agg.raw_table)
           INTO oldest USING now() - agg.start_offset;
        watermark := _timescaledb_functions.to_timestamp(
            _timescaledb_functions.cagg_watermark(agg.mat_hypertable_id));
        width := agg.bucket_width::interval;
        -- The policy promises the window [now - start_offset, now - end_offset].
        due := least(newest, now() - agg.end_offset);  -- least() skips a NULL:
        IF newest IS NULL THEN
            due := NULL;  -- no raw data, nothing due
        END IF;
        -- Nothing to materialise before the window, or before the first reading in it.
        watermark := greatest(watermark, now() - agg.start_offset, oldest);
        object := agg.name; policy := 'refresh';
        behind_s := coalesce(greatest(extract(epoch FROM due - watermark - width), 0), 0);
        allowed_s := extract(epoch FROM 5 * agg.schedule_interval + width);
        detail := format('materialised up to %s; newest raw reading %s',
                         watermark, coalesce(newest::text, 'none'));
        RETURN NEXT;
    END LOOP;

    -- Late data: the oldest backlog day of each raw table (sql/170's job).
    FOR job IN
        SELECT j.schedule_interval, t.name
          FROM timescaledb_information.jobs j,
               jsonb_object_keys(j.config -> 'levels') AS t (name)
         WHERE j.proc_name = 'bmsd_refresh_backlog'
    LOOP
        SELECT min(b.noted_at), count(*) INTO oldest, pending
          FROM aggregate_backlog b WHERE b.hypertable = job.name;
        object := job.name; policy := 'late data';
        behind_s := coalesce(extract(epoch FROM now() - oldest), 0);
        -- The backoff after a failed run, and one schedule more for the run itself.
        allowed_s := 6 * extract(epoch FROM job.schedule_interval);
        detail := format('%s day(s) of late readings not yet in the aggregates', pending);
        RETURN NEXT;
    END LOOP;
END
$$;

CREATE VIEW policy_health AS SELECT * FROM policy_health_now();
COMMENT ON VIEW policy_health IS
    'How far each compression, retention, refresh policy and the late-data job is behind what it promises (README, "Are the policies working?").';

REVOKE EXECUTE ON FUNCTION policy_health_now() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION policy_health_now() TO bmsd_ingest, bmsd_reader;
GRANT SELECT ON policy_health TO bmsd_ingest, bmsd_reader;

-- Late data within a bound even when every run is marked failed: the backlog job
-- every 5 s, retried 5 s after a failure, so the backoff caps at 25 s (+13 %
-- jitter); an empty backlog costs one query. Readings older than 3 days (the
-- refresh windows, sql/110) reach every aggregate level within 6 x 5 s = 30 s
-- plus the refresh's own run time (README, "Late data").
SELECT alter_job(job_id, schedule_interval => INTERVAL '5 seconds',
                 retry_period => INTERVAL '5 seconds')
  FROM timescaledb_information.jobs WHERE proc_name = 'bmsd_refresh_backlog';

INSERT INTO bmsd_migrations (name) VALUES ('200_policy_health.sql') ON CONFLICT (name) DO NOTHING;
