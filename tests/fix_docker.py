"""A Docker engine, and the images the repo's Dockerfile and compose file name.

The engine is the one that answers (``DOCKER_HOST`` or the default socket);
else, as root with ``dockerd`` installed, one of our own, started as this
machine allows it (``--iptables=false --ip6tables=false --bridge=none``),
its data under `STATE` so images survive between runs. No image registry
is reachable here: the images the repo pins are built locally as stand-ins
(tests/docker/README.md) on a Debian 12 base made with ``debootstrap``, and
tagged with the pinned names, so the Dockerfile and docker-compose.yml run
exactly as committed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.fix_capabilities import record, require

DOCKER = "a Docker engine that builds and runs containers (dockerd, as root)"
REPO = Path(__file__).resolve().parent.parent
STANDINS = REPO / "tests" / "docker"
STATE = Path("/var/lib/bmsd-test-docker")
BASE = "bmsd-standin/debian:bookworm"
PYTHON = "bmsd-standin/python:3.11-slim-bookworm"
MIRROR = "http://deb.debian.org/debian"


@dataclass
class Engine:
    """The Docker engine tests talk to, through the docker CLI."""

    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))

    def docker(self, *args: str, timeout: float = 900, check: bool = True,
               cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        run = subprocess.run(["docker", *args], env=self.env, capture_output=True, text=True,
                             timeout=timeout, check=False, cwd=cwd)
        if check and run.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} exited {run.returncode}:\n"
                                 f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
        return run

    def compose(self, project: Path, *args: str, timeout: float = 600,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        run = subprocess.run(["docker-compose", *args], env=self.env, capture_output=True,
                             text=True, timeout=timeout, check=False, cwd=project)
        if check and run.returncode != 0:
            raise AssertionError(f"docker-compose {' '.join(args)} exited {run.returncode}:\n"
                                 f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
        return run

    def has_image(self, name: str) -> bool:
        return self.docker("image", "inspect", name, check=False).returncode == 0

    def build(self, tag: str, context: Path, *args: str) -> None:
        # The host's network: the build reaches the package registries as we do.
        self.docker("build", "--network", "host", "-q", "-t", tag, *args, str(context))


def _answers(env: dict[str, str]) -> str | None:
    if shutil.which("docker") is None:
        return "no docker client (Debian: docker.io)"
    try:
        run = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"], env=env,
                             capture_output=True, text=True, timeout=20, check=False)
    except subprocess.TimeoutExpired:
        return "docker version did not answer in 20 s"
    return None if run.returncode == 0 else (run.stderr.strip() or "no engine")[:300]


def _start_dockerd() -> tuple[subprocess.Popen[bytes] | None, dict[str, str], str | None]:
    if os.geteuid() != 0:
        return None, {}, "no engine answers, and not root to start one"
    if shutil.which("dockerd") is None:
        return None, {}, "no engine answers, and no dockerd (Debian: docker.io)"
    STATE.mkdir(parents=True, exist_ok=True)
    pidfile = STATE / "dockerd.pid"
    if pidfile.exists():  # left by a dockerd that was killed: it refuses to start over it
        if _alive(pidfile):
            return None, {}, f"a dockerd (pid file {pidfile}) runs but does not answer"
        pidfile.unlink(missing_ok=True)
    sock = STATE / "docker.sock"
    env = {**os.environ, "DOCKER_HOST": f"unix://{sock}"}
    log = (STATE / "dockerd.log").open("wb")
    proc = subprocess.Popen(
        ["dockerd", "--iptables=false", "--ip6tables=false", "--bridge=none",
         "--data-root", str(STATE / "data"), "--exec-root", str(STATE / "exec"),
         "--pidfile", str(pidfile), "--host", f"unix://{sock}"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    deadline = time.monotonic() + 60
    problem = _answers(env)
    while problem is not None and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
        problem = _answers(env)
    if problem is not None:
        _stop(proc)
        tail = (STATE / "dockerd.log").read_text(errors="replace").strip().splitlines()[-3:]
        return None, {}, f"dockerd did not answer: {' | '.join(tail)}"
    return proc, env, None


def _alive(pidfile: Path) -> bool:
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[Engine]:
    """The Docker engine: one that answers, else our own (module docstring)."""
    proc = None
    env = dict(os.environ)
    problem = _answers(env)
    if problem is not None:
        proc, env, problem = _start_dockerd()
    record(DOCKER, problem)
    require(DOCKER)
    try:
        yield Engine(env)
    finally:
        if proc is not None:
            _stop(proc)


def _base_image(engine: Engine) -> None:
    """Make the Debian 12 base: debootstrap, this machine's CA certificates, apt, pip."""
    if engine.has_image(BASE):
        return
    if shutil.which("debootstrap") is None:
        pytest.fail("no debootstrap to make the stand-ins' base image (Debian: debootstrap)")
    with tempfile.TemporaryDirectory(dir="/var/tmp") as folder:
        tree = Path(folder) / "rootfs"
        subprocess.run(["debootstrap", "--variant=minbase", "--include=ca-certificates",
                        "bookworm", str(tree), MIRROR], check=True, capture_output=True,
                       timeout=1800)
        for cert in Path("/usr/local/share/ca-certificates").glob("*.crt"):
            shutil.copy(cert, tree / "usr/local/share/ca-certificates")
        subprocess.run(["chroot", str(tree), "update-ca-certificates"], check=True,
                       capture_output=True, timeout=120)
        for extra in ("/etc/pip.conf", "/etc/apt/apt.conf.d/99artifact-registry"):
            if Path(extra).exists():
                shutil.copy(extra, tree / extra.lstrip("/"))
        (tree / "etc/apt/sources.list").write_text(
            f"deb {MIRROR} bookworm main\ndeb {MIRROR} bookworm-updates main\n"
            "deb http://deb.debian.org/debian-security bookworm-security main\n")
        for deb in (tree / "var/cache/apt/archives").glob("*.deb"):
            deb.unlink()
        tar = subprocess.Popen(["tar", "-C", str(tree), "-c", "."], stdout=subprocess.PIPE)
        engine_import = subprocess.run(["docker", "import", "-", BASE], stdin=tar.stdout,
                                       env=engine.env, capture_output=True, timeout=600,
                                       check=False)
        tar.wait()
        if engine_import.returncode != 0:
            raise AssertionError(f"docker import: {engine_import.stderr.decode()[-2000:]}")


def _timescaledb_context(folder: Path) -> Path:
    """The stand-in's build context, with this machine's TimescaleDB files copied in."""
    context = folder / "timescaledb"
    shutil.copytree(STANDINS / "timescaledb", context)
    bindir = subprocess.run(["/usr/lib/postgresql/15/bin/pg_config", "--pkglibdir",
                             "--sharedir"], capture_output=True, text=True, check=True)
    libdir, sharedir = (Path(p) for p in bindir.stdout.split())
    (context / "timescaledb/lib").mkdir(parents=True)
    (context / "timescaledb/extension").mkdir(parents=True)
    for path in libdir.glob("timescaledb*.so"):
        shutil.copy(path, context / "timescaledb/lib")
    for path in (sharedir / "extension").glob("timescaledb*"):
        shutil.copy(path, context / "timescaledb/extension")
    return context


def pinned_images() -> dict[str, str]:
    """Return the images docker-compose.yml pins, by service."""
    text = (REPO / "docker-compose.yml").read_text()
    found: dict[str, str] = {}
    service = ""
    for line in text.splitlines():
        if m := re.match(r"^  ([a-z]+):\s*$", line):
            service = m[1]
        elif m := re.match(r"^\s+image:\s*(\S+)", line):
            # ${BMSD_VERSION:-0.1.0}: the default, as compose reads it unset.
            found.setdefault(service, re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", m[1]))
    return found


@pytest.fixture(scope="session")
def bmsd_image(docker_engine: Engine) -> str:
    """Build the repo's Dockerfile, as committed, on the stand-in Python base."""
    _base_image(docker_engine)
    docker_engine.build(PYTHON, STANDINS / "python")
    tag = "bmsd:test"
    docker_engine.build(tag, REPO, "--build-arg", f"PYTHON_IMAGE={PYTHON}")
    return tag


@pytest.fixture(scope="session")
def compose_images(docker_engine: Engine, bmsd_image: str) -> dict[str, str]:
    """Tag the stand-ins with the names docker-compose.yml pins, and bmsd's image too."""
    pinned = pinned_images()
    with tempfile.TemporaryDirectory() as folder:
        docker_engine.build(pinned["timescaledb"], _timescaledb_context(Path(folder)))
    docker_engine.build(pinned["mosquitto"], STANDINS / "mosquitto")
    docker_engine.build(pinned["prometheus"], STANDINS / "prometheus")
    docker_engine.docker("tag", bmsd_image, pinned["bmsd"])
    return pinned
