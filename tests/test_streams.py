"""The table of streams agrees with everything else that names a stream."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import TypeAdapter, ValidationError

from bmsd.config import DEFAULT_ROUTES
from bmsd.schema import aggregates
from bmsd.streams import NAMES, SPECS, Stream

SQL = Path(__file__).resolve().parent.parent / "sql"


def test_the_stream_type_accepts_the_table_s_names_and_no_other() -> None:
    adapter = TypeAdapter(Stream)
    assert [adapter.validate_python(name) for name in NAMES] == list(NAMES)
    with pytest.raises(ValidationError, match="Input should be 'site_telemetry'"):
        adapter.validate_python("site_telemetr")


def test_default_routes_are_the_table_s() -> None:
    assert [(r.topic, r.stream, r.device_kind) for r in DEFAULT_ROUTES] == [
        (s.topic, s.name, s.device_kind) for s in SPECS]


def test_every_stream_has_its_hypertable_and_aggregates() -> None:
    hypertables = re.findall(r"create_hypertable\('(\w+)'", (SQL / "030_hypertables.sql")
                             .read_text())
    assert [n for n in hypertables if n in NAMES] == list(NAMES)
    check = re.search(r"stream IN \(([^)]*)\)", (SQL / "020_dimensions.sql").read_text())
    assert check is not None
    assert re.findall(r"'(\w+)'", check.group(1)) == list(NAMES)
    assert {family.table for family in aggregates.FAMILIES} == set(NAMES)


def test_each_model_s_columns_are_its_hypertable_s() -> None:
    text = (SQL / "030_hypertables.sql").read_text()
    for spec in SPECS:
        body = re.search(rf"CREATE TABLE {spec.name} \((.*?)\n\);", text, re.S)
        assert body is not None, spec.name
        # Each column's line starts with its name; continuation lines do not.
        columns = re.findall(r"^    (\w+)\s", body.group(1), re.M)
        # The model's fields, in COPY order, are the table's (less generated ones).
        assert [c for c in columns if c in spec.model.columns] == list(spec.model.columns)
        assert set(spec.model.columns) <= set(columns)
