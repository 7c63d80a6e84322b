-- requires: timescaledb-community
-- bmsd schema 140: energy KPIs (EnMS design), battery throughput and site energy flows.
--
-- Every function takes a device id (devices.id) or a site id and a half-open
-- range [p_start, p_end). Whole hours and days are read from the continuous
-- aggregates; only the partial hours at the two edges of the range are read
-- from the raw hypertables, so a 30-day summary scans no raw rows in between.
-- The aggregates' buckets are UTC; figures "per day" are per site-local day.
-- A result of NULL means "no data" (or, for ratios, "undefined"), not zero.

-- The pieces of a range: raw edges, whole hours, whole UTC days.
CREATE FUNCTION bmsd_range_pieces(p_start timestamptz, p_end timestamptz)
    RETURNS TABLE (kind text, lo timestamptz, hi timestamptz)
    LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
    h0 timestamptz := date_trunc('hour', p_start, 'UTC')
                      + CASE WHEN date_trunc('hour', p_start, 'UTC') < p_start
                             THEN interval '1 hour' ELSE interval '0' END;
    h1 timestamptz := date_trunc('hour', p_end, 'UTC');
    d0 timestamptz;
    d1 timestamptz;
BEGIN
    IF p_end <= p_start THEN
        RETURN;
    END IF;
    IF h0 >= h1 THEN
        RETURN QUERY SELECT 'raw', p_start, p_end;
        RETURN;
    END IF;
    IF p_start < h0 THEN
        RETURN QUERY SELECT 'raw', p_start, h0;
    END IF;
    d0 := date_trunc('day', h0, 'UTC')
          + CASE WHEN date_trunc('day', h0, 'UTC') < h0 THEN interval '1 day' ELSE interval '0' END;
    d1 := date_trunc('day', h1, 'UTC');
    IF d0 >= d1 THEN
        RETURN QUERY SELECT 'hour', h0, h1;
    ELSE
        IF h0 < d0 THEN RETURN QUERY SELECT 'hour', h0, d0; END IF;
        RETURN QUERY SELECT 'day', d0, d1;
        IF d1 < h1 THEN RETURN QUERY SELECT 'hour', d1, h1; END IF;
    END IF;
    IF h1 < p_end THEN
        RETURN QUERY SELECT 'raw', h1, p_end;
    END IF;
END
$$;

-- Hourly energy (kWh) of devices: whole hours from energy_readings_1h, the
-- partial hours at the edges from raw rows (attributed to their hour).
CREATE FUNCTION bmsd_energy_by_hour(p_devices integer[], p_start timestamptz,
                                    p_end timestamptz)
    RETURNS TABLE (device_id integer, hour timestamptz, energy_kwh double precision,
                   power_kw_n bigint, power_kw_sum double precision)
    LANGUAGE plpgsql STABLE
AS $$
DECLARE
    piece record;
BEGIN
    FOR piece IN SELECT * FROM bmsd_range_pieces(p_start, p_end) LOOP
        IF piece.kind = 'raw' THEN
            RETURN QUERY
                SELECT r.device_id, date_trunc('hour', r.time, 'UTC'), sum(r.energy_kwh),
                       count(r.power_kw), sum(r.power_kw)
                  FROM energy_readings r
                 WHERE r.device_id = ANY(p_devices) AND r.time >= piece.lo AND r.time < piece.hi
                 GROUP BY 1, 2;
        ELSE  -- whole hours (a day is 24 of them: cost and carbon need the hour)
            RETURN QUERY
                SELECT h.device_id, h.bucket, h.energy_kwh_sum, h.power_kw_n, h.power_kw_sum
                  FROM energy_readings_1h h
                 WHERE h.device_id = ANY(p_devices) AND h.bucket >= piece.lo
                   AND h.bucket < piece.hi;
        END IF;
    END LOOP;
END
$$;

-- Hourly energy (kWh) of devices together: the hours that carry energy.
CREATE FUNCTION bmsd_hourly_kwh(p_devices integer[], p_start timestamptz, p_end timestamptz)
    RETURNS TABLE (hour timestamptz, kwh double precision)
    LANGUAGE sql STABLE
AS $$
    SELECT b.hour, sum(b.energy_kwh)
      FROM bmsd_energy_by_hour(p_devices, p_start, p_end) b
     WHERE b.energy_kwh IS NOT NULL
     GROUP BY b.hour
$$;

-- 15-minute average power (kW) of devices: whole quarters from
-- energy_readings_15m, the partial quarters at the edges from raw rows.
CREATE FUNCTION bmsd_demand_by_quarter(p_devices integer[], p_start timestamptz,
                                       p_end timestamptz)
    RETURNS TABLE (device_id integer, quarter timestamptz, avg_kw double precision)
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
        SELECT r.device_id, time_bucket(interval '15 minutes', r.time), avg(r.power_kw)
          FROM energy_readings r
         WHERE r.device_id = ANY(p_devices) AND r.power_kw IS NOT NULL
           AND ((r.time >= p_start AND r.time < least(q0, p_end))
                OR (r.time >= greatest(q1, p_start) AND r.time < p_end))
         GROUP BY 1, 2;
    RETURN QUERY
        SELECT q.device_id, q.bucket, bmsd_mean(q.power_kw_n, q.power_kw_sum)
          FROM energy_readings_15m q
         WHERE q.device_id = ANY(p_devices) AND q.bucket >= q0 AND q.bucket < q1
           AND q.power_kw_n > 0;
END
$$;

-- Units produced and rejected by devices, in parts: one row per device and
-- piece of the range (each a plain range query, so chunks are excluded).
CREATE FUNCTION bmsd_units_parts(p_devices integer[], p_start timestamptz, p_end timestamptz)
    RETURNS TABLE (device_id integer, produced bigint, rejected bigint)
    LANGUAGE plpgsql STABLE
AS $$
DECLARE
    piece record;
BEGIN
    FOR piece IN SELECT * FROM bmsd_range_pieces(p_start, p_end) LOOP
        IF piece.kind = 'raw' THEN
            RETURN QUERY
                SELECT r.device_id, sum(r.units_produced)::bigint, sum(r.units_rejected)::bigint
                  FROM production_data r
                 WHERE r.device_id = ANY(p_devices) AND r.time >= piece.lo AND r.time < piece.hi
                 GROUP BY r.device_id;
        ELSIF piece.kind = 'hour' THEN
            RETURN QUERY
                SELECT h.device_id, sum(h.units_produced_sum)::bigint,
                       sum(h.units_rejected_sum)::bigint
                  FROM production_data_1h h
                 WHERE h.device_id = ANY(p_devices) AND h.bucket >= piece.lo
                   AND h.bucket < piece.hi
                 GROUP BY h.device_id;
        ELSE
            RETURN QUERY
                SELECT d.device_id, sum(d.units_produced_sum)::bigint,
                       sum(d.units_rejected_sum)::bigint
                  FROM production_data_1d d
                 WHERE d.device_id = ANY(p_devices) AND d.bucket >= piece.lo
                   AND d.bucket < piece.hi
                 GROUP BY d.device_id;
        END IF;
    END LOOP;
END
$$;

-- Units produced and rejected by devices.
CREATE FUNCTION bmsd_units(p_devices integer[], p_start timestamptz, p_end timestamptz)
    RETURNS TABLE (device_id integer, produced bigint, rejected bigint)
    LANGUAGE sql STABLE
AS $$
    SELECT u.device_id, sum(u.produced)::bigint, sum(u.rejected)::bigint
      FROM bmsd_units_parts(p_devices, p_start, p_end) u
     GROUP BY u.device_id
$$;

-- The tariff band and price in force for a site at an instant (site-local
-- hour and ISO weekday; the newest valid_from wins where bands overlap).
CREATE FUNCTION bmsd_tariff_at(p_site integer, p_at timestamptz)
    RETURNS TABLE (band text, price_per_kwh numeric, currency text)
    LANGUAGE sql STABLE
AS $$
    SELECT t.band, t.price_per_kwh, t.currency
      FROM energy_tariffs t JOIN sites s ON s.id = t.site_id
     WHERE t.site_id = p_site AND t.valid_from <= p_at
       AND (t.valid_until IS NULL OR p_at < t.valid_until)
       AND extract(hour FROM p_at AT TIME ZONE s.timezone) >= t.start_hour
       AND extract(hour FROM p_at AT TIME ZONE s.timezone) < t.end_hour
       AND extract(isodow FROM p_at AT TIME ZONE s.timezone)::smallint = ANY(t.weekdays)
     ORDER BY t.valid_from DESC, t.id DESC
     LIMIT 1
$$;

-- The emission factor (kg CO2 per kWh) in force for a site at an instant:
-- the site's own factor, else its grid region's; the newest valid_from wins.
CREATE FUNCTION bmsd_carbon_factor_at(p_site integer, p_at timestamptz)
    RETURNS double precision
    LANGUAGE sql STABLE
AS $$
    SELECT c.kg_co2_per_kwh
      FROM carbon_factors c JOIN sites s ON s.id = p_site
     WHERE (c.site_id = p_site OR (c.site_id IS NULL AND c.region = s.grid_region))
       AND c.valid_from <= p_at AND (c.valid_until IS NULL OR p_at < c.valid_until)
     ORDER BY (c.site_id IS NOT NULL) DESC, c.valid_from DESC
     LIMIT 1
$$;

-- --- the EnMS KPI functions ----------------------------------------------------------

-- Specific energy consumption: kWh per unit produced (NULL when nothing was produced).
CREATE FUNCTION calculate_sec(p_device integer, p_start timestamptz, p_end timestamptz)
    RETURNS TABLE (energy_kwh double precision, units_produced bigint,
                   sec_kwh_per_unit double precision)
    LANGUAGE sql STABLE
AS $$
    WITH e AS (SELECT sum(b.energy_kwh) AS kwh
                 FROM bmsd_energy_by_hour(ARRAY[p_device], p_start, p_end) b),
         u AS (SELECT sum(x.produced)::bigint AS units
                 FROM bmsd_units(ARRAY[p_device], p_start, p_end) x)
    SELECT e.kwh, u.units, e.kwh / nullif(u.units, 0) FROM e, u
$$;

-- The highest 15-minute average power (kW) and when its quarter began.
CREATE FUNCTION calculate_peak_demand(p_device integer, p_start timestamptz,
                                      p_end timestamptz)
    RETURNS TABLE (peak_kw double precision, peak_at timestamptz)
    LANGUAGE sql STABLE
AS $$
    SELECT q.avg_kw, q.quarter
      FROM bmsd_demand_by_quarter(ARRAY[p_device], p_start, p_end) q
     ORDER BY q.avg_kw DESC, q.quarter
     LIMIT 1
$$;

-- Load factor: the mean of all power samples over the peak 15-minute average.
CREATE FUNCTION calculate_load_factor(p_device integer, p_start timestamptz,
                                      p_end timestamptz)
    RETURNS TABLE (average_kw double precision, peak_kw double precision,
                   load_factor double precision)
    LANGUAGE sql STABLE
AS $$
    WITH a AS (SELECT sum(b.power_kw_sum) / nullif(sum(b.power_kw_n), 0) AS avg_kw
                 FROM bmsd_energy_by_hour(ARRAY[p_device], p_start, p_end) b),
         p AS (SELECT max(q.avg_kw) AS peak
                 FROM bmsd_demand_by_quarter(ARRAY[p_device], p_start, p_end) q)
    SELECT a.avg_kw, p.peak, a.avg_kw / nullif(p.peak, 0) FROM a, p
$$;

-- Energy cost by time-of-use band (site-local hours), and a 'total' row.
-- Energy in hours without a tariff is reported as band 'unpriced', cost NULL.
CREATE FUNCTION calculate_energy_cost(p_device integer, p_start timestamptz,
                                      p_end timestamptz)
    RETURNS TABLE (band text, energy_kwh double precision, cost numeric, currency text)
    LANGUAGE sql STABLE
AS $$
    WITH hours AS (
        SELECT * FROM bmsd_hourly_kwh(ARRAY[p_device], p_start, p_end)
    ), priced AS (
        SELECT coalesce(t.band, 'unpriced') AS band, h.kwh,
               h.kwh::numeric * t.price_per_kwh AS cost, t.currency
          FROM hours h
          LEFT JOIN LATERAL bmsd_tariff_at((SELECT site_id FROM devices WHERE id = p_device),
                                           h.hour) t ON true
    ), bands AS (
        SELECT p.band, sum(p.kwh) AS kwh, sum(p.cost) AS cost, max(p.currency) AS currency
          FROM priced p GROUP BY p.band
    )
    SELECT b.band, b.kwh, round(b.cost, 4), b.currency FROM bands b
    UNION ALL
    SELECT 'total', sum(b.kwh), round(sum(b.cost), 4), max(b.currency) FROM bands b
     HAVING count(*) > 0
$$;

-- Carbon: kg CO2 from the factor in force each hour, in all and per unit produced.
CREATE FUNCTION calculate_carbon_intensity(p_device integer, p_start timestamptz,
                                           p_end timestamptz)
    RETURNS TABLE (energy_kwh double precision, kg_co2 double precision,
                   units_produced bigint, kg_co2_per_unit double precision)
    LANGUAGE sql STABLE
AS $$
    WITH hours AS (
        SELECT * FROM bmsd_hourly_kwh(ARRAY[p_device], p_start, p_end)
    ), kg AS (
        SELECT sum(h.kwh) AS kwh,
               sum(h.kwh * bmsd_carbon_factor_at(
                   (SELECT site_id FROM devices WHERE id = p_device), h.hour)) AS kg
          FROM hours h
    ), u AS (SELECT sum(x.produced)::bigint AS units
               FROM bmsd_units(ARRAY[p_device], p_start, p_end) x)
    SELECT kg.kwh, kg.kg, u.units, kg.kg / nullif(u.units, 0) FROM kg, u
$$;

-- Hours in each machine state. A state holds from its reading until the next
-- one (or the end of the range); the state at p_start is that of the last
-- reading before it. Read from raw rows: the state timeline needs them.
CREATE FUNCTION get_machine_operating_hours(p_device integer, p_start timestamptz,
                                            p_end timestamptz)
    RETURNS TABLE (machine_state text, hours double precision)
    LANGUAGE sql STABLE
AS $$
    WITH readings AS (
        (SELECT p_start AS time, r.machine_state FROM production_data r
          WHERE r.device_id = p_device AND r.time < p_start AND r.machine_state IS NOT NULL
          ORDER BY r.time DESC LIMIT 1)
        UNION ALL
        SELECT r.time, r.machine_state FROM production_data r
         WHERE r.device_id = p_device AND r.time >= p_start AND r.time < p_end
           AND r.machine_state IS NOT NULL
    ), spans AS (
        SELECT r.machine_state,
               extract(epoch FROM lead(r.time, 1, p_end) OVER (ORDER BY r.time) - r.time)
                   AS seconds
          FROM readings r
    )
    SELECT s.state, coalesce(sum(spans.seconds), 0) / 3600.0
      FROM unnest(ARRAY['running', 'idle', 'stopped', 'fault', 'maintenance']) AS s (state)
      LEFT JOIN spans ON spans.machine_state = s.state
     GROUP BY s.state
     ORDER BY array_position(ARRAY['running', 'idle', 'stopped', 'fault', 'maintenance'],
                             s.state)
$$;

-- Every KPI of a machine in one row.
CREATE FUNCTION calculate_all_kpis(p_device integer, p_start timestamptz, p_end timestamptz)
    RETURNS TABLE (energy_kwh double precision, units_produced bigint,
                   sec_kwh_per_unit double precision, peak_kw double precision,
                   peak_at timestamptz, average_kw double precision,
                   load_factor double precision, cost numeric, currency text,
                   kg_co2 double precision, kg_co2_per_unit double precision)
    LANGUAGE sql STABLE
AS $$
    SELECT s.energy_kwh, s.units_produced, s.sec_kwh_per_unit, p.peak_kw, p.peak_at,
           l.average_kw, l.load_factor, c.cost, c.currency, k.kg_co2, k.kg_co2_per_unit
      FROM calculate_sec(p_device, p_start, p_end) s
      LEFT JOIN calculate_peak_demand(p_device, p_start, p_end) p ON true
      LEFT JOIN calculate_load_factor(p_device, p_start, p_end) l ON true
      LEFT JOIN calculate_energy_cost(p_device, p_start, p_end) c ON c.band = 'total'
      LEFT JOIN calculate_carbon_intensity(p_device, p_start, p_end) k ON true
$$;

-- A site's machines together, in one pass over the hourly aggregate (raw rows
-- at the edges): per hour, their energy and an upper bound on any 15-minute
-- average of their summed power in that hour (the sum of each machine's
-- highest sample); and, per machine, whether it reported any energy reading.
CREATE FUNCTION bmsd_site_hours(p_devices integer[], p_start timestamptz, p_end timestamptz)
    RETURNS TABLE (hour timestamptz, device_id integer, kwh double precision,
                   upper_kw double precision)
    LANGUAGE plpgsql STABLE
AS $$
DECLARE
    piece record;
BEGIN
    FOR piece IN SELECT * FROM bmsd_range_pieces(p_start, p_end) LOOP
        IF piece.kind = 'raw' THEN
            RETURN QUERY
                SELECT x.hour, x.device_id, sum(x.kwh), sum(x.top)
                  FROM (SELECT date_trunc('hour', r.time, 'UTC') AS hour, r.device_id,
                               sum(r.energy_kwh) AS kwh, max(r.power_kw) AS top
                          FROM energy_readings r
                         WHERE r.device_id = ANY(p_devices) AND r.time >= piece.lo
                           AND r.time < piece.hi
                         GROUP BY 1, 2) x
                 GROUP BY GROUPING SETS ((x.hour), (x.device_id));
        ELSE
            RETURN QUERY
                SELECT h.bucket, h.device_id, sum(h.energy_kwh_sum), sum(h.power_kw_max)
                  FROM energy_readings_1h h
                 WHERE h.device_id = ANY(p_devices) AND h.bucket >= piece.lo
                   AND h.bucket < piece.hi
                 GROUP BY GROUPING SETS ((h.bucket), (h.device_id));
        END IF;
    END LOOP;
END
$$;

-- The highest 15-minute average of the devices' summed power, searching the
-- hours in decreasing order of their upper bound and stopping when no hour
-- left can beat the best quarter found (exact, and reads few quarters).
CREATE FUNCTION bmsd_site_peak(p_devices integer[], p_start timestamptz, p_end timestamptz,
                               p_hours timestamptz[], p_upper double precision[])
    RETURNS TABLE (peak_kw double precision, peak_at timestamptz)
    LANGUAGE plpgsql STABLE
AS $$
DECLARE
    best double precision;
    best_at timestamptz;
    candidate record;
    q record;
BEGIN
    FOR candidate IN
        SELECT c.hour, c.upper FROM unnest(p_hours, p_upper) AS c (hour, upper)
         WHERE c.upper IS NOT NULL ORDER BY c.upper DESC, c.hour
    LOOP
        EXIT WHEN best IS NOT NULL AND candidate.upper < best;
        SELECT d.quarter, sum(d.avg_kw) AS kw INTO q
          FROM bmsd_demand_by_quarter(p_devices, greatest(candidate.hour, p_start),
                                      least(candidate.hour + interval '1 hour', p_end)) d
         GROUP BY d.quarter ORDER BY kw DESC, d.quarter LIMIT 1;
        IF q.kw IS NOT NULL AND (best IS NULL OR q.kw > best
                                 OR (q.kw = best AND q.quarter < best_at)) THEN
            best := q.kw;
            best_at := q.quarter;
        END IF;
    END LOOP;
    IF best IS NOT NULL THEN
        RETURN QUERY SELECT best, best_at;
    END IF;
END
$$;

-- One row per site: energy, cost, carbon, units, SEC, peak demand (the highest
-- 15-minute average of the site's machines together), devices reporting.
CREATE FUNCTION get_factory_summary(p_site integer, p_start timestamptz, p_end timestamptz)
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
        SELECT p.hour, sum(p.kwh) AS kwh, sum(p.upper_kw) AS upper
          FROM pass p WHERE p.hour IS NOT NULL GROUP BY p.hour
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
        SELECT pk.* FROM devs, bmsd_site_peak(
            devs.ids, p_start, p_end,
            (SELECT array_agg(sh.hour) FROM site_hours sh),
            (SELECT array_agg(sh.upper) FROM site_hours sh)) pk
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

-- --- batteries (PulseBMS design) and site energy flows (BMS design) ---------------------

-- Per battery pack and site-local day: energy charged and discharged (kWh,
-- from the hourly aggregates: whole hours whose bucket starts in the range),
-- net (charged - discharged), equivalent full cycles (discharged / nominal
-- capacity kWh), partial cycles (runs of hours with net discharge), and the
-- readings that carried alarm or protection flags.
CREATE FUNCTION battery_daily_metrics(p_device integer, p_start timestamptz,
                                      p_end timestamptz)
    RETURNS TABLE (day date, charged_kwh double precision, discharged_kwh double precision,
                   net_kwh double precision, equivalent_full_cycles double precision,
                   partial_cycles bigint, alarm_readings bigint, protection_readings bigint)
    LANGUAGE sql STABLE
AS $$
    WITH hours AS (
        SELECT (h.bucket AT TIME ZONE s.timezone)::date AS day, h.bucket,
               h.energy_charged_kwh AS charged, h.energy_discharged_kwh AS discharged,
               h.alarm_readings, h.protection_readings, d.nominal_capacity_kwh AS capacity
          FROM battery_telemetry_1h h
          JOIN devices d ON d.id = h.device_id JOIN sites s ON s.id = d.site_id
         WHERE h.device_id = p_device AND h.bucket >= p_start AND h.bucket < p_end
    ), runs AS (
        SELECT hours.*, (discharged > charged)
                        AND NOT coalesce(lag(discharged > charged) OVER (ORDER BY bucket), false)
                        AS starts_discharge
          FROM hours
    )
    SELECT day, sum(charged), sum(discharged), sum(charged) - sum(discharged),
           sum(discharged) / nullif(max(capacity), 0),
           count(*) FILTER (WHERE starts_discharge), sum(alarm_readings)::bigint,
           sum(protection_readings)::bigint
      FROM runs GROUP BY day ORDER BY day
$$;

-- Alarm flags of a battery pack: readings carrying each flag, first and last
-- seen, and how long it was raised (each flagged reading counts until the
-- pack's next reading, at most to the end of the range).
CREATE FUNCTION battery_alarm_summary(p_device integer, p_start timestamptz,
                                      p_end timestamptz)
    RETURNS TABLE (flag text, readings bigint, first_seen timestamptz,
                   last_seen timestamptz, hours double precision)
    LANGUAGE sql STABLE
AS $$
    WITH r AS (
        SELECT b.time, b.alarm_flags, lead(b.time, 1, p_end) OVER (ORDER BY b.time) AS next
          FROM battery_telemetry b
         WHERE b.device_id = p_device AND b.time >= p_start AND b.time < p_end
    )
    SELECT f.flag, count(*), min(r.time), max(r.time),
           sum(extract(epoch FROM r.next - r.time)) / 3600.0
      FROM r CROSS JOIN LATERAL unnest(r.alarm_flags) AS f (flag)
     GROUP BY f.flag ORDER BY f.flag
$$;

-- Per site and site-local day: solar produced, grid imported and exported,
-- load consumed, battery charged and discharged (kWh), and the
-- self-consumption ratio ((solar - exported) / solar; NULL without solar).
CREATE FUNCTION site_energy_flows(p_site integer, p_start timestamptz, p_end timestamptz)
    RETURNS TABLE (day date, solar_kwh double precision, grid_import_kwh double precision,
                   grid_export_kwh double precision, load_kwh double precision,
                   battery_charged_kwh double precision,
                   battery_discharged_kwh double precision,
                   self_consumption_ratio double precision)
    LANGUAGE sql STABLE
AS $$
    WITH days AS (
        SELECT (h.bucket AT TIME ZONE s.timezone)::date AS day,
               sum(h.solar_energy_kwh_sum) AS solar, sum(h.grid_import_kwh) AS import,
               sum(h.grid_export_kwh) AS export, sum(h.load_energy_kwh_sum) AS load,
               sum(h.battery_charged_kwh) AS charged, sum(h.battery_discharged_kwh) AS discharged
          FROM site_telemetry_1h h
          JOIN devices d ON d.id = h.device_id JOIN sites s ON s.id = d.site_id
         WHERE d.site_id = p_site AND h.bucket >= p_start AND h.bucket < p_end
         GROUP BY 1
    )
    SELECT day, solar, import, export, load, charged, discharged,
           (solar - coalesce(export, 0)) / nullif(solar, 0)
      FROM days ORDER BY day
$$;

GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA public TO bmsd_reader;

INSERT INTO bmsd_migrations (name) VALUES ('140_kpi_functions.sql') ON CONFLICT (name) DO NOTHING;
