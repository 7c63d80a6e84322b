"""The configuration as text: read from TOML, explained when wrong, printed back
with every secret redacted (`describe`, which `bmsd check-config` shows, reads
back to the same configuration)."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ValidationError

from bmsd.errors import ConfigError


def describe(config: BaseModel) -> str:
    """Return the effective configuration as TOML, every secret redacted.

    Read back, it gives the same configuration (but for the redacted
    passwords): unset keys are shown commented out.
    """
    lines: list[str] = []
    data = config.model_dump(mode="json", exclude={"routes"})
    for key, value in data.items():
        if key == "instance" and value is not None:  # already applied to what follows
            lines.append(f"# instance = {value}: its client id and metrics port are below")
        elif not isinstance(value, dict):
            lines.append(_toml_line(key, value))
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"\n[{key}]")
            section = getattr(config, key)
            for name, item in value.items():
                if name.endswith("url") and item:
                    item = redact_url(item)
                lines.append(_toml_line(name, item))
            if getattr(section, "password", None) is not None:
                lines.append("# password: read from its file or credential, not shown")
    for route in getattr(config, "routes", ()):
        lines.append("\n[[routes]]")
        lines += [_toml_line(k, v) for k, v in route.model_dump(mode="json").items()
                  if v is not None]
    return "\n".join(lines)


def _toml_line(key: str, value: object) -> str:
    if value is None:
        return f"# {key} is not set"
    return f"{key} = {_toml_value(value)}"


def _toml_value(value: object) -> str:
    """Return *value* as TOML: arrays and tables inline ([sparkplug] map)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_value(str(k))} = {_toml_value(v)}"
                               for k, v in value.items() if v is not None) + "}"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def read_toml(path: Path, missing: str) -> dict[str, Any]:
    """Read a TOML file; raise ConfigError saying what is wrong with it (*missing*: if absent)."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: {missing}") from None
    except PermissionError:
        raise ConfigError(f"{path}: not readable by this user; check its owner and mode"
                          ) from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder; name the file itself") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


def explain(source: str, what: str, exc: ValidationError, example: str,
            set_by: Mapping[tuple[str, ...], str] | None = None) -> str:
    """Return a validation error as lines a person can act on: file (or environment
    variable, *set_by* a key), key, what is wrong."""
    set_by = set_by or {}
    blamed = [set_by.get(tuple(str(p) for p in err["loc"][:2])) for err in exc.errors()]
    if all(blamed):  # nothing from the file is at fault
        source = "the environment"
    lines = [f"{source}: {exc.error_count()} error(s) in {what}:"]
    for err, var in zip(exc.errors(), blamed, strict=True):
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if var:
            where = f"{where} (from ${var})"
        # An array of tables reads as name[index]: routes[0].topic, rules[2].code.
        where = re.sub(r"^(\w+)\.(\d+)(?=\.|$)", r"\1[\2]", where)
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = f"unknown key (check its spelling against {example})"
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


_CONNINFO_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)")


def redact_url(url: str) -> str:
    """Return *url* with any password replaced by ``***``, for logs, in every form libpq
    takes: in its user info, ``password=`` among its query parameters, and a
    ``key=value`` conninfo string's ``password``."""
    if "://" not in url:  # libpq's key=value form: password=secret or password='se cret'
        return _CONNINFO_PASSWORD.sub(r"\1***", url)
    parts = urlsplit(url)
    netloc, query = parts.netloc, parts.query
    if parts.password is not None:
        netloc = netloc.replace(f":{parts.password}@", ":***@", 1)
    if query:
        query = "&".join("password=***" if unquote(item.partition("=")[0]) == "password"
                         else item for item in query.split("&"))
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return parts._replace(netloc=netloc, query=query).geturl()
