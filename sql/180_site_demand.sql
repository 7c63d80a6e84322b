-- requires: timescaledb-community
-- bmsd schema 180: a site's demand per 15 minutes, for its peak.
--
-- A site's peak demand is the highest 15-minute average of its machines'
-- power together: per quarter, the sum over the site's devices of each
-- device's average (energy_readings_15m). Searching it from the per-device
-- level read every quarter of every device (100 machines x 30 days = 288,000
-- rows, 235 ms); this level keeps that sum per site and quarter, so the
-- search reads one row per quarter (2,880 for 30 days).
--
-- The site comes from devices.site_id when the quarter is materialised: a
-- device is registered under one site and never moves (the registry never
-- changes site_id). If an operator moves one by hand, refresh this level
-- over the device's history with force => true.

CREATE MATERIALIZED VIEW energy_site_15m
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT time_bucket(INTERVAL '15 minutes', q.bucket) AS bucket,
       d.site_id,
       sum(bmsd_mean(q.power_kw_n, q.power_kw_sum)) AS demand_kw,
       count(*) FILTER (WHERE q.power_kw_n > 0) AS devices
  FROM energy_readings_15m q
  JOIN devices d ON d.id = q.device_id
 GROUP BY time_bucket(INTERVAL '15 minutes', q.bucket), d.site_id
WITH NO DATA;

-- energy_readings_15m is refreshed 5 days back: one day more here, as for
-- every level above another (see 110).
SELECT add_continuous_aggregate_policy('energy_site_15m',
    start_offset => INTERVAL '6 days', end_offset => INTERVAL '15 minutes',
    schedule_interval => INTERVAL '5 minutes');
SELECT add_retention_policy('energy_site_15m', INTERVAL '2 years');

-- Late data (170): the backlog job refreshes this level after the one it reads.
SELECT alter_job(j.job_id, config => jsonb_set(j.config, '{levels,energy_readings}',
           '["energy_readings_1m", "energy_readings_15m", "energy_site_15m",
             "energy_readings_1h", "energy_readings_1d"]'))
  FROM timescaledb_information.jobs j
 WHERE j.proc_name = 'bmsd_refresh_backlog';

-- The site's hours no longer carry an upper bound for the peak search.
DROP FUNCTION bmsd_site_peak(integer[], timestamptz, timestamptz, timestamptz[],
                             double precision[]);
DROP FUNCTION bmsd_site_hours(integer[], timestamptz, timestamptz);

-- A site's machines together, in one pass over the hourly aggregate (raw rows
-- at the edges): per hour, their energy; and, per machine, whether it
-- reported any energy reading.
CREATE FUNCTION bmsd_site_hours(p_devices integer[], p_start timestamptz, p_end timestamptz)
    RETURNS TABLE (hour timestamptz, device_id integer, kwh double precision)
    LANGUAGE plpgsql STABLE
AS $$
DECLARE
    piece record;
BEGIN
    FOR piece IN SELECT * FROM bmsd_range_pieces(p_start, p_end) LOOP
        IF piece.kind = 'raw' THEN
            RETURN QUERY
                SELECT x.hour, x.device_id, sum(x.kwh)
                  FROM (SELECT date_trunc('hour', r.time, 'UTC') AS hour, r.device_id,
                               sum(r.energy_kwh) AS kwh
                          FROM energy_readings r
                         WHERE r.device_id = ANY(p_devices) AND r.time >= piece.lo
                           AND r.time < piece.hi
                         GROUP BY 1, 2) x
                 GROUP BY GROUPING SETS ((x.hour), (x.device_id));
        ELSE
            RETURN QUERY
                SELECT h.bucket, h.device_id, sum(h.energy_kwh_sum)
                  FROM energy_readings_1h h
                 WHERE h.device_id = ANY(p_devices) AND h.bucket >= piece.lo
                   AND h.bucket < piece.hi
                 GROUP BY GROUPING SETS ((h.bucket), (h.device_id));
        END IF;
    END LOOP;
END
$$;

-- The highest 15-minute average of a site's machines' summed power, and the
-- quarter it began (the earliest of equal ones): whole quarters from
-- energy_site_15m, the partial quarters at the range's edges from raw rows.
CREATE FUNCTION bmsd_site_peak(p_site integer, p_devices integer[], p_start timestamptz,
                               p_end timestamptz)
    RETURNS TABLE (peak_kw double precision, peak_at timestamptz)
    LANGUAGE plpgsql STABLE
AS $$
DECLARE
    q0 timestamptz := time_bucket(interval '15 minutes', p_start)
                      + CASE WHEN time_bucket(interval '15 minutes', p_start) < p_start
                             THEN interval '15 minutes' ELSE interval '0' END;
    q1 timestamptz := time_bucket(interval '15 minutes', p_end);
BEGIN
    IF q0 >= q1 THEN
        q0 := p_end;
        q1 := p_end;
    END IF;
    RETURN QUERY
        SELECT c.kw, c.quarter
          FROM (SELECT s.bucket AS quarter, s.demand_kw AS kw
                  FROM energy_site_15m s
                 WHERE s.site_id = p_site AND s.bucket >= q0 AND s.bucket < q1
                   AND s.demand_kw IS NOT NULL
                UNION ALL
                SELECT d.quarter, sum(d.avg_kw)
                  FROM (SELECT * FROM bmsd_demand_by_quarter(p_devices, p_start,
                                                             least(q0, p_end))
                        UNION ALL
                        SELECT * FROM bmsd_demand_by_quarter(p_devices,
                                                             greatest(q1, p_start), p_end)) d
                 GROUP BY d.quarter) c
         ORDER BY c.kw DESC, c.quarter
         LIMIT 1;
END
$$;

-- One row per site: energy, cost, carbon, units, SEC, peak demand (the highest
-- 15-minute average of the site's machines together), devices reporting.
CREATE OR REPLACE FUNCTION get_factory_summary(p_site integer, p_start timestamptz,
                                               p_end timestamptz)
    RETURNS TABLE (site_id integer, site text, energy_kwh double precision, cost numeric,
                   currency text, kg_co2 double precision, units_produced bigint,
                   sec_kwh_per_unit double precision, peak_kw double precision,
                   peak_at timestamptz, devices_reporting bigint)
    LANGUAGE sql STABLE
AS $$
    WITH devs AS (
        SELECT array_agg(d.id) AS ids FROM devices d WHERE d.site_id = p_site
    ), pass AS MATERIALIZED (
        SELECT sh.* FROM devs, bmsd_site_hours(devs.ids, p_start, p_end) sh
    ), site_hours AS (
        SELECT p.hour, sum(p.kwh) AS kwh FROM pass p WHERE p.hour IS NOT NULL GROUP BY p.hour
    ), priced AS (
        SELECT sum(sh.kwh) AS kwh, sum(sh.kwh::numeric * t.price_per_kwh) AS cost,
               max(t.currency) AS currency,
               sum(sh.kwh * bmsd_carbon_factor_at(p_site, sh.hour)) AS kg
          FROM site_hours sh LEFT JOIN LATERAL bmsd_tariff_at(p_site, sh.hour) t ON true
         WHERE sh.kwh IS NOT NULL
    ), units AS (
        SELECT sum(u.produced)::bigint AS produced, array_agg(u.device_id) AS ids
          FROM devs, bmsd_units(devs.ids, p_start, p_end) u
         WHERE u.produced IS NOT NULL OR u.rejected IS NOT NULL
    ), peak AS (
        SELECT pk.* FROM devs, bmsd_site_peak(p_site, devs.ids, p_start, p_end) pk
    ), reporting AS (
        SELECT count(DISTINCT x) AS n
          FROM (SELECT p.device_id AS x FROM pass p
                 WHERE p.device_id IS NOT NULL AND p.kwh IS NOT NULL
                UNION SELECT unnest(units.ids) FROM units) r
    )
    SELECT s.id, s.slug, priced.kwh, round(priced.cost, 4), priced.currency, priced.kg,
           units.produced, priced.kwh / nullif(units.produced, 0), peak.peak_kw, peak.peak_at,
           reporting.n
      FROM sites s, priced, units, reporting
      LEFT JOIN peak ON true
     WHERE s.id = p_site
$$;

GRANT SELECT ON energy_site_15m TO bmsd_reader;
GRANT EXECUTE ON FUNCTION bmsd_site_hours(integer[], timestamptz, timestamptz),
                          bmsd_site_peak(integer, integer[], timestamptz, timestamptz)
    TO bmsd_reader;

INSERT INTO bmsd_migrations (name) VALUES ('180_site_demand.sql') ON CONFLICT (name) DO NOTHING;
