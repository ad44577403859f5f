"""The HTML report as a browser draws it: headless Chromium renders the page to a PNG.

Set-up installs Debian's `chromium` (deploy/chromium/install, run by `make services` and
`make test-unit`), so a missing browser fails here rather than skipping: a skipped check would
let a page that draws blank go unnoticed.

Run as a script, this module also makes the screenshots in docs/images/ from real data: shared
Synthea patients through `pipeline.diagnose_patient` with the released model, the report taken
from the transaction the pipeline would POST (the bundle stands in for the FHIR server's reads):

    CLINRAGEN_REPORT__PROBLEM_LIST=on .venv/bin/python -m tests.unit.test_report_screenshot \\
        --model .run/model/default 49644ad4-3f2c-ecff-52c0-0bd1022aa1b6 \\
        3458d2d7-2b13-ee85-cd49-4ab409c1af5d 1a00efb9-3b83-1420-f821-ce64a9d97c7e

(with the problem list read, from the bundle's Conditions: known vs suspected).
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from clinragen_fhir.config import ReportSettings
from clinragen_fhir.report.build import build_transaction
from clinragen_fhir.report.html import decode_presented_form
from tests.unit.test_report_html import NOW, PATIENT, USED, labs, prediction

ROOT = Path(__file__).resolve().parents[2]
DOCS_IMAGES = ROOT / "docs" / "images"
# referenced from docs/integration.md; the third shows known and suspected side by side
SHOTS = ("report-metabolic.png", "report-kidney.png", "report-suspected.png")
WIDTH, HEIGHT = 1000, 1400
DATA = ROOT.parent / "shared" / "data" / "synthea-exafluence-qicore"

pytestmark = pytest.mark.slow


def chromium() -> str:
    """The browser's path; a clear failure (not a skip) where set-up did not install it."""
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("chromium not found: the report screenshot test needs Debian's chromium; "
                    "run deploy/chromium/install (make services and make test-unit do)")
    return path


def screenshot(html_file: Path, png: Path, browser: str | None = None) -> None:
    """Headless Chromium, its own profile, no GPU, no network needed (the page loads nothing)."""
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [browser or chromium(), "--headless", "--no-sandbox", "--disable-gpu",
             "--hide-scrollbars", f"--user-data-dir={profile}", f"--screenshot={png}",
             f"--window-size={WIDTH},{HEIGHT}", html_file.resolve().as_uri()],
            check=True, capture_output=True, timeout=120)


def png_size(png: Path) -> tuple[int, int]:
    """Width and height from the PNG header."""
    data = png.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{png}: not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


def assert_drawn(png: Path) -> None:
    """The PNG has the window's size and is a page with content, not a blank or error page:
    pixel variance with PIL where it is installed, else the size of the compressed file (a
    blank 1000x1400 PNG is about 5 kB, a report page over 100 kB)."""
    assert png.exists(), png
    assert png_size(png) == (WIDTH, HEIGHT)
    assert png.stat().st_size > 40_000, f"{png}: {png.stat().st_size} bytes: the page looks blank"
    try:
        from PIL import Image, ImageStat
    except ImportError:
        return
    with Image.open(png) as im:
        grey = im.convert("L")
        variance = ImageStat.Stat(grey).var[0]
        assert variance > 200, f"{png}: pixel variance {variance:.0f}: the page looks blank"
        # the patient header and the banner: dark text in the top 160 px
        top = grey.crop((0, 0, WIDTH, 160)).point(lambda g: 255 if g < 100 else 0)
        dark = ImageStat.Stat(top).sum[0] / 255
        assert dark > 2_000, f"{png}: {dark:.0f} dark pixels at the top: no header drawn"


def test_report_page_renders_in_chromium(tmp_path: Path) -> None:
    bundle, _ = build_transaction("p1", prediction(), USED, [], ReportSettings(), now=NOW,
                                  labs=labs(), patient=PATIENT)
    html = decode_presented_form(bundle["entry"][1]["resource"])
    assert html is not None
    page, png = tmp_path / "report.html", tmp_path / "report.png"
    page.write_text(html, encoding="utf-8")
    screenshot(page, png)
    assert_drawn(png)


def test_docs_screenshots_are_real_rendered_reports() -> None:
    chromium()  # the same set-up makes them; they are checked like a fresh rendering
    docs = (ROOT / "docs" / "integration.md").read_text(encoding="utf-8")
    for name in SHOTS:
        assert f"images/{name}" in docs, f"docs/integration.md does not show {name}"
        assert_drawn(DOCS_IMAGES / name)


# ---------------------------------------------------------------------------------------------
# making docs/images/ from real patients (not run by pytest)

class BundleClient:
    """The FHIR reads the pipeline makes, answered from one patient's Synthea bundle; the
    transaction it would POST is kept instead of sent."""

    def __init__(self, bundle: Mapping[str, Any]) -> None:
        self.resources = [dict(e["resource"]) for e in bundle["entry"]]
        for r in self.resources:  # as HAPI stores a loaded bundle: version 1 of each
            r["meta"] = {**r.get("meta", {}), "versionId": "1"}
        self.written: list[dict[str, Any]] = []

    def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        return next(r for r in self.resources
                    if r["resourceType"] == resource_type and r["id"] == resource_id)

    def search(self, resource_type: str, params: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        found = [r for r in self.resources if r["resourceType"] == resource_type]
        if resource_type == "Observation":
            wanted = set(str(params.get("category", "")).split(","))
            found = [r for r in found if wanted & {c.get("code") for cat in r.get("category", [])
                                                   for c in cat.get("coding", [])}]
        return iter(found if resource_type != "DiagnosticReport" else [])

    def batch_search(self, reads: list[tuple[str, Mapping[str, Any] | None]]
                     ) -> list[list[dict[str, Any]]]:
        """`FhirClient.batch_search`: reads (`Type/id`, None) and searches, answered here."""
        return [[self.read(*rtype.split("/"))] if params is None
                else list(self.search(rtype, params)) for rtype, params in reads]

    def transaction(self, bundle: dict[str, Any]) -> dict[str, Any]:
        self.written.append(bundle)
        return {"entry": [  # by type: the report's request URL is a conditional update's query
            {"response": {"location": f"{e['resource']['resourceType']}/new/_history/1"}}
            for e in bundle["entry"]]}


def real_report(path: Path, model_dir: Path | None) -> str:
    """One patient's bundle through the pipeline -> the HTML page of the report it writes."""
    import pandas as pd

    from clinragen_fhir.inference.fallback import build_predictor
    from clinragen_fhir.knowledge import load_graph
    from clinragen_fhir.pipeline import diagnose_patient

    kg = load_graph()
    with gzip.open(path, "rt") as f:
        client = BundleClient(json.load(f))
    patient = next(r for r in client.resources if r["resourceType"] == "Patient")
    latest = max(r["effectiveDateTime"] for r in client.resources
                 if r["resourceType"] == "Observation" and r.get("effectiveDateTime"))
    now = (pd.Timestamp(latest) + timedelta(days=1)).to_pydatetime()  # the day after the data
    predictor = build_predictor(model_dir, kg)
    diagnose_patient(client, kg, predictor, patient["id"],  # type: ignore[arg-type]
                     ReportSettings(audit_events=False), now=now)
    for bundle in client.written:
        for entry in bundle["entry"]:
            html = decode_presented_form(entry["resource"])
            if html:
                return html
    raise SystemExit(f"{path.name}: no report written")


def main() -> None:
    ap = argparse.ArgumentParser(description="docs/images/ from real reports")
    ap.add_argument("patients", nargs=len(SHOTS), help="patient ids (bundle file names)")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--model", type=Path, default=None, help="ONNX model dir (default: rules)")
    args = ap.parse_args()
    browser = shutil.which("chromium")
    if browser is None:
        raise SystemExit("chromium not found: run deploy/chromium/install")
    DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
    for pid, name in zip(args.patients, SHOTS, strict=True):
        bundle = next(args.data.glob(f"*/{pid}*.json.gz"))
        with tempfile.TemporaryDirectory() as tmp:
            page = Path(tmp) / "report.html"
            page.write_text(real_report(bundle, args.model), encoding="utf-8")
            screenshot(page, DOCS_IMAGES / name, browser)
        print(DOCS_IMAGES / name)


if __name__ == "__main__":
    main()
