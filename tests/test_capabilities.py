"""A test that needs a capability of the machine skips only where the probe says it is
missing; with CI=true, one skipped although its probe passed fails the run."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytest_plugins = ["pytester"]

INNER = '''
import pytest
from tests.fix_capabilities import record, require

pytestmark = pytest.mark.needs("a thing")

@pytest.fixture
def thing():
    record("a thing", {problem!r})
    require("a thing")

def test_uses_the_thing(thing):
    {body}
'''


def run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: str,
        problem: str | None, body: str = "pass") -> pytest.RunResult:
    monkeypatch.setenv("CI", ci)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    pytester.makepyfile(test_inner=INNER.format(problem=problem, body=body))
    # A process of its own: the plugin keeps its findings in module state.
    return pytester.runpytest_subprocess("-p", "tests.fix_capabilities", "-rs")


def test_a_missing_capability_skips_naming_it_and_what_the_probe_saw(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
) -> None:
    result = run(pytester, monkeypatch, "true", "`ip netns add` exited 1: permission denied")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*this machine cannot give a thing: `ip netns add` exited 1:"
                                 " permission denied*"])
    assert result.ret == 0


def test_under_ci_a_skip_despite_a_working_capability_fails_the_run(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
) -> None:
    body = 'pytest.skip("skipped for another reason")'
    result = run(pytester, monkeypatch, "true", None, body)
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*CI=true, and these tests were skipped although the"
                                 " capability they need was probed and works*"])
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    # Outside CI the same skip is only reported.
    assert run(pytester, monkeypatch, "", None, body).ret == 0


def test_a_working_capability_runs_the_test(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
) -> None:
    result = run(pytester, monkeypatch, "true", None)
    result.assert_outcomes(passed=1)
    assert result.ret == 0
