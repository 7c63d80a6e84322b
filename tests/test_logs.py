"""Logs: JSON lines by default, and journald's form when systemd gives us the journal."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import structlog

from bmsd.logs import configure_logging, connected_to_journal


def emit(fmt: str) -> list[str]:
    out = io.StringIO()
    configure_logging(fmt, "info", stream=out)  # type: ignore[arg-type]
    log = structlog.get_logger("bmsd")
    log.info("bmsd_ready", client_id="bmsd-1")
    log.warning("db_unavailable", error="connection refused", retry_in_s=0.5)
    log.error("bmsd_fatal", error="schema missing\nrun `bmsd migrate` first")
    log.debug("not shown at info")
    structlog.reset_defaults()
    return out.getvalue().splitlines()


def test_journal_lines_carry_the_syslog_priority_and_no_timestamp() -> None:
    lines = emit("journal")
    assert lines == [
        "<6>bmsd_ready client_id=bmsd-1",
        '<4>db_unavailable error="connection refused" retry_in_s=0.5',
        '<3>bmsd_fatal error="schema missing\\nrun `bmsd migrate` first"',
    ]


def test_json_lines_stay_available() -> None:
    events = [json.loads(line) for line in emit("json")]
    assert [e["level"] for e in events] == ["info", "warning", "error"]
    assert all("timestamp" in e for e in events)


def test_the_journal_is_recognised_by_the_stream_systemd_names(tmp_path: Path) -> None:
    log_path = tmp_path / "out.log"
    with log_path.open("w") as stream:
        info = os.fstat(stream.fileno())
        assert connected_to_journal(stream, {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"})
        assert not connected_to_journal(stream, {"JOURNAL_STREAM": f"{info.st_dev}:1"})
        assert not connected_to_journal(stream, {})


def test_bmsd_under_systemd_writes_the_journal_form_by_itself(tmp_path: Path) -> None:
    # `bmsd run` with stdout on "the journal" (a file whose device and inode
    # JOURNAL_STREAM names) and nothing listening: it logs its start and the
    # unreachable database in journald's form.
    config = tmp_path / "bmsd.toml"
    config.write_text("[database]\nurl = 'postgresql://127.0.0.1:1/none'\nconnect_timeout_s = 1\n"
                      "[metrics]\naddr = '127.0.0.1:0'\n")
    log_path = tmp_path / "journal.log"
    with log_path.open("w") as stream:
        info = os.fstat(stream.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}
        proc = subprocess.Popen([sys.executable, "-m", "bmsd", "run", "--config", str(config)],
                                stdout=stream, stderr=subprocess.STDOUT, env=env)
        try:
            proc.wait(4)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait(15)
    lines = log_path.read_text().splitlines()
    assert lines[0].startswith("<6>config_loaded path=")
    assert any(line.startswith("<4>db_unavailable ") for line in lines)
