-- bmsd demo data: the EnMS background document's two plants and their
-- machines, a battery site, and tariffs and carbon factors for them and for
-- the sites `bmsd simulate` publishes to. Loaded on request only
-- (`bmsd migrate --demo-data`; `scripts/demo` does), never by the container's
-- init scripts or a plain `bmsd migrate`. Safe to load twice.

INSERT INTO organizations (slug, name) VALUES ('demo', 'Demo Energy Co.')
ON CONFLICT (slug) DO NOTHING;

INSERT INTO sites (organization_id, slug, kind, name, timezone, location, grid_region,
                   nominal_grid_frequency_hz)
SELECT o.id, v.slug, v.kind, v.name, v.tz, v.location, v.region, v.hz
  FROM organizations o,
       (VALUES ('demo', 'factory', 'Demo Manufacturing Plant', 'America/Los_Angeles',
                'Silicon Valley, CA', 'US-CAISO', 60),
               ('europe', 'factory', 'European Production Facility', 'Europe/Berlin',
                'Munich, Germany', 'DE', 50),
               ('solar-park', 'site', 'Solar Park with Battery Storage', 'Europe/Berlin',
                'Bavaria, Germany', 'DE', 50),
               ('site-00', 'site', 'Simulated battery site 00', 'Europe/Berlin', NULL, 'DE', 50),
               ('plant-01', 'factory', 'Simulated plant 01', 'Europe/Berlin', NULL, 'DE', 50),
               ('site-02', 'site', 'Simulated battery site 02', 'Europe/Berlin', NULL, 'DE', 50),
               ('plant-03', 'factory', 'Simulated plant 03', 'Europe/Berlin', NULL, 'DE', 50))
       AS v (slug, kind, name, tz, location, region, hz)
 WHERE o.slug = 'demo'
ON CONFLICT (slug) DO NOTHING;

-- The EnMS demo machines; their topics are factory/<site>/<device>/<stream>.
INSERT INTO devices (site_id, slug, kind, name, metadata)
SELECT s.id, v.slug, v.kind, v.name, jsonb_build_object('data_interval_s', v.interval_s)
  FROM sites s
  JOIN (VALUES ('demo', 'compressor-1', 'compressor', 'Compressor-1', 1),
               ('demo', 'hvac-main', 'hvac', 'HVAC-Main', 10),
               ('demo', 'conveyor-a', 'motor', 'Conveyor-A', 10),
               ('demo', 'hydraulic-pump-1', 'pump', 'Hydraulic-Pump-1', 30),
               ('demo', 'injection-molding-1', 'injection_molding', 'Injection-Molding-1', 30),
               ('europe', 'compressor-eu-1', 'compressor', 'Compressor-EU-1', 1),
               ('europe', 'hvac-eu-north', 'hvac', 'HVAC-EU-North', 10))
       AS v (site, slug, kind, name, interval_s) ON v.site = s.slug
ON CONFLICT (site_id, slug) DO NOTHING;

INSERT INTO devices (site_id, slug, kind, name, chemistry, nominal_capacity_ah,
                     nominal_capacity_kwh, nominal_voltage, series_cells, parallel_cells)
SELECT s.id, v.slug, 'battery_pack', v.name, 'LFP', 280, 107.5, 384, 120, 1
  FROM sites s
  JOIN (VALUES ('solar-park', 'pack-01', 'Battery pack 1'),
               ('solar-park', 'pack-02', 'Battery pack 2')) AS v (site, slug, name)
    ON v.site = s.slug
ON CONFLICT (site_id, slug) DO NOTHING;

-- Pack 2 is an older pack with tighter limits.
INSERT INTO safety_constraints (device_id, max_cell_voltage, max_cell_temperature,
                                max_charge_current, effective_from)
SELECT d.id, 3.65, 55, 40, '2025-01-01'
  FROM devices d JOIN sites s ON s.id = d.site_id
 WHERE s.slug = 'solar-park' AND d.slug = 'pack-02'
   AND NOT EXISTS (SELECT 1 FROM safety_constraints c WHERE c.device_id = d.id);

-- Time-of-use tariffs: peak on weekdays 08-20 local, off-peak otherwise.
INSERT INTO energy_tariffs (site_id, band, price_per_kwh, currency, start_hour, end_hour,
                            weekdays, valid_from)
SELECT s.id, v.band, v.price * CASE WHEN s.slug = 'demo' THEN 0.9 ELSE 1 END,
       CASE WHEN s.slug = 'demo' THEN 'USD' ELSE 'EUR' END, v.h0, v.h1, v.days::smallint[],
       '2025-01-01'
  FROM sites s,
       (VALUES ('peak', 0.28, 8, 20, '{1,2,3,4,5}'),
               ('off_peak', 0.12, 0, 8, '{1,2,3,4,5}'),
               ('off_peak', 0.12, 20, 24, '{1,2,3,4,5}'),
               ('weekend', 0.10, 0, 24, '{6,7}')) AS v (band, price, h0, h1, days)
 WHERE s.slug IN ('demo', 'europe', 'plant-01', 'plant-03', 'solar-park', 'site-00', 'site-02')
   AND NOT EXISTS (SELECT 1 FROM energy_tariffs t WHERE t.site_id = s.id);

-- Grid emission factors by region (kg CO2 per kWh).
INSERT INTO carbon_factors (region, kg_co2_per_kwh, source, valid_from)
SELECT v.region, v.factor, v.source, '2025-01-01'
  FROM (VALUES ('US-CAISO', 0.23, 'demo figure'), ('DE', 0.38, 'demo figure'))
       AS v (region, factor, source)
 WHERE NOT EXISTS (SELECT 1 FROM carbon_factors c WHERE c.region = v.region);
