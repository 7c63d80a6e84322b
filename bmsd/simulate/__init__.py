"""`bmsd simulate`: a field-gateway simulator publishing realistic telemetry over MQTT.

Even-numbered sites are battery sites (a site controller and battery packs),
odd-numbered ones factories like the EnMS demo plant (compressor every 1 s,
HVAC and conveyor every 10 s, pump and injection moulding every 30 s, and an
ambient sensor). Values follow simple physical models: SoC cycles between
charge and discharge, cells drift apart, solar follows the sun, the grid
balances load, solar and battery, machines change state.

Timestamps come from a virtual clock per device, so no two readings of a
device share an instant and a run is exactly accountable: the summary says
how many valid readings were sent per stream (duplicates counted once,
malformed ones not at all), which is what bmsd must have stored. The same
seed gives the same values and faults; ``--start`` fixes the timestamps too.
"""

