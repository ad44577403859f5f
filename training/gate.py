"""The release gate: whether an evaluated model may become the shipped default (pure Python).

`default-model release` (training/release.py) asks `check_release(results, system)` before it
writes anything; a refused model raises `ReleaseError` with `GateResult.reason()`. There is no
override. The checks, on `results.json` as `training.evaluate.evaluate` writes it:

* ``external_cohort``: the results have an external cohort (patients from a source nothing was
  trained or tuned on). Without one the model is refused.
* ``external_macro_f1_vs_rule``: the released system's macro-F1 over the revealable disorders
  (``macro_f1_revealable``) on the external cohort is not below the knowledge-rule baseline's
  there (``"rule baseline"``). Equal passes; a missing or non-finite value fails.
* ``external_codes_per_report`` and ``internal_codes_per_report``: the mean number of codes a
  report concludes does not exceed the goal (`GOAL_CODES_PER_REPORT`, 3.0) on either cohort.

Every check carries its value, the limit it was held against, the relation that must hold and a
message naming both numbers (e.g. ``external macro-F1 0.210 < rule baseline 0.290``);
`GateResult.to_json()` is what metrics.json records under ``gate``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

GOAL_CODES_PER_REPORT = 3.0
RULE_BASELINE = "rule baseline"


@dataclass(frozen=True)
class Check:
    """One gate condition: `passed` when ``value <relation> limit`` holds."""

    name: str
    cohort: str  # "internal" | "external"
    value: float | None
    limit: float | None
    relation: str  # ">=" | "<=" | "present"
    passed: bool
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "cohort": self.cohort, "value": self.value,
                "limit": self.limit, "relation": self.relation, "passed": self.passed,
                "message": self.message}


@dataclass(frozen=True)
class GateResult:
    """The verdict on one system of one results.json."""

    system: str
    goal_codes_per_report: float
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def reason(self) -> str:
        """Why the model is refused ('' when it passes): every failed check's message."""
        if self.passed:
            return ""
        return (f"release gate refused {self.system!r}: "
                + "; ".join(c.message for c in self.failures))

    def to_json(self) -> dict[str, Any]:
        return {"verdict": "pass" if self.passed else "refused", "passed": self.passed,
                "system": self.system, "rule_baseline": RULE_BASELINE,
                "goal_codes_per_report": self.goal_codes_per_report,
                "checks": [c.to_json() for c in self.checks]}


def _finite(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    v = float(x)
    return v if math.isfinite(v) else None


def _pair(a: float, b: float, digits: int = 3) -> tuple[str, str]:
    """Both numbers with enough digits that unequal ones read unequal."""
    for d in range(digits, 8):
        sa, sb = f"{a:.{d}f}", f"{b:.{d}f}"
        if sa != sb or a == b:
            return sa, sb
    return f"{a!r}", f"{b!r}"


def _row(systems: Sequence[Mapping[str, Any]], name: str) -> Mapping[str, Any] | None:
    return next((r for r in systems if r.get("system") == name), None)


def _codes_check(cohort: str, systems: Sequence[Mapping[str, Any]], system: str,
                 goal: float) -> Check:
    name = f"{cohort}_codes_per_report"
    row = _row(systems, system)
    value = _finite(row.get("codes_per_report")) if row is not None else None
    if row is None:
        return Check(name, cohort, None, goal, "<=", False,
                     f"{cohort} cohort has no row for {system!r}")
    if value is None:
        return Check(name, cohort, None, goal, "<=", False,
                     f"{cohort} codes per report n/a (goal <= {goal:.2f})")
    shown, limit = _pair(value, goal, 2)
    ok = value <= goal
    return Check(name, cohort, value, goal, "<=", ok,
                 f"{cohort} codes per report {shown} {'<=' if ok else '>'} goal {limit}")


def _f1_check(systems: Sequence[Mapping[str, Any]], system: str) -> Check:
    name, cohort = "external_macro_f1_vs_rule", "external"
    row, rule = _row(systems, system), _row(systems, RULE_BASELINE)
    if row is None or rule is None:
        missing = system if row is None else RULE_BASELINE
        return Check(name, cohort, None, None, ">=", False,
                     f"external cohort has no row for {missing!r}")
    value = _finite(row.get("macro_f1_revealable"))
    limit = _finite(rule.get("macro_f1_revealable"))
    if value is None or limit is None:
        return Check(name, cohort, value, limit, ">=", False,
                     f"external macro-F1 {'n/a' if value is None else f'{value:.3f}'} vs rule "
                     f"baseline {'n/a' if limit is None else f'{limit:.3f}'}: not comparable")
    a, b = _pair(value, limit)
    ok = value >= limit
    return Check(name, cohort, value, limit, ">=", ok,
                 f"external macro-F1 {a} {'>=' if ok else '<'} rule baseline {b}")


def check_release(results: Mapping[str, Any], system: str,
                  goal_codes_per_report: float = GOAL_CODES_PER_REPORT) -> GateResult:
    """The gate's checks on `results` (results.json) for the row named `system` (the released
    variant's title, e.g. "ClinRaGen SLM (full: staged + knowledge)")."""
    checks: list[Check] = []
    external = results.get("external")
    has_external = isinstance(external, Mapping) and bool(external.get("systems"))
    checks.append(Check("external_cohort", "external", None, None, "present", has_external,
                        "external cohort present" if has_external else
                        "results.json has no external cohort (the gate needs patients nothing "
                        "was trained or tuned on)"))
    if has_external:
        assert isinstance(external, Mapping)
        checks.append(_f1_check(external["systems"], system))
        checks.append(_codes_check("external", external["systems"], system,
                                   goal_codes_per_report))
    checks.append(_codes_check("internal", results.get("systems", []), system,
                               goal_codes_per_report))
    return GateResult(system, goal_codes_per_report, checks)
