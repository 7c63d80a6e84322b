"""Small helpers shared by tests."""

from __future__ import annotations

from typing import Any

import psycopg


def add_device(db: psycopg.Connection[Any], site: str = "alpha", device: str = "pack-1",
               kind: str = "battery_pack") -> int:
    db.execute("INSERT INTO organizations (slug, name) VALUES ('org', 'Org')"
               " ON CONFLICT DO NOTHING")
    db.execute("INSERT INTO sites (organization_id, slug, name)"
               " SELECT id, %s, %s FROM organizations WHERE slug = 'org'"
               " ON CONFLICT DO NOTHING", (site, site.title()))
    row = db.execute("INSERT INTO devices (site_id, slug, kind)"
                     " SELECT id, %s, %s FROM sites WHERE slug = %s RETURNING id",
                     (device, kind, site)).fetchone()
    assert row is not None
    return int(str(row[0]))
