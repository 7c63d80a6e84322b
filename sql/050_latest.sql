-- bmsd schema 050: the latest reading of every device, fast.
--
-- One view per stream, latest_<stream>, with the site and device slugs in
-- front; and latest_readings(site) returning every stream at once as jsonb.
-- Each starts from device_streams, so it probes a hypertable only for the
-- devices that wrote to it, and each probe is a backward scan of the
-- (device_id, time DESC) index of the newest chunk that has the device.

CREATE VIEW latest_site_telemetry AS
SELECT si.slug AS site, d.slug AS device, d.site_id, r.*
  FROM device_streams ds
  JOIN devices d ON d.id = ds.device_id
  JOIN sites si ON si.id = d.site_id
 CROSS JOIN LATERAL (
       SELECT * FROM site_telemetry t
        WHERE t.device_id = ds.device_id
        ORDER BY t.time DESC
        LIMIT 1) r
 WHERE ds.stream = 'site_telemetry';

CREATE VIEW latest_battery_telemetry AS
SELECT si.slug AS site, d.slug AS device, d.site_id, r.*
  FROM device_streams ds
  JOIN devices d ON d.id = ds.device_id
  JOIN sites si ON si.id = d.site_id
 CROSS JOIN LATERAL (
       SELECT * FROM battery_telemetry t
        WHERE t.device_id = ds.device_id
        ORDER BY t.time DESC
        LIMIT 1) r
 WHERE ds.stream = 'battery_telemetry';

CREATE VIEW latest_energy_readings AS
SELECT si.slug AS site, d.slug AS device, d.site_id, r.*
  FROM device_streams ds
  JOIN devices d ON d.id = ds.device_id
  JOIN sites si ON si.id = d.site_id
 CROSS JOIN LATERAL (
       SELECT * FROM energy_readings t
        WHERE t.device_id = ds.device_id
        ORDER BY t.time DESC
        LIMIT 1) r
 WHERE ds.stream = 'energy_readings';

CREATE VIEW latest_production_data AS
SELECT si.slug AS site, d.slug AS device, d.site_id, r.*
  FROM device_streams ds
  JOIN devices d ON d.id = ds.device_id
  JOIN sites si ON si.id = d.site_id
 CROSS JOIN LATERAL (
       SELECT * FROM production_data t
        WHERE t.device_id = ds.device_id
        ORDER BY t.time DESC
        LIMIT 1) r
 WHERE ds.stream = 'production_data';

CREATE VIEW latest_environmental_data AS
SELECT si.slug AS site, d.slug AS device, d.site_id, r.*
  FROM device_streams ds
  JOIN devices d ON d.id = ds.device_id
  JOIN sites si ON si.id = d.site_id
 CROSS JOIN LATERAL (
       SELECT * FROM environmental_data t
        WHERE t.device_id = ds.device_id
        ORDER BY t.time DESC
        LIMIT 1) r
 WHERE ds.stream = 'environmental_data';

-- Every device's latest reading in every stream it sends, for one site (or
-- all sites when p_site is NULL).
CREATE FUNCTION latest_readings(p_site text DEFAULT NULL)
    RETURNS TABLE (site text, device text, stream text, "time" timestamptz, reading jsonb)
    LANGUAGE sql STABLE
AS $$
    SELECT site, device, 'site_telemetry'::text, time, to_jsonb(l) - 'site' - 'device' - 'site_id' - 'time'
      FROM latest_site_telemetry l WHERE p_site IS NULL OR site = p_site
    UNION ALL
    SELECT site, device, 'battery_telemetry'::text, time, to_jsonb(l) - 'site' - 'device' - 'site_id' - 'time'
      FROM latest_battery_telemetry l WHERE p_site IS NULL OR site = p_site
    UNION ALL
    SELECT site, device, 'energy_readings'::text, time, to_jsonb(l) - 'site' - 'device' - 'site_id' - 'time'
      FROM latest_energy_readings l WHERE p_site IS NULL OR site = p_site
    UNION ALL
    SELECT site, device, 'production_data'::text, time, to_jsonb(l) - 'site' - 'device' - 'site_id' - 'time'
      FROM latest_production_data l WHERE p_site IS NULL OR site = p_site
    UNION ALL
    SELECT site, device, 'environmental_data'::text, time, to_jsonb(l) - 'site' - 'device' - 'site_id' - 'time'
      FROM latest_environmental_data l WHERE p_site IS NULL OR site = p_site
$$;

INSERT INTO bmsd_migrations (name) VALUES ('050_latest.sql') ON CONFLICT (name) DO NOTHING;
