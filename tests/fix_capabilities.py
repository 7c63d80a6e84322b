"""What this machine can give the tests that need more than a process: probed, not assumed.

Some tests need a capability of the machine, not just a tool on it: a network
namespace with a veth pair (tests/test_partition.py), a container that boots
systemd (tests/test_systemd_boot.py). In a CI job inside a container, a
minimal VM or a chroot, the tools install but the capability is missing.
Such a test is marked ``@pytest.mark.needs(CAPABILITY)``, and its fixture calls
`require` before its setup (or `record`s what its own first step found), which
skips it naming the capability and what the probe saw.

A skip must never hide a capability that is there: when ``CI=true`` (our CI
runs there), a test that required a capability whose probe passed and was
skipped anyway fails the run at its end (`pytest_sessionfinish`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable

import pytest

NETNS = "a network namespace with a veth pair and an address (ip netns, as root)"
BOOT = "a container that boots systemd to 'running' (systemd-nspawn -b, as root)"

#: capability -> None when the probe passed, else what it saw.
_probed: dict[str, str | None] = {}
#: test node id -> the capabilities its ``needs`` marks name.
_required: dict[str, set[str]] = {}
_skipped: set[str] = set()


def record(capability: str, problem: str | None) -> None:
    """Record what probing *capability* found (None: it works)."""
    _probed[capability] = problem


def require(capability: str, probe: Callable[[], str | None] | None = None) -> None:
    """Skip unless *capability* works; run *probe* first if it was not probed yet."""
    if capability not in _probed and probe is not None:
        record(capability, probe())
    problem = _probed.get(capability, "not probed")
    if problem is not None:
        pytest.skip(f"this machine cannot give {capability}: {problem}")


def _sh(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


def probe_netns() -> str | None:
    """Make a namespace, a veth pair into it and an address inside; say what failed."""
    if os.geteuid() != 0:
        return "not root"
    for tool in ("ip", "iptables", "ss"):
        if shutil.which(tool) is None:
            return f"no {tool} (Debian: iproute2, iptables)"
    name, veth = f"bmsdprobe{os.getpid() % 100000}", f"vbprobe{os.getpid() % 100000}"
    steps = [("ip", "netns", "add", name),
             ("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", name),
             ("ip", "netns", "exec", name, "ip", "addr", "add", "169.254.213.254/30",
              "dev", "eth0"),
             ("ip", "netns", "exec", name, "ip", "link", "set", "eth0", "up"),
             ("ip", "netns", "exec", name, "iptables", "-L", "-n")]
    try:
        for step in steps:
            run = _sh(*step)
            if run.returncode != 0:
                return (f"`{' '.join(step)}` exited {run.returncode}:"
                        f" {(run.stderr or run.stdout).strip()[:300]}")
        return None
    finally:
        _sh("ip", "link", "del", veth)
        _sh("ip", "netns", "del", name)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs(capability): the test needs a capability"
                                       " of the machine (tests/fix_capabilities.py)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for mark in item.iter_markers("needs"):
            _required.setdefault(item.nodeid, set()).update(mark.args)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and report.nodeid in _required:
        _skipped.add(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("CI") != "true":
        return
    hidden = sorted(node for node in _skipped
                    if any(_probed.get(c, "not probed") is None for c in _required[node]))
    if hidden:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(
                "FAILED: CI=true, and these tests were skipped although the capability they"
                f" need was probed and works: {', '.join(hidden)}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
