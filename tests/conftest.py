"""Shared fixtures: the real Synthea data shipped beside the project."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "synthea-exafluence-qicore"


def read_bundle(path: Path) -> dict[str, Any]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return json.load(fh)  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.fail(f"shared Synthea data missing at {DATA}")
    return DATA


@pytest.fixture(scope="session")
def patient_bundles(data_dir: Path) -> list[Path]:
    return sorted(p for p in data_dir.rglob("*.json.gz")
                  if not p.name.startswith(("hospitalInformation", "practitionerInformation")))
