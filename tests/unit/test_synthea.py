"""Seeded Synthea cohorts: keyed by every setting, chunked and resumable, cached outside the
work tree; the real generator (Maven Central) writes NDJSON the dataset builder reads."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest

from training.data import BuildConfig, build_dataset, source_from_spec
from training.synthea import CohortSpec, cache_root, chunk_dirs, generate

ROOT = Path(__file__).resolve().parents[2]


def test_the_key_changes_with_every_setting_and_chunks_cover_the_cohort() -> None:
    base = CohortSpec(patients=600, seed=1)
    others = [CohortSpec(600, 2), CohortSpec(601, 1), CohortSpec(600, 1, state="Texas"),
              CohortSpec(600, 1, ages="30-95"), CohortSpec(600, 1, years_of_history=5),
              CohortSpec(600, 1, chunk=100), CohortSpec(600, 1, reference_date="20261202")]
    assert len({base.key, *(o.key for o in others)}) == 1 + len(others)
    assert base.key == CohortSpec(patients=600, seed=1).key  # stable
    # a cohort generated before the reference date was a setting keeps its key (and its cache)
    legacy = {k: v for k, v in asdict(base).items() if k != "reference_date"}
    assert base.key == hashlib.sha256(json.dumps(legacy, sort_keys=True).encode()).hexdigest()[:12]
    chunks = base.chunks()
    assert [n for _, n, _ in chunks] == [250, 250, 100]
    assert len({s for _, _, s in chunks}) == 3  # each chunk its own seed


def test_the_cache_lives_outside_the_work_tree(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    monkeypatch.delenv("CLINRAGEN_CACHE", raising=False)
    assert ROOT not in cache_root().parents
    monkeypatch.setenv("CLINRAGEN_CACHE", str(tmp_path))
    assert cache_root() == tmp_path


@pytest.mark.slow
def test_a_generated_cohort_is_reused_resumed_and_builds_examples(tmp_path: Path) -> None:
    """Synthea 3.3.0 from Maven Central (shared jar cache), 6 patients in chunks of 3."""
    if shutil.which("mvn") is None or shutil.which("java") is None:
        pytest.skip("needs Maven and Java (make install brings them for HAPI)")
    cache = tmp_path / "cache"
    jars = cache_root() / "synthea-3.3.0"
    if (jars / "fetched.json").is_file():  # reuse the machine's jars, not 200 MB again
        cache.mkdir()
        (cache / "synthea-3.3.0").symlink_to(jars)
    spec = CohortSpec(patients=6, seed=5, ages="40-80", chunk=3)
    folder = generate(spec, cache)
    assert (folder / "cohort.json").is_file() and len(chunk_dirs(folder)) == 2
    first = {p.name: p.stat().st_mtime_ns for p in (folder / "chunk-000" / "fhir").iterdir()}
    # a stopped run: the second chunk lost its marker; only it is generated again
    (folder / "chunk-001" / "done.json").unlink()
    (folder / "cohort.json").unlink()
    generate(spec, cache)
    again = {p.name: p.stat().st_mtime_ns for p in (folder / "chunk-000" / "fhir").iterdir()}
    assert again == first  # the finished chunk was not touched
    assert (folder / "chunk-001" / "done.json").is_file()
    assert json.loads((folder / "cohort.json").read_text())["chunks"] == 2
    source = source_from_spec(folder)
    assert source.kind == "cohort"
    manifest = build_dataset([folder], tmp_path / "ds", config=BuildConfig(seed=1),
                             progress=False)
    assert sum(c["patients"] for c in manifest.counts.values()) >= 5
    assert sum(c["examples"] for c in manifest.counts.values()) > 0
