"""The package's layout keeps its promises: the daemon imports no tool for trying it."""

from __future__ import annotations

import subprocess
import sys


def test_the_daemon_imports_none_of_the_dev_tools() -> None:
    code = ("import sys, bmsd.cli, bmsd.ingest.daemon;"
            " print(sorted(m for m in sys.modules if m.startswith('bmsd.')))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    loaded = eval(run.stdout)  # noqa: S307 - our own subprocess's list of names
    assert "bmsd.ingest.daemon" in loaded
    assert [m for m in loaded if m.startswith("bmsd.dev")] == []
