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
       count(d.id) FILTER (WHERE d.last_seen_at > now() - interval '15 minutes')
           AS devices_reporting,
       count(d.id) FILTER (WHERE d.last_seen_at IS NULL
                              OR d.last_seen_at <= now() - interval '15 minutes')
           AS devices_silent,
       (SELECT count(*) FROM alerts a WHERE a.site_id = s.id AND a.status <> 'resolved'
           AND a.severity = 'critical') AS alerts_critical,
       (SELECT count(*) FROM alerts a WHERE a.site_id = s.id AND a.status <> 'resolved'
           AND a.severity = 'error') AS alerts_error,
       (SELECT count(*) FROM alerts a WHERE a.site_id = s.id AND a.status <> 'resolved'
           AND a.severity = 'warning') AS alerts_warning,
       (SELECT count(*) FROM alerts a WHERE a.site_id = s.id AND a.status <> 'resolved'
           AND a.severity = 'info') AS alerts_info,
       coalesce((SELECT avg(b.soc) FROM latest_battery_telemetry b WHERE b.site_id = s.id),
                (SELECT avg(t.battery_charge_level) FROM latest_site_telemetry t
                  WHERE t.site_id = s.id)) AS latest_soc,
       (SELECT sum(t.solar_power_kw) FROM latest_site_telemetry t WHERE t.site_id = s.id)
           AS solar_power_kw,
       (SELECT sum(t.grid_power_kw) FROM latest_site_telemetry t WHERE t.site_id = s.id)
           AS grid_power_kw,
       (SELECT sum(t.load_power_kw) FROM latest_site_telemetry t WHERE t.site_id = s.id)
           AS load_power_kw,
       (SELECT sum(t.battery_power_kw) FROM latest_site_telemetry t WHERE t.site_id = s.id)
           AS battery_power_kw
  FROM sites s
  LEFT JOIN devices d ON d.site_id = s.id
 GROUP BY s.id;

GRANT SELECT ON v_machines_current_status, v_site_overview TO bmsd_reader;

INSERT INTO bmsd_migrations (name) VALUES ('150_overview_views.sql') ON CONFLICT (name) DO NOTHING;
