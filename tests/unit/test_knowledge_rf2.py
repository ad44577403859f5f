"""The RF2 importer on a hand-written fixture: counts, IS-A, errors, atomic replacement."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from clinragen_fhir.knowledge.cli import knowledge
from clinragen_fhir.knowledge.errors import RF2FormatError
from clinragen_fhir.knowledge.rf2 import (
    current_store,
    import_rf2,
    open_graph,
    write_synthetic_release,
)

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "rf2"
SUBCLASS = "<http://www.w3.org/2000/01/rdf-schema#subClassOf>"


def count(store: Path, where: str) -> int:
    g = open_graph(store)
    rows = list(g.query(f"SELECT (COUNT(*) AS ?n) WHERE {{ {where} }}"))
    return int(str(rows[0][0]))  # type: ignore[index]


def test_fixture_import(tmp_path: Path) -> None:
    report = import_rf2(FIXTURE, tmp_path)
    assert (report.concepts, report.descriptions, report.is_a, report.attributes) == (11, 21, 7, 2)
    sct = "http://snomed.info/id/"
    assert count(tmp_path, f"<{sct}44054006> {SUBCLASS} <{sct}73211009>") == 1
    assert count(tmp_path, f"<{sct}44054006> {SUBCLASS}+ <{sct}404684003>") == 1  # transitive
    assert count(tmp_path, f"<{sct}44054006> {SUBCLASS} <{sct}64572001>") == 0  # inactive rel
    assert count(tmp_path, f"<{sct}126877002> ?p ?o") == 0  # inactive concept
    g = open_graph(tmp_path)
    pref = "<http://www.w3.org/2004/02/skos/core#prefLabel>"
    rows = g.query(f"SELECT ?l WHERE {{ <{sct}44054006> {pref} ?l }}")
    labels = {str(row[0]) for row in rows}  # type: ignore[index]
    assert labels == {"Type 2 diabetes mellitus"}
    assert count(tmp_path, f"<{sct}73211009> <https://w3id.org/clinragen/kg#findingSite> "
                           f"<{sct}113331007>") == 1


def corrupt(tmp_path: Path, name: str, line_no: int, new: str) -> Path:
    release = tmp_path / "bad"
    shutil.copytree(FIXTURE, release)
    path = next(release.rglob(name))
    lines = path.read_bytes().decode().split("\r\n")
    lines[line_no - 1] = new
    path.write_bytes("\r\n".join(lines).encode())
    return path


def test_malformed_line_names_file_line_reason(tmp_path: Path) -> None:
    path = corrupt(tmp_path, "sct2_Relationship_Snapshot*", 4, "2000003020\t20250101\t1\tshort")
    with pytest.raises(RF2FormatError) as err:
        import_rf2(tmp_path / "bad", tmp_path / "store")
    assert err.value.path == str(path) and err.value.line == 4
    assert "fields" in err.value.reason
    result = CliRunner().invoke(knowledge, ["import-rf2", str(tmp_path / "bad"), "--store",
                                            str(tmp_path / "store2")])
    assert result.exit_code == 2 and f"{path}:4:" in result.output


def test_bad_active_flag(tmp_path: Path) -> None:
    corrupt(tmp_path, "sct2_Concept_Snapshot*", 3,
            "404684003\t20250101\tyes\t900000000000207008\t900000000000074008")
    with pytest.raises(RF2FormatError, match=r":3: active 'yes'"):
        import_rf2(tmp_path / "bad", tmp_path / "store")


def test_failed_or_interrupted_import_keeps_previous_store(tmp_path: Path) -> None:
    store = tmp_path / "store"
    import_rf2(FIXTURE, store)
    before = current_store(store)
    corrupt(tmp_path, "sct2_Description_Snapshot*", 5, "garbage")
    with pytest.raises(RF2FormatError):
        import_rf2(tmp_path / "bad", store)

    def interrupt(what: str, n: int) -> None:
        if what == "descriptions":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        import_rf2(FIXTURE, store, progress=interrupt)
    assert current_store(store) == before
    assert count(store, "?s a <https://w3id.org/clinragen/kg#Concept>") == 11
    assert not list(store.glob(".importing-*"))


def test_synthetic_release_rate(tmp_path: Path) -> None:
    release = write_synthetic_release(tmp_path / "rel", 3000)
    report = import_rf2(release, tmp_path / "store")
    assert report.concepts == 2940  # every 50th concept is inactive
    assert report.rows_per_second > 5000
