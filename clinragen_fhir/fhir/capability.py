"""What the worker needs of a FHIR server's CapabilityStatement, and what a server lacks of it
(`check-config` names each gap before the first task runs)."""

from __future__ import annotations

from typing import Any

from clinragen_fhir.config import problem_list_enabled
from clinragen_fhir.fhir.conditions import PROBLEM_LIST_SEARCH

REQUIRED_SEARCH = {
    "Observation": ["patient", "category", "code", "date"],
    "DocumentReference": ["patient"],
    "DiagnosticReport": ["subject", "identifier"],
    "Patient": ["_lastUpdated"],
}


def capability_gaps(cap: dict[str, Any], problem_list: bool | None = None) -> list[str]:
    """What the server's CapabilityStatement lacks of what the worker needs (Condition search
    too while the problem-list check is on: `problem_list`, None: `[report] problem_list`)."""
    gaps: list[str] = []
    rest = next((r for r in cap.get("rest", []) if r.get("mode") == "server"), None)
    if rest is None:
        return ["no server REST capability"]
    if not any(i.get("code") == "transaction" for i in rest.get("interaction", [])):
        gaps.append("system interaction 'transaction'")
    resources = {r.get("type"): r for r in rest.get("resource", [])}
    # the problem list's Condition search, only while the check is on ([report] problem_list)
    needed = {**REQUIRED_SEARCH,
              **(PROBLEM_LIST_SEARCH if problem_list_enabled(problem_list) else {})}
    for rtype, params in needed.items():
        res = resources.get(rtype)
        if res is None:
            gaps.append(f"resource {rtype}")
            continue
        names = {p.get("name") for p in res.get("searchParam", [])}
        gaps += [f"{rtype} search parameter '{p}'" for p in params
                 if p not in names and not p.startswith("_")]
    dr = resources.get("DiagnosticReport", {})
    if not dr.get("conditionalCreate"):
        gaps.append("DiagnosticReport conditional create")
    if not dr.get("conditionalUpdate"):  # the report lifecycle: one report, new versions
        gaps.append("DiagnosticReport conditional update")
    return gaps
