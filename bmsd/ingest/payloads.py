"""Turn an MQTT payload into validated readings, or into reasons a person can act on.

A message is one JSON reading, a JSON array of readings, or a gateway batch
``{"readings": [...]}``. Each reading is validated on its own: in an array,
the valid readings are kept and only the bad ones rejected. A bad payload is
data, not an exception: `parse_message` returns it as a `Reject`.

Most messages are wholly valid, so each is first validated in one pass of
pydantic's JSON parser, straight from the bytes (`_parse_valid`). Anything
that pass does not accept as it stands - an invalid reading, a nested
battery document, a reading too old - sends the message down the reading by
reading path, which decides and explains; the fast pass never rejects.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, create_model, with_config
from typing_extensions import TypedDict

from bmsd.ingest.refusals import explain_error, location, span
from bmsd.ingest.shapes import NESTED_SECTIONS, flatten_battery, json_type, reading_time
from bmsd.models import ReadingModel
from bmsd.streams import BY_NAME, SPECS, StreamSpec

# One C-level call gathers a reading's column values.
_GETTERS = {spec.name: operator.attrgetter(*spec.model.columns) for spec in SPECS}
# ... and a validated dict's (the one-pass path).
_ITEMS = {spec.name: operator.itemgetter(*spec.model.columns) for spec in SPECS}

# --- results -----------------------------------------------------------------

@dataclass(slots=True)
class Reading:
    """One valid reading: its time and its column values in COPY order."""

    time: datetime
    values: tuple[Any, ...]
    extra: dict[str, Any] | None
    timestamped: bool  # False: the reading had no time and got the arrival time
    index: int | None = None  # its place in the message's array, if it came in one


@dataclass(frozen=True, slots=True)
class Reject:
    """Something not stored, with a reason a person can act on."""

    category: str  # short, for metrics: not_json, invalid, too_old, ...
    reason: str
    payload: bytes  # the whole message, or the one reading of an array
    index: int | None = None  # the reading's place in an array


@dataclass(frozen=True, slots=True)
class ReadingBounds:
    """How big a message, how old or how far ahead a reading `parse_message` accepts."""

    max_message_bytes: int = 256 * 1024
    max_reading_age: timedelta = timedelta(days=90)
    age_source: str = "ingest.max_reading_age_s"  # what set max_reading_age, for the reason
    max_future: timedelta = timedelta(minutes=5)


@dataclass(slots=True)
class Parsed:
    """What one message turned into."""

    readings: list[Reading]
    rejects: list[Reject]


# --- parsing ---------------------------------------------------------------

def parse_message(stream: str, payload: bytes, received_at: datetime,
                  bounds: ReadingBounds) -> Parsed:
    """Validate *payload* as readings of *stream*; never raise for bad input."""
    spec = BY_NAME[stream]
    if len(payload) > bounds.max_message_bytes:
        return _whole(payload, "too_large",
                      f"message of {len(payload)} bytes is larger than ingest.max_message_bytes"
                      f" ({bounds.max_message_bytes}); split it into smaller gateway batches")
    valid = _parse_valid(spec, payload, received_at, bounds)
    return valid if valid is not None else _parse_each(spec, payload, received_at, bounds)


def _parse_each(spec: StreamSpec, payload: bytes, received_at: datetime,
                bounds: ReadingBounds) -> Parsed:
    """Validate *payload* reading by reading, explaining each one refused."""
    label = spec.label
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _whole(payload, "not_utf8",
                      f"payload is not UTF-8 text: byte 0x{payload[exc.start]:02x} at offset"
                      f" {exc.start}; send JSON encoded as UTF-8")
    try:
        document = _DECODER.decode(text)
    except (ValueError, RecursionError) as exc:
        return _whole(payload, "not_json", f"payload is not JSON: {exc}")
    if isinstance(document, dict) and "readings" in document:
        if not isinstance(document["readings"], list):
            return _whole(payload, "bad_shape",
                          f"readings is {json_type(document['readings'])}; a gateway batch"
                          ' is {"readings": [...]}, an array of reading objects')
        others = sorted(k for k in document if k != "readings")
        if others:
            return _whole(payload, "bad_shape",
                          f"a gateway batch has the key readings only, this one also"
                          f" {', '.join(others)}; put such fields in each reading")
        items, batch = document["readings"], True
    elif isinstance(document, list):
        items, batch = document, True
    elif isinstance(document, dict):
        items, batch = [document], False
    else:
        return _whole(payload, "bad_shape",
                      f"payload is a JSON {type(document).__name__}; send an object, an array"
                      ' of objects, or {"readings": [...]}')
    if batch and not items:
        return _whole(payload, "bad_shape", "payload has no readings (an empty array)")

    parsed = Parsed([], [])
    keep = parsed.readings.append
    for index, item in enumerate(items):
        result = _parse_reading(spec, item, f"{label}[{index}]" if batch else label,
                                index if batch else None, received_at, bounds)
        if isinstance(result, Reading):
            keep(result)
        else:
            category, reason = result
            raw = payload if not batch else json.dumps(item, allow_nan=True).encode()
            parsed.rejects.append(Reject(category, reason, raw, index if batch else None))
    return parsed


class _Adapters:
    """One stream's validators of a whole message, straight from JSON bytes.

    A reading is validated into a dict, not a model instance (a third of
    the cost): a TypedDict of the model's fields, with their bounds and
    defaults, in which every field is present, then any extra fields. It
    declares ``timestamp``, a string when present (a null or a number goes
    to the other path, which explains), so that the reading's time is read
    like its columns, not popped from the extra fields.

    A model whose fields also have another name (site telemetry's camelCase)
    is the exception: given a field by both names, the model keeps one and
    makes the other an extra field, where a TypedDict would drop it. Such a
    stream is validated into its model, as on the other path, and each
    reading then made into the same dict (`as_dicts`).
    """

    def __init__(self, model: type[ReadingModel]) -> None:
        self.as_dicts = any(info.alias not in (None, name)
                            for name, info in model.model_fields.items())
        reading: Any = (
            create_model(f"{model.__name__}InMessage", __base__=model, timestamp=(str, None))
            if self.as_dicts else _typed_dict(model))
        batch = create_model(f"{model.__name__}Batch", __config__=ConfigDict(extra="forbid"),
                             readings=(list[reading], ...))
        self.one: TypeAdapter[Any] = TypeAdapter(reading)
        self.array: TypeAdapter[list[Any]] = TypeAdapter(list[reading])
        self.batch: TypeAdapter[Any] = TypeAdapter(batch)
        #: The keys every validated reading has; any others are extra fields.
        self.declared = frozenset([*model.model_fields, "timestamp"])

    def dicts(self, models: list[Any]) -> list[dict[str, Any]] | None:
        """Return validated models as the dicts the TypedDicts give; None if one has an
        extra field of a field's name (sent by both names), which a dict cannot hold."""
        out = []
        for reading in models:
            extra = reading.model_extra
            if extra and not self.declared.isdisjoint(extra):
                return None
            out.append({**reading.__dict__, **extra})
        return out


def _typed_dict(model: type[ReadingModel]) -> Any:
    """Return a TypedDict of *model*'s fields and ``timestamp`` (see `_Adapters`)."""
    fields = {name: Annotated[info.annotation, info] for name, info in model.model_fields.items()}
    fields["timestamp"] = Annotated[str, Field(default=None)]  # null: not a str
    config = ConfigDict({k: v for k, v in model.model_config.items()  # type: ignore[misc]
                         if k not in ("frozen", "title")})
    # (mypy reads only literal TypedDicts)
    return with_config(config)(TypedDict(f"{model.__name__}InMessage", fields))  # type: ignore[operator]


_ADAPTERS = {spec.name: _Adapters(spec.model) for spec in SPECS}
# The JSON parser under pydantic reads NaN and Infinity, which are not JSON
# (`allow_inf_nan=False` refuses them as the value of a declared field).
_NOT_JSON = (b"NaN", b"Infinity")


def _parse_valid(spec: StreamSpec, payload: bytes, received_at: datetime,
                 bounds: ReadingBounds) -> Parsed | None:
    """Return the readings of a wholly valid message in one pass; None: look closer.

    None is for anything the reading by reading path must decide or explain,
    so the two paths cannot disagree on what is stored.
    """
    adapters = _ADAPTERS[spec.name]
    validated = _validated(adapters, payload)
    if validated is None:
        return None
    models, batch = validated
    getter, pack, declared = _ITEMS[spec.name], spec.pack, adapters.declared
    oldest, newest = received_at - bounds.max_reading_age, received_at + bounds.max_future
    width = len(spec.model.columns)
    readings: list[Reading] = []
    keep = readings.append
    checked = False  # for NaN and Infinity, in a message with extra fields
    for index, reading in enumerate(models):
        extra: dict[str, Any] | None = None
        if len(reading) > len(declared):
            # The fields' bounds refuse NaN and Infinity, but an extra field is not
            # validated: the payload must not hold them (as a string is harmless).
            if not checked:
                if _NOT_JSON[0] in payload or _NOT_JSON[1] in payload:
                    return None
                checked = True
            extra = {k: v for k, v in reading.items() if k not in declared}
            # "readings" here was spelt with an escape: the byte search above missed it.
            if "readings" in extra or (pack and any(s in extra for s in NESTED_SECTIONS)):
                return None
        if pack and _cell_arrays_mismatch(reading):
            return None
        stamp = reading["timestamp"]
        if stamp is not None:  # as _reading_time reads it, inline: most readings have one
            try:
                when = _FROM_ISO(stamp)
            except ValueError:
                return None
            if when.tzinfo is None:
                return None
            when, timestamped = when.astimezone(UTC), True
        else:
            timing = reading_time(extra or {}, received_at)
            if isinstance(timing, str):
                return None
            when, timestamped = timing
        values = getter(reading)
        if not oldest <= when <= newest or values.count(None) == width:
            return None
        keep(Reading(when, values, extra or None, timestamped, index if batch else None))
    return Parsed(readings, [])


def _validated(adapters: _Adapters, payload: bytes) -> tuple[list[Any], bool] | None:
    """Return a message's readings, each validated (as a dict where the model allows),
    and whether they came as an array; None if anything about them needs a closer look."""
    first = payload[:1]
    try:
        if first == b"[":
            models, batch = adapters.array.validate_json(payload), True
        elif first != b"{":
            return None
        elif b'"readings"' in payload:
            models, batch = adapters.batch.validate_json(payload).readings, True
        else:
            models, batch = [adapters.one.validate_json(payload)], False
    except ValidationError:
        return None
    if not models:
        return None
    if adapters.as_dicts:
        dicts = adapters.dicts(models)
        if dicts is None:
            return None
        models = dicts
    return models, batch


_FROM_ISO = datetime.fromisoformat


def _refuse_constant(name: str) -> float:
    # json.loads accepts NaN/Infinity, which are not JSON; say so plainly.
    raise ValueError(f"{name} is not a JSON number")


# json.loads with an option builds a decoder per call; one is enough.
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)


def parse_fields(spec: StreamSpec, fields: Mapping[str, Any], when: datetime,
                 received_at: datetime, bounds: ReadingBounds) -> Reading | tuple[str, str]:
    """Validate one reading given as fields and a time (a Sparkplug B message's, mapped:
    bmsd/ingest/sparkplug.py) as a JSON reading is; or return (category, reason)."""
    adapters = _ADAPTERS[spec.name]
    if not adapters.as_dicts and received_at - bounds.max_reading_age <= when <= \
            received_at + bounds.max_future:
        # The one-pass validator, as for a JSON message (_parse_valid); anything it
        # does not take as it stands is decided and explained below.
        try:
            reading = adapters.one.validate_python(fields)
        except ValidationError:
            reading = None
        if reading is not None and len(reading) == len(adapters.declared) and not (
                spec.pack and _cell_arrays_mismatch(reading)):
            values = _ITEMS[spec.name](reading)
            if values.count(None) != len(values):
                return Reading(when, values, None, True, None)
    return _checked(spec, fields, spec.label, None, when, True, received_at, bounds, False)


def _whole(payload: bytes, category: str, reason: str) -> Parsed:
    return Parsed([], [Reject(category, reason, payload)])


def _parse_reading(spec: StreamSpec, item: object, where: str, index: int | None,
                   received_at: datetime, bounds: ReadingBounds) -> Reading | tuple[str, str]:
    if not isinstance(item, dict):
        return "bad_shape", f"{where}: a reading must be a JSON object, not {json_type(item)}"
    nested = spec.pack and any(s in item for s in NESTED_SECTIONS)
    if nested:
        flattened = flatten_battery(item)
        if isinstance(flattened, str):
            return "invalid", f"{where}.{flattened}"
        item = flattened
    else:
        item = dict(item)
    timing = reading_time(item, received_at)
    if isinstance(timing, str):
        return "invalid", f"{where}: {timing}"
    when, timestamped = timing
    return _checked(spec, item, where, index, when, timestamped, received_at, bounds, nested)


def _checked(spec: StreamSpec, item: Mapping[str, Any], where: str, index: int | None,
             when: datetime, timestamped: bool, received_at: datetime, bounds: ReadingBounds,
             nested: bool) -> Reading | tuple[str, str]:
    """Check a reading's time against *bounds*, then validate its fields."""
    age = received_at - when
    if age > bounds.max_reading_age:
        return "too_old", (
            f"{where}: timestamp {when.isoformat()} is {span(age)} old; readings older than"
            f" {span(bounds.max_reading_age)} ({bounds.age_source}) are not accepted")
    if -age > bounds.max_future:
        return "in_future", (
            f"{where}: timestamp {when.isoformat()} is {span(-age)} in the future;"
            " check the gateway's clock (and that ts is epoch seconds or milliseconds)")
    try:
        reading = spec.model.model_validate(item)
    except ValidationError as exc:
        return "invalid", "; ".join(
            f"{where}.{location(err['loc'], nested)}: {explain_error(err)}" for err in exc.errors())
    if spec.pack:
        problem = _cell_arrays_mismatch(reading.__dict__)
        if problem:
            return "invalid", f"{where}.{problem}"
    values = _GETTERS[spec.name](reading)
    extra = reading.model_extra or None
    if values.count(None) == len(values):
        unknown = f"; it carried only {', '.join(sorted(extra))}" if extra else ""
        return "no_measurement", (
            f"{where}: no measurement: none of the {spec.label} fields is set (e.g."
            f" {', '.join(spec.model.columns[:3])}){unknown}")
    return Reading(when, values, extra, timestamped, index)


_CELL_ARRAYS = ("cell_voltages", "cell_temperatures", "balancing")


def _cell_arrays_mismatch(fields: Mapping[str, Any]) -> str | None:
    """Say how a pack reading's cell arrays differ in length (*fields*: its fields by
    name, each present), if they do."""
    if len({len(v) for name in _CELL_ARRAYS if (v := fields[name]) is not None}) < 2:
        return None  # (the usual case, in one pass)
    described = ", ".join(f"{name} has {len(v)}" for name in _CELL_ARRAYS
                          if (v := fields[name]) is not None)
    return f"cell arrays: lengths differ ({described}); send one entry per cell in each"
