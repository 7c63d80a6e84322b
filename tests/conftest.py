"""Shared test setup; the server fixtures live in fix_db.py and fix_mqtt.py."""
