"""The demo summary's report figures: codes per report and the rationale check."""

from __future__ import annotations

from clinragen_fhir.report.figures import report_figures


def test_codes_per_report_and_the_claim_check_are_counted_over_reports() -> None:
    outcomes = [
        {"status": "written", "diagnoses": ["a", "b"], "diagnoses_cited": 2, "claims": 3,
         "claims_held": 3},
        {"status": "written", "diagnoses": ["a"], "diagnoses_cited": 0, "claims": 0,
         "claims_held": 0},
        {"status": "written", "diagnoses": [], "claims": 0, "claims_held": 0},
        {"status": "exists", "diagnoses": ["c", "d", "e"]},
        {"status": "skipped", "diagnoses": []},  # no report: not counted
    ]
    rows = dict(report_figures(outcomes))
    assert rows["codes per report: mean / median / max"] == "1.50 / 2 / 3"
    assert rows["reports concluding nothing"] == "1"
    assert rows["diagnoses citing a reading (written reports)"] == "2 of 3 (66.7 %)"
    assert rows["reports with a cited reading (of those concluding something)"] == "1 of 2"
    assert rows["lab claims that hold (claim check)"] == "3 of 3 (100.0 %)"
    assert report_figures([{"status": "skipped"}]) == []
