"""What a run's reports say, as (label, figure) rows: the figures `diagnose-all` prints after a
run and the demo writes to its summary (codes per report, the rationale check, the problem
list), from the runs' outcomes (`pipeline.Outcome` as dicts)."""

from __future__ import annotations

from collections import Counter
from typing import Any


def report_figures(outcomes: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """What the reports say, over those written or found: codes per report, and for the written
    ones the rationale check (diagnoses citing a reading, claims that hold)."""
    reports = [o for o in outcomes if o.get("status") in ("written", "exists")]
    if not reports:
        return []
    n = sorted(len(o.get("diagnoses", [])) for o in reports)
    rows = [("codes per report: mean / median / max",
             f"{sum(n) / len(n):.2f} / {n[len(n) // 2]} / {n[-1]}"),
            ("reports concluding nothing", str(sum(1 for x in n if x == 0)))]
    written = [o for o in reports if o.get("status") == "written"]
    dx = sum(len(o.get("diagnoses", [])) for o in written)
    if written and dx:
        cited = sum(int(o.get("diagnoses_cited", 0)) for o in written)
        with_cited = sum(1 for o in written if int(o.get("diagnoses_cited", 0)) > 0)
        with_dx = sum(1 for o in written if o.get("diagnoses"))
        claims = sum(int(o.get("claims", 0)) for o in written)
        held = sum(int(o.get("claims_held", 0)) for o in written)
        rows += [("diagnoses citing a reading (written reports)", f"{cited} of {dx} "
                  f"({100 * cited / dx:.1f} %)"),
                 ("reports with a cited reading (of those concluding something)",
                  f"{with_cited} of {with_dx}"),
                 ("lab claims that hold (claim check)", f"{held} of {claims}" + (
                     f" ({100 * held / claims:.1f} %)" if claims else ""))]
    # the concluded disorders against the problem list (report.problem_list), when compared
    status: Counter[str] = Counter()
    for o in reports:
        status.update({str(k): int(v) for k, v in (o.get("problem_list") or {}).items()})
    if status:
        rows += [("concluded disorders suspected, not on the problem list",
                  str(status["suspected"])),
                 ("concluded disorders known (on the problem list)", str(status["known"])),
                 ("concluded disorders, problem list not checked", str(status["not-checked"]))]
    return rows
