"""Every subcommand through its failure modes, as a user meets them: bad paths,
servers down, Ctrl-C. Each ends with one line on stderr saying what and
where, the exit code README documents, and never a Python traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tools.localstack import free_port

#: README, "Exit codes".
FAILED, CONFIG, INTERRUPTED = 1, 2, 130


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]
    code: int
    says: str  # in the one line of stderr
    interrupt_after: str | None = None  # send SIGINT once stderr/stdout shows this
    env: dict[str, str] = field(default_factory=dict)


def _down() -> str:
    return f"127.0.0.1:{free_port()}"


DB_DOWN = f"postgresql://bmsd@{_down()}/bmsd"
BROKER_DOWN = f"mqtt://{_down()}"

CASES: dict[str, Case] = {
    # Bad paths, for every command that takes --config.
    **{f"{cmd[0]}-config-missing": Case((*cmd, "--config", "{tmp}/nope.toml"), CONFIG,
                                        "{tmp}/nope.toml: no such config file")
       for cmd in (("run",), ("migrate",), ("check-config",), ("alerts",),
                   ("create-login", "x", "--member-of", "bmsd_ingest", "--password-file",
                    "{tmp}/pw"), ("simulate", "--messages", "1"))},
    **{f"{cmd}-config-folder": Case((cmd, "--config", "{tmp}"), CONFIG,
                                    "{tmp}: is a folder; name the file itself")
       for cmd in ("run", "migrate", "check-config", "alerts", "probe")},
    "check-config-bad-toml": Case(("check-config", "--config", "{tmp}/bad.toml"), CONFIG,
                                  "{tmp}/bad.toml: not valid TOML"),
    "check-config-rules-missing": Case(
        ("check-config", "--config", "{tmp}/rules-missing.toml"), CONFIG, "nope-rules.toml"),
    "run-password-file-missing": Case(
        ("run", "--config", "{tmp}/secret-missing.toml"), CONFIG,
        "[database] password_file = {tmp}/no-secret: no such file"),
    "migrate-sql-dir-missing": Case(("migrate", "--sql-dir", "{tmp}/no-sql",
                                     "--database-url", DB_DOWN), CONFIG, "{tmp}/no-sql"),
    "create-login-password-file-missing": Case(
        ("create-login", "bmsd_app", "--member-of", "bmsd_ingest", "--password-file",
         "{tmp}/no-pw"), CONFIG, "--password-file {tmp}/no-pw: cannot read it"),
    "alerts-ack-without-id": Case(("alerts", "ack", "--database-url", DB_DOWN), CONFIG,
                                  "usage: bmsd alerts ack ID --by NAME"),
    "database-url-not-postgres": Case(("migrate", "--database-url", "host=db password=hunter2"),
                                      CONFIG, "--database-url: must start with postgresql://"),
    # Servers down.
    "migrate-database-down": Case(("migrate", "--database-url", DB_DOWN), FAILED,
                                  "bmsd migrate: "),
    "alerts-database-down": Case(("alerts", "--database-url", DB_DOWN), FAILED,
                                 "bmsd alerts: "),
    "create-login-database-down": Case(
        ("create-login", "bmsd_app", "--member-of", "bmsd_ingest", "--password-file",
         "{tmp}/pw", "--database-url", DB_DOWN), FAILED, "bmsd create-login: "),
    "simulate-broker-down": Case(("simulate", "--messages", "1", "--mqtt-url", BROKER_DOWN),
                                 FAILED, "bmsd simulate: "),
    "probe-nothing-running": Case(("probe", "--config", "{tmp}/down.toml"), FAILED,
                                  "no answer"),
    # Ctrl-C while waiting for a server.
    "migrate-waiting-interrupted": Case(
        ("migrate", "--wait-for-database", "--database-url", DB_DOWN), INTERRUPTED,
        "bmsd migrate: interrupted", interrupt_after="trying again"),
    "run-waiting-interrupted": Case(
        ("run", "--config", "{tmp}/down.toml"), 0, "", interrupt_after="db_unavailable",
        env={"BMSD_DATABASE_URL": DB_DOWN}),
}


def _files(tmp: Path) -> None:
    (tmp / "bad.toml").write_text("[database\n")
    (tmp / "rules-missing.toml").write_text('[alerts]\nrules_file = "nope-rules.toml"\n')
    (tmp / "secret-missing.toml").write_text(f'[database]\npassword_file = "{tmp}/no-secret"\n')
    (tmp / "down.toml").write_text(f'[mqtt]\nurl = "{BROKER_DOWN}"\n'
                                   f'[metrics]\naddr = "127.0.0.1:{free_port()}"\n')
    (tmp / "pw").write_text("pw\n")


@pytest.mark.parametrize("name", CASES)
def test_a_failing_command_says_one_line_and_exits_with_its_code(
    tmp_path: Path, name: str
) -> None:
    case = CASES[name]
    _files(tmp_path)
    args = [a.replace("{tmp}", str(tmp_path)) for a in case.args]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("BMSD_", "CREDENTIALS_DIRECTORY", "NOTIFY_SOCKET", "PG"))}
    env |= case.env
    proc = subprocess.Popen([sys.executable, "-m", "bmsd", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if case.interrupt_after:
        assert proc.stdout is not None
        seen = ""
        deadline = time.monotonic() + 30
        while case.interrupt_after not in seen and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen += line
        assert case.interrupt_after in seen, seen
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
        output = seen + rest
    else:
        output, _ = proc.communicate(timeout=60)
    assert "Traceback" not in output, output
    assert proc.returncode == case.code, output
    if not case.interrupt_after:
        lines = output.strip().splitlines()
        assert len(lines) == 1, output
        assert lines[0].startswith(f"bmsd {args[0]}: ") or lines[0].startswith("usage:"), output
    assert case.says.replace("{tmp}", str(tmp_path)) in output, output
