"""README's first command (scripts/demo runs `python -m tools.demo`): the local demo
stack starts bmsd, which stores what it receives."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from bmsd.errors import LocalStackError
from tools.localstack import LocalPostgres, free_port

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def state_dir() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="bmsd-test-demo-"))
    folder.chmod(0o755)  # the servers run as their own users when we are root
    yield folder  # type: ignore[misc]
    shutil.rmtree(folder, ignore_errors=True)


def test_demo_starts_the_stack_and_bmsd_and_stops_cleanly(state_dir: Path) -> None:
    env = {**os.environ, "BMSD_METRICS_ADDR": f"127.0.0.1:{free_port()}"}
    run = subprocess.run([sys.executable, "-m", "tools.demo", "--duration-s", "9",
                          "--state-dir", str(state_dir / "state")],
                         capture_output=True, text=True, timeout=180, env=env, check=False,
                         cwd=REPO)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "bmsd is running on the local stack" in run.stdout
    assert "psql 'postgresql://postgres@127.0.0.1:" in run.stdout
    assert "bmsd stopped (exit code 0)" in run.stdout
    # The live view: the simulator's readings arrive (packs every 5 s,
    # compressors every second; site controllers only every 10 s).
    views = [line for line in run.stdout.splitlines() if line.startswith("stored: ")]
    assert views, run.stdout
    last = views[-1]
    assert "battery " in last
    assert "energy " in last
    # A second run reuses the state: the schema is already there.
    again = subprocess.run([sys.executable, "-m", "tools.demo", "--duration-s", "1",
                            "--state-dir", str(state_dir / "state")],
                           capture_output=True, text=True, timeout=180, env=env, check=False,
                         cwd=REPO)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "nothing to apply" in again.stdout


def test_a_state_folder_the_server_cannot_enter_is_refused_with_advice() -> None:
    if os.geteuid() != 0:
        pytest.skip("only root hands the servers to their own users")
    private = Path(tempfile.mkdtemp(prefix="bmsd-test-private-"))  # mode 0700
    try:
        with pytest.raises(LocalStackError, match=r"cannot enter .*bmsd-test-private.*--state-dir"):
            LocalPostgres(private / "pg").start()
    finally:
        shutil.rmtree(private, ignore_errors=True)
