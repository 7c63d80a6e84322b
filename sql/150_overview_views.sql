-- bmsd schema 150: overview views for dashboards (no aggregates needed).

-- Each machine (a device of a factory site): its latest state and power,
-- when it was last heard from, and how many of its alerts are unresolved.
CREATE VIEW v_machines_current_status AS
SELECT d.id AS device_id, s.slug AS site, d.slug AS device, d.kind,
       st.machine_state, st.time AS state_at, pw.power_kw, pw.time AS power_at,
       d.last_seen_at, coalesce(a.unresolved, 0) AS unresolved_alerts
  FROM devices d
  JOIN sites s ON s.id = d.site_id
  LEFT JOIN LATERAL (
        SELECT p.machine_state, p.time FROM production_data p
         WHERE p.device_id = d.id
           AND EXISTS (SELECT 1 FROM device_streams ds
                        WHERE ds.device_id = d.id AND ds.stream = 'production_data')
         ORDER BY p.time DESC LIMIT 1) st ON true
  LEFT JOIN LATERAL (
        SELECT e.power_kw, e.time FROM energy_readings e
         WHERE e.device_id = d.id
           AND EXISTS (SELECT 1 FROM device_streams ds
                        WHERE ds.device_id = d.id AND ds.stream = 'energy_readings')
         ORDER BY e.time DESC LIMIT 1) pw ON true
  LEFT JOIN (SELECT al.device_id, count(*) AS unresolved FROM alerts al
              WHERE al.status <> 'resolved' GROUP BY al.device_id) a ON a.device_id = d.id
 WHERE s.kind = 'factory';

-- Each site: devices reporting in the last 15 minutes and silent ones,
-- unresolved alerts by severity, the latest state of charge (mean over its
-- packs' latest readings, else its site controllers') and latest power flows.
CREATE VIEW v_site_overview AS
SELECT s.id AS site_id, s.slug AS site, s.kind,
       (SELECT count(*) FROM devices d WHERE d.site_id = s.id
           AND d.last_seen_at > now() - interval '15 minutes') AS devices_reporting,
       (SELECT count(*) FROM devices d WHERE d.site_id = s.id
           AND (d.last_seen_at IS NULL OR d.last_seen_at <= now() - interval '15 minutes'))
           AS devices_silent,
       coalesce(a.critical, 0) AS alerts_critical, coalesce(a.error, 0) AS alerts_error,
       coalesce(a.warning, 0) AS alerts_warning, coalesce(a.info, 0) AS alerts_info,
       coalesce((SELECT avg(b.soc) FROM latest_battery_telemetry b WHERE b.site_id = s.id),
                f.charge_level) AS latest_soc,
       f.solar_power_kw, f.grid_power_kw, f.load_power_kw, f.battery_power_kw
  FROM sites s
  LEFT JOIN (SELECT al.site_id,
                    count(*) FILTER (WHERE al.severity = 'critical') AS critical,
                    count(*) FILTER (WHERE al.severity = 'error') AS error,
                    count(*) FILTER (WHERE al.severity = 'warning') AS warning,
                    count(*) FILTER (WHERE al.severity = 'info') AS info
               FROM alerts al WHERE al.status <> 'resolved' GROUP BY al.site_id) a
         ON a.site_id = s.id
  LEFT JOIN (SELECT t.site_id, avg(t.battery_charge_level) AS charge_level,
                    sum(t.solar_power_kw) AS solar_power_kw,
                    sum(t.grid_power_kw) AS grid_power_kw,
                    sum(t.load_power_kw) AS load_power_kw,
                    sum(t.battery_power_kw) AS battery_power_kw
               FROM latest_site_telemetry t GROUP BY t.site_id) f
         ON f.site_id = s.id;

GRANT SELECT ON v_machines_current_status, v_site_overview TO bmsd_reader;

INSERT INTO bmsd_migrations (name) VALUES ('150_overview_views.sql') ON CONFLICT (name) DO NOTHING;
