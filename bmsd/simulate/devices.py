"""The simulated devices: battery packs, site controllers, factory machines and an
ambient sensor, each with a simple physical model and its own random stream."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

MACHINES = (  # kind, slug prefix, seconds between readings, production stream?
    ("compressor", "compressor", 1.0, False),
    ("hvac", "hvac", 10.0, False),
    ("motor", "conveyor", 10.0, True),
    ("pump", "hydraulic-pump", 30.0, False),
    ("injection_molding", "injection-molding", 30.0, True),
)
BATTERY_INTERVAL_S = 5.0
SITE_INTERVAL_S = 10.0
SENSOR_INTERVAL_S = 60.0
STATES = ("running", "running", "running", "idle", "stopped", "maintenance", "fault")


@dataclass
class Device:
    """A simulated device with its physical state."""

    site: str
    slug: str
    kind: str
    rng: random.Random
    phase: float = 0.0
    soc: float = 60.0
    charging: bool = True
    drift: list[float] = field(default_factory=list)
    state: str = "running"
    hot_cell: bool = False  # one cell at 56 °C: an alarm flag, and an alert that stays open

    def reading(self, stream: str, when: datetime, interval_s: float,
                alert: bool) -> dict[str, Any]:
        """Return the next reading of *stream* at *when*."""
        hours = when.hour + when.minute / 60
        sun = max(0.0, math.sin((hours - 6) / 12 * math.pi))
        if stream == "battery_telemetry":
            return self._battery(interval_s, alert)
        if stream == "site_telemetry":
            return self._site(hours, sun, interval_s, alert)
        if stream == "energy_readings":
            return self._energy(interval_s)
        if stream == "production_data":
            return self._production()
        return self._environment(sun, alert)

    def _battery(self, interval_s: float, alert: bool) -> dict[str, Any]:
        r = self.rng
        step = interval_s / 3600 * 20  # about 20 % SoC an hour
        self.soc += step if self.charging else -step
        if self.soc >= 90 or self.soc <= 15:
            self.charging = not self.charging
        if not self.drift:
            self.drift = [r.gauss(0, 0.005) for _ in range(16)]
        self.drift = [d + r.gauss(0, 0.0005) for d in self.drift]
        current = (-40.0 if self.charging else 60.0) + r.gauss(0, 3)
        base = 3.2 + self.soc / 100 * 0.9
        cells = [round(min(max(base + d, 2.6), 4.15), 4) for d in self.drift]
        temps = [round(25 + abs(current) / 10 + r.gauss(0, 0.5) + i * 0.05, 2)
                 for i in range(16)]
        if self.hot_cell:  # warm enough for the pack's high_temp_warning flag
            temps[7] = round(56.5 + r.gauss(0, 0.3), 2)
        soc = self.soc
        if alert:
            choice = r.choice(("soc", "cell", "temp"))
            if choice == "soc":
                soc = r.uniform(1, 8)
            elif choice == "cell":
                cells[r.randrange(16)] = round(r.uniform(4.25, 4.4), 3)
            else:
                temps[r.randrange(16)] = round(r.uniform(62, 70), 2)
        voltage = round(sum(cells) * 12, 2)
        return {
            "voltage": voltage, "current": round(current, 2),
            "power_w": round(voltage * current, 1),
            "temperature": round(sum(temps) / len(temps), 2), "soc": round(soc, 2),
            "soh": 96.5, "internal_resistance": 0.045, "cell_voltages": cells,
            "cell_temperatures": temps, "balancing": [d > 0.01 for d in self.drift],
            "alarm_flags": ["high_temp_warning"] if max(temps) > 55 else [],
            "over_voltage": max(cells) > 4.25, "under_voltage": False,
            "over_current": False, "over_temperature": max(temps) > 60,
            "data_quality": 0.99, "firmware_version": "2.4.1",
            "communication_latency_ms": round(r.uniform(20, 120), 1),
        }
    def _site(self, hours: float, sun: float, interval_s: float,
              alert: bool) -> dict[str, Any]:
        r = self.rng
        solar = round(max(0.0, 40 * sun + r.gauss(0, 1)), 3)
        load = round(25 + 10 * math.sin(hours / 24 * 2 * math.pi) + r.gauss(0, 2), 3)
        battery = round(r.uniform(-15, 15), 3)  # > 0 discharging
        grid = round(load - solar - battery, 3)  # > 0 import
        hz = interval_s / 3600
        soc = round(self.soc, 2)
        self.soc = min(95.0, max(10.0, self.soc - battery * hz))
        return {
            "batteryVoltage": round(r.uniform(495, 510), 2),
            "batteryCurrent": round(battery * 2, 2), "batteryChargeLevel":
                r.uniform(5, 9) if alert else soc,
            "batteryTemperature": round(r.uniform(52, 58) if alert else 24 + r.gauss(0, 1), 2),
            "batteryStateOfHealth": 97.0, "batteryPowerKw": battery,
            "solarPowerKw": solar, "solarEnergyKwh": round(solar * hz, 5),
            "solarEfficiency": 18.5, "inverter1PowerKw": round(solar / 2, 3),
            "inverter1Efficiency": 96.5, "inverter1Temperature": 41.0,
            "inverter2PowerKw": round(solar / 2, 3), "inverter2Efficiency": 96.1,
            "inverter2Temperature": 42.0, "gridVoltage": round(r.gauss(230, 2), 2),
            "gridFrequency": round(49.2 if alert else 50 + r.gauss(0, 0.02), 3),
            "gridPowerKw": grid, "gridEnergyKwh": round(grid * hz, 5),
            "loadPowerKw": load, "loadEnergyKwh": round(max(load, 0) * hz, 5),
        }
    def _energy(self, interval_s: float) -> dict[str, Any]:
        r = self.rng
        if r.random() < 0.01:
            self.state = r.choice(STATES)
        base = {"compressor": 45, "hvac": 30, "motor": 8, "pump": 15,
                "injection_molding": 60}.get(self.kind, 10)
        running = self.state == "running"
        power = round(max(0.0, (base if running else base * 0.1) + r.gauss(0, base * 0.05)), 3)
        return {"power_kw": power, "energy_kwh": round(power * interval_s / 3600, 6),
                "voltage": round(r.gauss(400, 3), 2),
                "current": round(power * 1000 / 400 / 1.732, 2),
                "power_factor": round(min(1.0, r.uniform(0.85, 0.97)), 3),
                "frequency": round(50 + r.gauss(0, 0.02), 3)}
    def _production(self) -> dict[str, Any]:
        r = self.rng
        running = self.state == "running"
        units = r.randint(3, 8) if running else 0
        return {"units_produced": units, "units_rejected": int(units > 0 and r.random() < 0.1),
                "machine_state": self.state,
                "cycle_time_s": round(r.uniform(25, 32), 2) if running else None}
    def _environment(self, sun: float, alert: bool) -> dict[str, Any]:
        r = self.rng
        return {"temperature": round(21 + 3 * sun + r.gauss(0, 0.3), 2),
                "humidity": round(r.uniform(35, 55), 1),
                "pressure_hpa": round(r.gauss(1013, 2), 1),
                "co2_ppm": round(r.uniform(1100, 1400) if alert else r.uniform(450, 800), 0)}


