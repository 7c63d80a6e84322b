"""Tools for trying and measuring bmsd from a clone, not shipped in its wheel:
local servers (localstack), a simulated fleet's history (fleet), the Grafana
dashboards' generator (dashboards), and the local demo stack (demo, which
scripts/demo runs). Tests and benchmarks import them; bmsd never does."""
