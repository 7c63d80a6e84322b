-- bmsd schema 030: the telemetry hypertables.
--
-- Partitioned by time only, in 1-day chunks. The UNIQUE index on
-- (device_id, time DESC) lets the daemon ignore readings redelivered after a
-- crash, and also serves "latest reading per device" (a backward scan).
-- Every *_energy_kwh column is the energy of the interval since the device's
-- previous reading, not a meter total. Fields a payload carried that the
-- schema does not know are kept in `extra` (NULL when there were none).
-- There is no foreign key from device_id to devices: a per-row FK check would
-- cost bulk COPY dearly, and the daemon only writes ids it took from devices.

-- Helpers for the derived columns of battery_telemetry (immutable, so they
-- can feed generated columns).
CREATE FUNCTION bmsd_array_min(double precision[]) RETURNS double precision
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS 'SELECT min(v) FROM unnest($1) AS v';

CREATE FUNCTION bmsd_array_max(double precision[]) RETURNS double precision
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS 'SELECT max(v) FROM unnest($1) AS v';

-- Site-level telemetry of the BMS design. Power signs: grid_power_kw > 0 is
-- import, < 0 export (grid_energy_kwh likewise); battery_power_kw > 0 is
-- discharging, < 0 charging, as battery current in battery_telemetry.
CREATE TABLE site_telemetry (
    time                     timestamptz NOT NULL,
    device_id                integer NOT NULL,
    battery_voltage          double precision,
    battery_current          double precision,
    battery_charge_level     double precision CHECK (battery_charge_level BETWEEN 0 AND 100),
    battery_temperature      double precision,
    battery_state_of_health  double precision CHECK (battery_state_of_health BETWEEN 0 AND 100),
    battery_power_kw         double precision,
    solar_power_kw           double precision,
    solar_energy_kwh         double precision CHECK (solar_energy_kwh >= 0),
    solar_efficiency         double precision,
    inverter1_power_kw       double precision,
    inverter1_efficiency     double precision,
    inverter1_temperature    double precision,
    inverter2_power_kw       double precision,
    inverter2_efficiency     double precision,
    inverter2_temperature    double precision,
    grid_voltage             double precision,
    grid_frequency           double precision,
    grid_power_kw            double precision,
    grid_energy_kwh          double precision,
    load_power_kw            double precision,
    load_energy_kwh          double precision CHECK (load_energy_kwh >= 0),
    extra                    jsonb
);

-- Pack- and cell-level battery telemetry (PulseBMS design). current < 0 and
-- power_w < 0 while charging.
CREATE TABLE battery_telemetry (
    time                      timestamptz NOT NULL,
    device_id                 integer NOT NULL,
    voltage                   double precision,
    current                   double precision,
    power_w                   double precision,
    temperature               double precision,
    soc                       double precision CHECK (soc BETWEEN 0 AND 100),
    soh                       double precision CHECK (soh BETWEEN 0 AND 100),
    internal_resistance       double precision,
    cell_voltages             double precision[],
    cell_temperatures         double precision[],
    balancing                 boolean[],
    alarm_flags               text[],
    over_voltage              boolean,
    under_voltage             boolean,
    over_current              boolean,
    over_temperature          boolean,
    data_quality              double precision CHECK (data_quality BETWEEN 0 AND 1),
    firmware_version          text,
    communication_latency_ms  double precision,
    -- Derived per reading, so aggregates and alerts need not unpack arrays.
    min_cell_voltage          double precision
                              GENERATED ALWAYS AS (bmsd_array_min(cell_voltages)) STORED,
    max_cell_voltage          double precision
                              GENERATED ALWAYS AS (bmsd_array_max(cell_voltages)) STORED,
    min_cell_temperature      double precision
                              GENERATED ALWAYS AS (bmsd_array_min(cell_temperatures)) STORED,
    max_cell_temperature      double precision
                              GENERATED ALWAYS AS (bmsd_array_max(cell_temperatures)) STORED,
    cell_temperature_spread   double precision
                              GENERATED ALWAYS AS (bmsd_array_max(cell_temperatures)
                                                   - bmsd_array_min(cell_temperatures)) STORED,
    alarm_count               integer
                              GENERATED ALWAYS AS (coalesce(cardinality(alarm_flags), 0)) STORED,
    extra                     jsonb
);

-- Machine energy (EnMS design).
CREATE TABLE energy_readings (
    time          timestamptz NOT NULL,
    device_id     integer NOT NULL,
    power_kw      double precision,
    energy_kwh    double precision CHECK (energy_kwh >= 0),
    voltage       double precision,
    current       double precision,
    power_factor  double precision CHECK (power_factor BETWEEN -1 AND 1),
    frequency     double precision,
    extra         jsonb
);

-- Machine production (EnMS design); units are counted for the interval since
-- the previous reading.
CREATE TABLE production_data (
    time            timestamptz NOT NULL,
    device_id       integer NOT NULL,
    units_produced  integer CHECK (units_produced >= 0),
    units_rejected  integer CHECK (units_rejected >= 0),
    machine_state   text CHECK (machine_state IN ('running', 'idle', 'stopped', 'fault',
                                                  'maintenance')),
    cycle_time_s    double precision CHECK (cycle_time_s >= 0),
    extra           jsonb
);

-- Ambient conditions (EnMS design).
CREATE TABLE environmental_data (
    time         timestamptz NOT NULL,
    device_id    integer NOT NULL,
    temperature  double precision,
    humidity     double precision CHECK (humidity BETWEEN 0 AND 100),
    pressure_hpa double precision CHECK (pressure_hpa > 0),
    co2_ppm      double precision CHECK (co2_ppm >= 0),
    extra        jsonb
);

SELECT create_hypertable('site_telemetry', by_range('time', INTERVAL '1 day'));
SELECT create_hypertable('battery_telemetry', by_range('time', INTERVAL '1 day'));
SELECT create_hypertable('energy_readings', by_range('time', INTERVAL '1 day'));
SELECT create_hypertable('production_data', by_range('time', INTERVAL '1 day'));
SELECT create_hypertable('environmental_data', by_range('time', INTERVAL '1 day'));

CREATE UNIQUE INDEX site_telemetry_device_time ON site_telemetry (device_id, time DESC);
CREATE UNIQUE INDEX battery_telemetry_device_time ON battery_telemetry (device_id, time DESC);
CREATE UNIQUE INDEX energy_readings_device_time ON energy_readings (device_id, time DESC);
CREATE UNIQUE INDEX production_data_device_time ON production_data (device_id, time DESC);
CREATE UNIQUE INDEX environmental_data_device_time ON environmental_data (device_id, time DESC);

INSERT INTO bmsd_migrations (name) VALUES ('030_hypertables.sql') ON CONFLICT (name) DO NOTHING;
