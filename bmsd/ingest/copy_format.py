"""How rows go into a binary COPY: arrays of floats packed at once, site
readings scaled to integers where sql/190 stores them so.

A battery pack's reading carries two 16-cell arrays; psycopg's general array
dumper took most of COPY's time on them, hence `Float8ArrayDumper`. Site
readings go, where sql/190 ran (community edition), to
``site_telemetry_scaled`` as integers at each field's resolution
(``SiteTelemetry.digits``), rounded here.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

import psycopg
from psycopg import sql
from psycopg.abc import Buffer
from psycopg.adapt import Dumper
from psycopg.pq import Format

from bmsd.batch import Row

#: The column types a scaled field must have.
INTEGERS = ("integer", "bigint")


def copy_statement(table: sql.Identifier, columns: Sequence[str]) -> sql.Composed:
    """Return the binary COPY of *columns* into *table*."""
    names = sql.SQL(", ").join(map(sql.Identifier, columns))
    return sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(table, names)


def scaler(columns: Sequence[str], digits: Mapping[str, int]) -> tuple[int | None, ...]:
    """Return each column's factor to its stored integer (None: stored as is)."""
    return tuple(10 ** digits[c] if c in digits else None for c in columns)


def _scaled(values: tuple[Any, ...], factors: tuple[int | None, ...]) -> tuple[Any, ...]:
    # round() of the product, not int(): 400.1 * 10 is 4000.9999999999995.
    return tuple(v if f is None or v is None else round(v * f)
                 for v, f in zip(values, factors, strict=True))


def write_rows(copy: psycopg.Copy, rows: Sequence[Row],
               factors: tuple[int | None, ...] | None) -> None:
    """Write *rows* to *copy*, scaled by *factors* where given."""
    # The COPY's types are set, so the extra fields' dict is dumped as jsonb
    # by the column's type: the row goes as it is, no tuple built per row.
    write = copy.write_row
    if factors is None:
        for row in rows:
            write(row.values)
    else:
        for row in rows:
            write(_scaled(row.values, factors))


class Float8ArrayDumper(Dumper):
    """Binary ``double precision[]`` from a list of floats in one struct call.

    psycopg's general array dumper handles any element type and nesting; at a
    battery pack's two 16-cell arrays per reading it took most of COPY's time.
    A list holding None (our models never send one) is packed element by element.
    """

    format = Format.BINARY
    oid = 1022  # float8[]

    def dump(self, obj: Any) -> Buffer:
        n = len(obj)
        if not n:
            return _EMPTY_FLOAT8_ARRAY
        if None in obj:
            body = b"".join(_NULL if v is None else _FLOAT8.pack(8, v) for v in obj)
            return _ARRAY_HEAD.pack(1, 1, 701, n, 1) + body
        return _float8_array(n).pack(1, 0, 701, n, 1, *[x for v in obj for x in (8, v)])


_ARRAY_HEAD = struct.Struct(">iiIii")  # ndim, has nulls, element oid, length, lower bound
_FLOAT8 = struct.Struct(">id")  # element length, value
_NULL = struct.pack(">i", -1)
_EMPTY_FLOAT8_ARRAY = struct.pack(">iiI", 0, 0, 701)


@cache
def _float8_array(n: int) -> struct.Struct:
    return struct.Struct(_ARRAY_HEAD.format + "id" * n)
