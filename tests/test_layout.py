"""The package's layout keeps its promises: the daemon imports no tool for trying it."""

from __future__ import annotations

import json
import subprocess
import sys


def test_the_daemon_imports_none_of_the_dev_tools() -> None:
    code = ("import json, sys, bmsd.cli, bmsd.ingest.daemon;"
            " print(json.dumps(sorted(m for m in sys.modules if m.startswith('bmsd.'))))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    loaded = json.loads(run.stdout)
    assert "bmsd.ingest.daemon" in loaded
    assert [m for m in loaded if m.startswith("bmsd.dev")] == []
