"""bench/reliability_report.py renders one passing run's figures, or nothing (issue 13, item 15).

It used to render whatever lay in .run/reliability/results/, and `make reliability-report`
ignored the suite's exit status, so a failed run (or one that never reached a scenario) was
published with the previous run's figures. Now the renderer refuses, writing nothing, when
junit.xml is missing or has failures or errors, or when a results file was recorded before the
run in junit.xml started; the Makefile clears the results first and fails with the suite.
"""

from __future__ import annotations

import importlib.util
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _renderer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("reliability_report_under_test",
                                                  ROOT / "bench" / "reliability_report.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (tmp_path / "results").mkdir()
    (tmp_path / "docs").mkdir()
    monkeypatch.setattr(module, "ROOT", tmp_path)
    monkeypatch.setattr(module, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(module, "JUNIT", tmp_path / "junit.xml")
    monkeypatch.setattr(module, "OUT", tmp_path / "docs" / "reliability.md")
    return module


def _junit(path: Path, started: datetime, failures: int = 0, errors: int = 0,
           naive_local: bool = False) -> None:
    stamp = started.astimezone().replace(tzinfo=None) if naive_local else started.astimezone()
    cases = '<testcase classname="tests.reliability.test_5_bad_input" ' \
            'name="test_fuzzed_observations" time="3.0" />'
    path.write_text(
        '<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" '
        f'errors="{errors}" failures="{failures}" skipped="0" tests="1" time="3.0" '
        f'timestamp="{stamp.isoformat()}">{cases}</testsuite></testsuites>')


def _result(results: Path, name: str, recorded: datetime, **figures: object) -> None:
    (results / f"{name}.json").write_text(json.dumps({
        "scenario": name, "form": "full",
        "recorded_at": recorded.isoformat(timespec="seconds"), **figures}))


FUZZ = {"cases": {"obs": 3000}, "total_cases": 3000, "crashes": 0, "seed": 7,
        "replay": "RELIABILITY_FUZZ_SEED=7"}


def test_results_older_than_the_run_are_refused(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    report = _renderer(tmp_path, monkeypatch)
    started = datetime.now(UTC) - timedelta(minutes=5)
    _junit(report.JUNIT, started)
    _result(report.RESULTS, "fuzz", started + timedelta(minutes=1), **FUZZ)
    _result(report.RESULTS, "worker_kill", started - timedelta(days=2), lost=0)  # last run's
    with pytest.raises(SystemExit) as exit_:
        report.main()
    assert exit_.value.code == 1
    assert not report.OUT.exists()  # nothing rendered, not even the fresh figures
    err = capsys.readouterr().err
    assert "worker_kill.json" in err and "fuzz.json" not in err, err
    stale = report.check_fresh(started, report.RESULTS)
    assert len(stale) == 1 and stale[0].startswith("worker_kill.json (recorded "), stale


def test_a_results_file_without_a_time_is_refused(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    report = _renderer(tmp_path, monkeypatch)
    started = datetime.now(UTC) - timedelta(minutes=5)
    _junit(report.JUNIT, started)
    (report.RESULTS / "fuzz.json").write_text(json.dumps({"scenario": "fuzz", **FUZZ}))
    assert [s for s in report.check_fresh(started, report.RESULTS) if "fuzz.json" in s]
    with pytest.raises(SystemExit):
        report.main()
    assert not report.OUT.exists()


@pytest.mark.parametrize("failures,errors", [(1, 0), (0, 2)])
def test_a_failed_run_is_not_rendered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      failures: int, errors: int) -> None:
    report = _renderer(tmp_path, monkeypatch)
    started = datetime.now(UTC) - timedelta(minutes=5)
    _junit(report.JUNIT, started, failures=failures, errors=errors)
    _result(report.RESULTS, "fuzz", started + timedelta(minutes=1), **FUZZ)
    with pytest.raises(SystemExit):
        report.main()
    assert not report.OUT.exists()
    with pytest.raises(report.Refused, match="did not pass"):
        report.run_started(report.JUNIT)


def test_no_junit_results_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    report = _renderer(tmp_path, monkeypatch)
    _result(report.RESULTS, "fuzz", datetime.now(UTC), **FUZZ)
    with pytest.raises(report.Refused, match="no junit results"):
        report.render()
    with pytest.raises(SystemExit):
        report.main()
    assert not report.OUT.exists()


@pytest.mark.parametrize("naive_local", [False, True])
def test_one_passing_runs_fresh_results_are_rendered(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     naive_local: bool) -> None:
    """pytest writes the junit timestamp with the local offset (older ones: naive local)."""
    report = _renderer(tmp_path, monkeypatch)
    started = datetime.now(UTC).replace(microsecond=700_000) - timedelta(minutes=5)
    _junit(report.JUNIT, started, naive_local=naive_local)
    # recorded_at has whole seconds: a result of the run's first second is still this run's
    _result(report.RESULTS, "fuzz", started.replace(microsecond=0), **FUZZ)
    report.main()
    page = report.OUT.read_text()
    assert "**3000**" in page and "RELIABILITY_FUZZ_SEED=7" in page
    assert "_No results for worker kills" in page  # a scenario without results says so


def test_make_reliability_report_fails_with_the_suite() -> None:
    """The recipe: the last junit.xml removed before the run, the suite's exit status kept
    (no `-` prefix, `|| rc=$$?` and `exit $$rc`), the renderer run only after that check."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^reliability-report:.*?\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe is not None
    lines = recipe.group(1)
    pytest_line = next(line for line in lines.splitlines() if "pytest" in line)
    assert not pytest_line.lstrip("\t@").startswith("-"), pytest_line
    assert "|| rc=$$?" in lines and "exit $$rc" in lines, lines
    assert lines.index("rm -f .run/reliability/junit.xml") < lines.index("pytest") < \
        lines.index("exit $$rc") < lines.index("bench/reliability_report.py")
