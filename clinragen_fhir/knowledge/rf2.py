"""SNOMED CT RF2 Snapshot importer into an on-disk Oxigraph store (via pyoxigraph / oxrdflib).

Why Oxigraph: rdflib's in-memory store costs ~1 kB per triple, so a full International release
(~4-5 M triples) would need ~5 GB; Oxigraph keeps the triples on disk (RocksDB), its bulk loader
streams, and `oxrdflib` opens the result as an rdflib Graph, so SPARQL stays rdflib SPARQL.

Memory: the importer holds only the set of active concept ids and preferred description ids
(ints), and streams every file line by line. Atomicity: a release is written to a fresh folder
and `current` is switched to it by an atomic rename; an interrupted import leaves the previous
store as it was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from clinragen_fhir.knowledge.errors import RF2FormatError
from clinragen_fhir.knowledge.graph import CRG, SCT

if TYPE_CHECKING:
    from rdflib import Graph

FSN = "900000000000003001"
SYNONYM = "900000000000013009"
PREFERRED = "900000000000548007"
IS_A = "116680003"
# defining attributes kept, by SNOMED attribute id -> our property
ATTRIBUTES = {
    "363698007": "findingSite",
    "116676008": "associatedMorphology",
    "363714003": "interprets",
    "363713009": "hasInterpretation",
}
COLUMNS = {
    "concept": ["id", "effectiveTime", "active", "moduleId", "definitionStatusId"],
    "description": ["id", "effectiveTime", "active", "moduleId", "conceptId", "languageCode",
                    "typeId", "term", "caseSignificanceId"],
    "relationship": ["id", "effectiveTime", "active", "moduleId", "sourceId", "destinationId",
                     "relationshipGroup", "typeId", "characteristicTypeId", "modifierId"],
    "language": ["id", "effectiveTime", "active", "moduleId", "refsetId",
                 "referencedComponentId", "acceptabilityId"],
}
PATTERNS = {
    "concept": "sct2_Concept_*Snapshot*.txt",
    "description": "sct2_Description_*Snapshot*.txt",
    "relationship": "sct2_Relationship_*Snapshot*.txt",
    "language": "der2_cRefset_Language*Snapshot*.txt",
}
_SCTID = re.compile(r"^\d{6,18}$")
_UUID = re.compile(r"^[0-9a-fA-F-]{36}$")
_DATE = re.compile(r"^\d{8}$")
RDFS_SUBCLASS = "http://www.w3.org/2000/01/rdf-schema#subClassOf"
SKOS = "http://www.w3.org/2004/02/skos/core#"


@dataclass
class ImportReport:
    """What an import read and wrote, and how fast."""

    store: str = ""
    concepts: int = 0
    descriptions: int = 0
    is_a: int = 0
    attributes: int = 0
    triples: int = 0
    rows: int = 0
    seconds: float = 0.0
    files: dict[str, str] = field(default_factory=dict)

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


def find_files(path: Path) -> dict[str, Path]:
    """The Snapshot files of a release folder (searched recursively)."""
    found: dict[str, Path] = {}
    for kind, pattern in PATTERNS.items():
        matches = sorted(p for p in path.rglob(pattern)
                         if "StatedRelationship" not in p.name and "Concrete" not in p.name)
        if matches:
            found[kind] = matches[0]
    missing = [k for k in ("concept", "description", "relationship") if k not in found]
    if missing:
        raise RF2FormatError(str(path), 0, f"no RF2 Snapshot {', '.join(missing)} file found")
    return found


def read_rows(path: Path, kind: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each data line; malformed lines raise RF2FormatError."""
    cols = COLUMNS[kind]
    with path.open(encoding="utf-8", newline="") as fh:
        header = fh.readline().rstrip("\r\n").split("\t")
        if header != cols:
            raise RF2FormatError(str(path), 1, f"header is not the RF2 {kind} header "
                                 f"(expected {' '.join(cols)})")
        for n, line in enumerate(fh, start=2):
            line = line.rstrip("\r\n")
            if not line:
                continue
            parts = line.split("\t")
            if len(parts) != len(cols):
                raise RF2FormatError(str(path), n,
                                     f"expected {len(cols)} tab-separated fields, got {len(parts)}")
            _check(path, n, kind, parts)
            yield n, parts


def _check(path: Path, n: int, kind: str, parts: list[str]) -> None:
    if kind == "language":
        if not _UUID.match(parts[0]):
            raise RF2FormatError(str(path), n, f"id {parts[0]!r} is not a UUID")
        ids: tuple[int, ...] = (4, 5, 6)
    else:
        ids = {"concept": (0, 3, 4), "description": (0, 3, 4, 6, 8),
               "relationship": (0, 3, 4, 5, 7, 8, 9)}[kind]
    for i in ids:
        if not _SCTID.match(parts[i]):
            raise RF2FormatError(str(path), n, f"{COLUMNS[kind][i]} {parts[i]!r} is not an SCTID")
    if not _DATE.match(parts[1]):
        raise RF2FormatError(str(path), n, f"effectiveTime {parts[1]!r} is not YYYYMMDD")
    if parts[2] not in ("0", "1"):
        raise RF2FormatError(str(path), n, f"active {parts[2]!r} is not 0 or 1")


def _lit(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def write_ntriples(files: dict[str, Path], out: TextIO, report: ImportReport,
                   progress: Callable[[str, int], None] | None = None) -> None:
    """Stream the release as N-Triples into `out`; validates every line on the way."""
    sct, crg = str(SCT), str(CRG)
    active: set[int] = set()
    for _, p in read_rows(files["concept"], "concept"):
        report.rows += 1
        if p[2] == "1":
            active.add(int(p[0]))
            out.write(f"<{sct}{p[0]}> <http://www.w3.org/1999/02/22-rdf-syntax-ns#type> "
                      f"<{crg}Concept> .\n")
            report.concepts += 1
            report.triples += 1
    if progress:
        progress("concepts", report.concepts)
    preferred: set[int] = set()
    if "language" in files:
        for _, p in read_rows(files["language"], "language"):
            report.rows += 1
            if p[2] == "1" and p[6] == PREFERRED:
                preferred.add(int(p[5]))
    for _, p in read_rows(files["description"], "description"):
        report.rows += 1
        if p[2] != "1" or int(p[4]) not in active:
            continue
        subject = f"<{sct}{p[4]}>"
        term = _lit(p[7])
        if p[6] == FSN:
            out.write(f"{subject} <{crg}fsn> {term} .\n")
            if not preferred:  # no language refset: the FSN without its tag is the label
                label = re.sub(r"\s*\([^()]*\)\s*$", "", p[7])
                out.write(f"{subject} <{SKOS}prefLabel> {_lit(label)} .\n")
                report.triples += 1
        elif int(p[0]) in preferred:
            out.write(f"{subject} <{SKOS}prefLabel> {term} .\n")
        else:
            out.write(f"{subject} <{SKOS}altLabel> {term} .\n")
        report.descriptions += 1
        report.triples += 1
    if progress:
        progress("descriptions", report.descriptions)
    for _, p in read_rows(files["relationship"], "relationship"):
        report.rows += 1
        if p[2] != "1" or int(p[4]) not in active or int(p[5]) not in active:
            continue
        if p[7] == IS_A:
            out.write(f"<{sct}{p[4]}> <{RDFS_SUBCLASS}> <{sct}{p[5]}> .\n")
            report.is_a += 1
        elif p[7] in ATTRIBUTES:
            out.write(f"<{sct}{p[4]}> <{crg}{ATTRIBUTES[p[7]]}> <{sct}{p[5]}> .\n")
            report.attributes += 1
        else:
            continue
        report.triples += 1
    if progress:
        progress("relationships", report.is_a + report.attributes)


def import_rf2(release: str | Path, store_dir: str | Path,
               progress: Callable[[str, int], None] | None = None) -> ImportReport:
    """Import an RF2 Snapshot into `store_dir/current` (swapped in only when complete)."""
    import pyoxigraph as ox

    started = time.monotonic()
    root = Path(store_dir)
    root.mkdir(parents=True, exist_ok=True)
    files = find_files(Path(release))
    report = ImportReport(files={k: str(v) for k, v in files.items()})
    stamp = time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    work = root / f".importing-{stamp}"
    work.mkdir()
    try:
        nt = work / "release.nt"
        with nt.open("w", encoding="utf-8") as out:
            write_ntriples(files, out, report, progress)
        store_path = work / "store"
        store = ox.Store(str(store_path))
        store.bulk_load(path=str(nt), format=ox.RdfFormat.N_TRIPLES)
        store.flush()
        del store
        nt.unlink()
        final = root / f"store-{stamp}"
        work.rename(final)
        report.seconds = time.monotonic() - started
        report.store = str(final / "store")
        (final / "IMPORT.json").write_text(json.dumps(asdict(report), indent=2), encoding="utf-8")
        link = root / f".current-{stamp}"
        link.symlink_to(final.name)
        os.replace(link, root / "current")  # atomic switch
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    for old in root.glob("store-*"):  # earlier releases are no longer referenced
        if old.name != final.name:
            shutil.rmtree(old, ignore_errors=True)
    return report


def current_store(store_dir: str | Path) -> Path | None:
    """The store folder now in use, or None when nothing was imported yet."""
    link = Path(store_dir) / "current"
    return (link.resolve() / "store") if link.exists() else None


def open_graph(store_dir: str | Path) -> Graph:
    """The current store as a read-only rdflib Graph (Oxigraph backend)."""
    import pyoxigraph as ox
    from oxrdflib import OxigraphStore
    from rdflib import Graph
    from rdflib.graph import DATASET_DEFAULT_GRAPH_ID

    path = current_store(store_dir)
    if path is None:
        raise FileNotFoundError(f"no imported store under {store_dir}")
    return Graph(store=OxigraphStore(store=ox.Store.read_only(str(path))),
                 identifier=DATASET_DEFAULT_GRAPH_ID)


def write_synthetic_release(folder: str | Path, n_concepts: int, rels_per_concept: int = 4,
                            descriptions_per_concept: int = 3) -> Path:
    """An RF2-format release of made-up ids and terms (for tests and the rate benchmark)."""
    base = Path(folder) / "Snapshot"
    (base / "Terminology").mkdir(parents=True, exist_ok=True)
    (base / "Refset" / "Language").mkdir(parents=True, exist_ok=True)
    mod, date = "900000000000207008", "20250101"
    cid = [str(100000000 + i * 10) for i in range(n_concepts)]
    with (base / "Terminology" / "sct2_Concept_Snapshot_INT_20250101.txt").open("w") as fh:
        fh.write("\t".join(COLUMNS["concept"]) + "\n")
        for i, c in enumerate(cid):
            fh.write(f"{c}\t{date}\t{0 if i % 50 == 49 else 1}\t{mod}\t900000000000074008\n")
    with (base / "Terminology" / "sct2_Description_Snapshot-en_INT_20250101.txt").open("w") as fd, \
            (base / "Refset" / "Language" / "der2_cRefset_LanguageSnapshot-en_INT_20250101.txt"
             ).open("w") as fl:
        fd.write("\t".join(COLUMNS["description"]) + "\n")
        fl.write("\t".join(COLUMNS["language"]) + "\n")
        d = 0
        for i, c in enumerate(cid):
            for k in range(descriptions_per_concept):
                did = str(500000000 + d * 10)
                d += 1
                typ = FSN if k == 0 else SYNONYM
                term = f"Synthetic concept {i} (disorder)" if k == 0 else f"synthetic term {i}-{k}"
                fd.write(f"{did}\t{date}\t1\t{mod}\t{c}\ten\t{typ}\t{term}\t900000000000448009\n")
                acc = PREFERRED if k == 1 else "900000000000549004"
                fl.write(f"{d:08x}-0000-4000-8000-{d:012x}\t{date}\t1\t{mod}\t900000000000509007"
                         f"\t{did}\t{acc}\n")
    types = [IS_A, *ATTRIBUTES]
    with (base / "Terminology" / "sct2_Relationship_Snapshot_INT_20250101.txt").open("w") as fh:
        fh.write("\t".join(COLUMNS["relationship"]) + "\n")
        r = 0
        for i, c in enumerate(cid):
            for k in range(rels_per_concept if i else 0):
                dest = cid[(i * 7 + k * 13) % i] if k else cid[(i - 1) // 2]
                rid = str(700000000 + r * 10)
                r += 1
                fh.write(f"{rid}\t{date}\t1\t{mod}\t{c}\t{dest}\t{k // 2}\t{types[k % len(types)]}"
                         f"\t900000000000011006\t900000000000451002\n")
    return base
