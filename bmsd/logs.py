"""Configure structlog once, at start-up: JSON lines, console on a TTY, or journald's form.

Under systemd (``$JOURNAL_STREAM`` names our stdout) the ``auto`` format is
``journal``: one line per event, led by a syslog priority prefix such as
``<4>`` that journald turns into the entry's priority (so ``journalctl -p
warning -u bmsd`` filters), then the event and its fields as ``key=value``;
no timestamp, since the journal stamps every entry itself.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, Literal, TextIO

import structlog

#: structlog level → syslog priority (sd-daemon(3)).
PRIORITIES = {"critical": 2, "exception": 3, "error": 3, "warning": 4, "warn": 4,
              "info": 6, "debug": 7}

LogFormat = Literal["auto", "json", "console", "journal"]


def connected_to_journal(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """Return whether *stream* is the journal stream systemd gave us ($JOURNAL_STREAM)."""
    environ = os.environ if environ is None else environ
    device, _, inode = environ.get("JOURNAL_STREAM", "").partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return (info.st_dev, info.st_ino) == (int(device), int(inode))


def render_journal(logger: object, method: str, event: MutableMapping[str, Any]) -> str:
    """Render one event as ``<priority>event key=value ...`` for journald."""
    level = str(event.pop("level", method))
    text = str(event.pop("event", ""))
    parts = [f"<{PRIORITIES.get(level, 6)}>{text}"]
    for key, value in event.items():
        if isinstance(value, str) and value and not any(c in value for c in ' "=\n\\'):
            parts.append(f"{key}={value}")
        else:
            parts.append(f"{key}={json.dumps(value, default=str, ensure_ascii=False)}")
    return " ".join(parts)


def configure_logging(fmt: LogFormat = "auto", level: str = "info",
                      stream: TextIO | None = None) -> None:
    """Send structlog events to *stream* (stdout) in the chosen format."""
    stream = stream or sys.stdout
    if fmt == "auto":
        if connected_to_journal(stream):
            fmt = "journal"
        else:
            fmt = "console" if stream.isatty() else "json"
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
    ]
    if fmt != "journal":
        processors.append(structlog.processors.TimeStamper(fmt="iso", utc=True))
    processors.append(structlog.processors.format_exc_info)
    if fmt == "console":
        processors.append(structlog.dev.ConsoleRenderer())
    elif fmt == "journal":
        processors.append(render_journal)
    else:
        processors.append(structlog.processors.JSONRenderer())
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
