"""CLI output a person reads: the summary table names disorders, attachments are elided."""

from __future__ import annotations

import base64
from pathlib import Path

from click.testing import CliRunner

from clinragen_fhir.cli import _elide_attachments, _print_summary, main


def test_show_elides_base64_attachment_but_keeps_the_rest() -> None:
    data = base64.b64encode(b"<html>" + b"x" * 5000 + b"</html>").decode()
    report = {"resourceType": "DiagnosticReport", "id": "r1", "conclusion": "Prediabetes",
              "presentedForm": [{"contentType": "text/html", "data": data, "title": "t"}]}
    out = _elide_attachments(report)
    assert out["conclusion"] == "Prediabetes"
    form = out["presentedForm"][0]
    assert form["contentType"] == "text/html" and form["title"] == "t"
    assert form["data"] == f"<{len(data)} base64 characters: use --html FILE>"
    assert report["presentedForm"][0]["data"] == data  # the resource itself is untouched


def test_summary_counts_statuses_and_names_concluded_disorders() -> None:
    outcomes = [
        {"status": "written", "diagnoses": ["44054006"], "method": "clinragen-onnx",
         "version": "2"},
        {"status": "written", "diagnoses": ["44054006", "999999999"]},
        {"status": "exists", "diagnoses": []},
        {"status": "skipped", "reason": "no usable labs or notes", "diagnoses": []},
    ]
    runner = CliRunner()
    with runner.isolation() as (out, _err, _in):
        _print_summary(outcomes, 1.25)
        text = out.getvalue().decode()
    assert "| patients | 4 |" in text and "| reports written | 2 |" in text
    # the report lifecycle: a new version of a current report counts as written, and is named
    assert "| of which new versions of a current report | 1 |" in text
    assert "| reports already present | 1 |" in text
    assert "| skipped | 1 |" in text
    assert "| skipped/failed: no usable labs or notes | 1 |" in text
    assert "| 44054006 | Diabetes mellitus type 2 | 2 |" in text
    assert "| 999999999 | (not in graph) | 1 |" in text
    assert "| method: clinragen-onnx | 1 |" in text  # which model wrote the reports


def test_show_requires_type_and_id() -> None:
    result = CliRunner().invoke(main, ["show", "DiagnosticReport"])
    assert result.exit_code != 0 and "REFERENCE must be Type/id" in result.output


def test_backfill_checkpoint_is_per_model(tmp_path: Path) -> None:
    """A query finished by the rule baseline is redone once a trained model is configured."""
    from clinragen_fhir.cli import model_identity
    from clinragen_fhir.worker.state import backfill_key

    url, query = "http://127.0.0.1:8080/fhir", "Patient"
    assert model_identity(None) == "rule-baseline"
    assert backfill_key(url, query, model_identity(None)) == backfill_key(url + "/", query)
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "manifest.json").write_text('{"files": {"decoder.onnx": "a"}}')
    first = model_identity(tmp_path)
    assert first.startswith("onnx:")
    assert backfill_key(url, query, first) != backfill_key(url, query)
    (tmp_path / "onnx" / "manifest.json").write_text('{"files": {"decoder.onnx": "b"}}')
    assert model_identity(tmp_path) != first  # re-exported: a new model, a new checkpoint
    assert model_identity(tmp_path / "absent").startswith("unreadable:")
