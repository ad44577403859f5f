"""The report transaction: deterministic identity, conditional create, full provenance."""

from __future__ import annotations

from datetime import UTC, datetime

from clinragen_fhir.config import ReportSettings
from clinragen_fhir.encoding.schema import Skip
from clinragen_fhir.predict.types import Diagnosis, Evidence, Prediction
from clinragen_fhir.report.build import InputRef, build_transaction, report_key

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
USED = [InputRef("Observation/o1", "2"), InputRef("DocumentReference/d1", "1")]


def prediction(method_version: str = "1") -> Prediction:
    ev = Evidence("Observation/o1", "2", "4548-4", "HbA1c", 7.1, "%", "2024-03-02T00:00:00+00:00",
                  "HbA1c 7.1 % on 2024-03-02")
    return Prediction("knowledge-rule-baseline", method_version, "kg-abc",
                      [Diagnosis("44054006", "Diabetes mellitus type 2", 0.9, (ev,))],
                      "HbA1c was 7.1 % on 2024-03-02 (>= 6.5 %).")


def test_key_depends_on_inputs_versions_and_method_only() -> None:
    k = report_key("p1", USED, prediction())
    assert k == report_key("p1", list(reversed(USED)), prediction())  # order-free
    assert k != report_key("p1", [InputRef("Observation/o1", "3"), USED[1]], prediction())
    assert k != report_key("p2", USED, prediction())
    assert k != report_key("p1", USED, prediction("2"))


def test_transaction_is_conditional_and_carries_provenance() -> None:
    skips = [Skip("Observation/bad", "no value")]
    bundle, key = build_transaction("p1", prediction(), USED, skips, ReportSettings(), now=NOW)
    assert bundle["type"] == "transaction"
    _device, report, prov = (e["resource"] for e in bundle["entry"])
    requests = [e["request"] for e in bundle["entry"]]
    # the report lifecycle: one current report per patient and method, by conditional update
    # (was a conditional create on a hash of the inputs: a new report per input version)
    assert requests[1] == {"method": "PUT",
                           "url": f"DiagnosticReport?identifier=urn:clinragen-fhir:report|{key}"}
    assert requests[0]["ifNoneExist"].startswith("identifier=urn:clinragen-fhir:software|")
    assert requests[2] == {"method": "PUT", "url": f"Provenance/{prov['id']}"}
    assert report["status"] == "preliminary"
    assert report["subject"] == {"reference": "Patient/p1"}
    assert report["identifier"] == [{"system": "urn:clinragen-fhir:report", "value": key}]
    assert report["result"] == [{"reference": "Observation/o1/_history/2"}]  # cited, versioned
    assert report["conclusionCode"][0]["coding"][0]["code"] == "44054006"
    assert "7.1 %" in report["conclusion"]
    assert "decision support" in report["text"]["div"]
    assert prov["target"] == [{"reference": bundle["entry"][1]["fullUrl"]}]
    assert prov["agent"][0]["who"]["reference"] == bundle["entry"][0]["fullUrl"]
    whats = [e["what"]["reference"] for e in prov["entity"]]
    assert whats == ["Observation/o1/_history/2", "DocumentReference/d1/_history/1",
                     "Observation/bad"]
    assert prov["entity"][2]["extension"][0]["valueString"] == "no value"
    assert len(prov["id"]) <= 64
    again, key2 = build_transaction("p1", prediction(), USED, skips, ReportSettings(), now=NOW)
    assert key2 == key and again == bundle


def test_rationale_lab_claims_are_checked_and_shown_to_reader_and_auditor() -> None:
    import base64

    from clinragen_fhir.knowledge import load_graph
    from clinragen_fhir.report.faithfulness import check_report_rationale
    from tests.unit.train_examples import frame

    t = datetime(2024, 3, 2, tzinfo=UTC)
    labs = frame([("4548-4", 7.1, t), ("2345-7", 150.0, t)])
    p = prediction()
    p.rationale = ("HbA1c 7.1 % on 2024-03-02, high. Glucose (serum/plasma) 90 mg/dL on "
                   "2024-03-02, low.")
    claims = check_report_rationale(p.rationale, labs, load_graph())
    assert [c.matched for c in claims] == [True, False]  # the glucose was 150, not 90 or low
    bundle, key = build_transaction("p1", p, USED, [], ReportSettings(), now=NOW, labs=labs,
                                    claims=claims)
    report = bundle["entry"][1]["resource"]
    ext = next(e for e in report["extension"] if e["url"].endswith("/rationale-lab-claims"))
    parts = [(e["url"], next(v for k, v in e.items() if k.startswith("value")))
             for e in ext["extension"]]
    assert parts[:2] == [("claims", 2), ("matched", 1)]
    assert parts[2][0] == "unmatched" and parts[2][1].startswith("Glucose (serum/plasma) 90")
    assert "1 of 2 lab claims in the rationale match" in report["text"]["div"]
    page = base64.b64decode(report["presentedForm"][0]["data"]).decode()
    assert "Not matching: \u201cGlucose (serum/plasma) 90" in page
    assert key == build_transaction("p1", p, USED, [], ReportSettings(), now=NOW)[1]  # same id
    silent = check_report_rationale("No new disorder is supported.", labs, load_graph())
    bundle, _ = build_transaction("p1", p, USED, [], ReportSettings(), now=NOW, claims=silent)
    assert "makes no lab claim" in bundle["entry"][1]["resource"]["text"]["div"]
