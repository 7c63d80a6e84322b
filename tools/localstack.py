"""Start throwaway local PostgreSQL (with TimescaleDB) and Mosquitto servers.

Used by the test fixtures, the benchmarks and the demo (tools/demo.py). Each server lives in a state
folder of its own, listens on 127.0.0.1 on a port of its own, and is a child
process of ours: `stop()` ends it. PostgreSQL refuses to run as root, so when
we are root the server runs as the ``postgres`` system user (created by the
Debian package) and its folder is handed to that user; likewise Mosquitto
drops to the ``mosquitto`` user.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from bmsd.errors import LocalStackError

_PG_SETTINGS = """
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{socket_dir}'
shared_preload_libraries = 'timescaledb'
timescaledb.telemetry_level = off
max_connections = 200
max_worker_processes = 64
timescaledb.max_background_workers = 48
fsync = {fsync}
synchronous_commit = {fsync}
full_page_writes = {fsync}
log_min_messages = warning
"""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout_s: float, proc: subprocess.Popen[bytes] | None = None,
                  log: Path | None = None) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:*port*."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise LocalStackError(f"server exited with code {proc.returncode}{_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise LocalStackError(f"nothing listens on 127.0.0.1:{port} after {timeout_s:g} s{_tail(log)}")


def _tail(log: Path | None) -> str:
    if log is None or not log.exists():
        return ""
    lines = log.read_text(errors="replace").splitlines()[-15:]
    return f"; last lines of {log}:\n  " + "\n  ".join(lines)


def postgres_bindir() -> Path:
    """Return the folder of the newest PostgreSQL server binaries on this machine."""
    found = shutil.which("postgres")
    candidates = [Path(found).resolve().parent] if found else []
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                      key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    candidates += reversed(versions)
    for bindir in candidates:
        if (bindir / "postgres").exists() and (bindir / "initdb").exists():
            return bindir
    raise LocalStackError(
        "no PostgreSQL server binaries found (looked on PATH and in /usr/lib/postgresql/*/bin);"
        " run scripts/install.sh"
    )


def system_user(name: str) -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise LocalStackError(
            f"running as root, but there is no '{name}' system user to run the server as;"
            " run scripts/install.sh"
        ) from None


def _hand_over(path: Path, user: pwd.struct_passwd | None) -> None:
    if user is None:
        return
    for root, dirs, files in os.walk(path):
        os.chown(root, user.pw_uid, user.pw_gid)
        for name in dirs + files:
            os.chown(os.path.join(root, name), user.pw_uid, user.pw_gid)


def _check_reachable(path: Path, user: pwd.struct_passwd | None) -> None:
    """Fail clearly if *user* cannot enter every folder above *path*.

    *path* itself is made the server's own by `start`; its parents must let
    others through.
    """
    if user is None:
        return
    for folder in path.resolve().parents:
        if not folder.exists():
            continue
        st = folder.stat()
        if st.st_uid != user.pw_uid and not st.st_mode & 0o001:
            raise LocalStackError(
                f"the server runs as user {user.pw_name!r}, which cannot enter {folder}"
                f" (mode {st.st_mode & 0o777:o}); choose a state folder others may enter,"
                " e.g. --state-dir /var/lib/bmsd/demo")


def _as_user(user: pwd.struct_passwd | None) -> dict[str, Any]:
    """Return Popen arguments that run a server as *user* (our direct child, so
    signals reach it unchanged)."""
    if user is None:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": [],
            "cwd": "/", "env": {**os.environ, "HOME": user.pw_dir, "USER": user.pw_name}}


@dataclass
class LocalPostgres:
    """A PostgreSQL cluster with TimescaleDB preloaded, in *state_dir*."""

    state_dir: Path
    port: int = 0
    durable: bool = True  # False: fsync off, for tests
    extra_settings: str = ""  # more postgresql.conf lines
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def data_dir(self) -> Path:
        return self.state_dir / "data"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "postgres.log"

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def start(self, timeout_s: float = 60) -> LocalPostgres:
        """Create the cluster if needed, start it, and wait until it accepts connections."""
        bindir = postgres_bindir()
        user = system_user("postgres")
        _check_reachable(self.state_dir, user)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o755)  # noqa: S103 - the server's user must enter it
        self.port = self.port or free_port()
        if not (self.data_dir / "PG_VERSION").exists():
            self.data_dir.mkdir(exist_ok=True)
            _hand_over(self.state_dir, user)
            _run([str(bindir / "initdb"), "-D", str(self.data_dir), "-U", "postgres",
                  "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"], "initdb",
                 **_as_user(user))
        settings = _PG_SETTINGS.format(port=self.port, socket_dir=self.state_dir,
                                       fsync="on" if self.durable else "off")
        settings += self.extra_settings
        (self.data_dir / "postgresql.auto.conf").write_text(settings)
        _hand_over(self.state_dir, user)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [str(bindir / "postgres"), "-D", str(self.data_dir)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **_as_user(user),
        )
        log.close()
        wait_for_port(self.port, timeout_s, self.proc, self.log_path)
        self._wait_ready(timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        import psycopg

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                psycopg.connect(self.url(), connect_timeout=2).close()
                return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise LocalStackError(f"PostgreSQL did not get ready: {exc}") from exc
                time.sleep(0.1)

    def stop(self, timeout_s: float = 30) -> None:
        """Shut the server down (fast mode: roll back open transactions)."""
        _stop(self.proc, signal.SIGINT, timeout_s)
        self.proc = None

    def crash(self, timeout_s: float = 30) -> None:
        """Stop the server as a crash would (immediate mode: recovery at the next start)."""
        _stop(self.proc, signal.SIGQUIT, timeout_s)
        self.proc = None


def mosquitto_config(template: str, port: int, state_dir: Path,
                     host: str = "127.0.0.1") -> str:
    """Adapt the repo's mosquitto.conf to a port, a persistence folder and our own
    password and ACL files (which `LocalMosquitto` writes into *state_dir*)."""
    out = []
    replaced = ("listener", "persistence_location", "log_dest", "pid_file", "user",
                "password_file", "acl_file")
    for line in template.splitlines():
        key = line.split(None, 1)[0] if line.strip() and not line.startswith("#") else ""
        if key in replaced:
            continue
        out.append(line)
    out += [
        f"listener {port} {host}",
        f"persistence_location {state_dir}/",
        f"password_file {state_dir}/passwd",
        f"acl_file {state_dir}/acl",
        "log_dest stdout",
    ]
    return "\n".join(out) + "\n"


@dataclass
class LocalMosquitto:
    """A Mosquitto broker configured from the repo's mosquitto.conf, in *state_dir*.

    *users* (name → password) may log in, with the repo's ACL
    (``mosquitto/acl``) and *extra_acl* lines after it.
    """

    state_dir: Path
    config_template: Path
    port: int = 0
    users: dict[str, str] = field(default_factory=dict)
    extra_acl: str = ""
    extra_config: str = ""  # more mosquitto.conf lines (a TLS listener, say)
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        """Return bmsd's URL: as user ``bmsd`` where there is one."""
        return self.url_as("bmsd") if "bmsd" in self.users else f"mqtt://127.0.0.1:{self.port}"

    def url_as(self, user: str) -> str:
        """Return the URL that logs in as *user*."""
        password = quote(self.users[user], safe="")
        return f"mqtt://{quote(user, safe='')}:{password}@127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "mosquitto.log"

    def start(self, timeout_s: float = 15) -> LocalMosquitto:
        """Start the broker (keeping its persistence file) and wait until it listens."""
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(binary).exists():
            raise LocalStackError("mosquitto is not installed; run scripts/install.sh")
        _check_reachable(self.state_dir, system_user("mosquitto"))
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o755)  # noqa: S103 - the server's user must enter it
        self.port = self.port or free_port()
        conf = self.state_dir / "mosquitto.conf"
        conf.write_text(mosquitto_config(self.config_template.read_text(), self.port,
                                         self.state_dir) + self.extra_config)
        self._write_users()
        _hand_over(self.state_dir, system_user("mosquitto"))
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        wait_for_port(self.port, timeout_s, self.proc, self.log_path)
        return self

    def _write_users(self) -> None:
        acl = self.config_template.parent / "mosquitto" / "acl"
        (self.state_dir / "acl").write_text(
            (acl.read_text() if acl.exists() else "") + "\n" + self.extra_acl)
        passwd = self.state_dir / "passwd"
        passwd.write_text("")
        passwd.chmod(0o600)
        tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
        for user, password in self.users.items():
            _run([tool, "-b", str(passwd), user, password], "mosquitto_passwd")

    def stop(self, timeout_s: float = 15) -> None:
        """Stop the broker gracefully: SIGTERM makes it save its persistence file."""
        _stop(self.proc, signal.SIGTERM, timeout_s)
        self.proc = None

    def dropped_messages(self) -> int:
        """Return how many messages the broker logged as dropped (queue full)."""
        if not self.log_path.exists():
            return 0
        return len(re.findall(r"[Oo]utgoing messages are being dropped",
                              self.log_path.read_text(errors="replace")))


def _run(argv: list[str], what: str, **kwargs: Any) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)
    if result.returncode != 0:
        raise LocalStackError(f"{what} failed ({result.returncode}): {result.stderr.strip()}")


def _stop(proc: subprocess.Popen[bytes] | None, sig: signal.Signals, timeout_s: float) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
