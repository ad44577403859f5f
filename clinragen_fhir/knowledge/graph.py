"""The knowledge graph: rdflib Graph plus indexes read once (by SPARQL) for fast lookups.

Everything the code decides on (units, ranges, thresholds) is read from the triples, so a new
graph version changes behaviour without a code change; `version` is a hash of the loaded files.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from rdflib import Graph, Literal, Namespace, URIRef
from rdflib.namespace import RDFS, SKOS

from clinragen_fhir.knowledge import units
from clinragen_fhir.knowledge.errors import UnitConversionError, UnknownCodeError

CRG = Namespace("https://w3id.org/clinragen/kg#")
SCT = Namespace("http://snomed.info/id/")
LOINC = Namespace("http://loinc.org/rdf/")
ICD = Namespace("http://purl.bioontology.org/ontology/ICD10CM/")
HP = Namespace("http://purl.obolibrary.org/obo/HP_")
SRC = Namespace("https://w3id.org/clinragen/kg/source/")

PACKAGE_DIR = Path(__file__).resolve().parent
CORE_FILES = ("vocab.ttl", "sources.ttl", "labs.ttl", "disorders.ttl", "findings.ttl")
DATA_DIR = PACKAGE_DIR / "data"
PREFIXES = {"crg": CRG, "sct": SCT, "loinc": LOINC, "icd": ICD, "hp": HP, "src": SRC,
            "skos": SKOS, "rdfs": RDFS}


def local(uri: object, ns: Namespace) -> str:
    """The code part of a namespaced URI ('' when it is not in that namespace)."""
    text = str(uri)
    return text[len(str(ns)):] if text.startswith(str(ns)) else ""


@dataclass(frozen=True)
class RefRange:
    """One reference interval in the canonical unit."""

    low: float | None
    high: float | None
    sex: str | None = None
    age_min: float | None = None
    age_max: float | None = None
    source: str = ""


@dataclass(frozen=True)
class LabConcept:
    """A LOINC observable as the graph describes it."""

    code: str
    name: str
    canonical_unit: str
    category: str  # "lab" | "vital"
    value_type: str = "quantity"  # "quantity" | "coded"
    conversions: dict[str, tuple[float, float]] = field(default_factory=dict, hash=False)
    ranges: tuple[RefRange, ...] = ()
    seen_units: tuple[str, ...] = ()


@dataclass(frozen=True)
class DisorderConcept:
    """A SNOMED CT disorder with its terms, ICD-10-CM codes and IS-A parents."""

    snomed: str
    term: str
    synonyms: tuple[str, ...] = ()
    icd10: tuple[str, ...] = ()
    parents: tuple[str, ...] = ()
    uri: str = ""
    # who it can affect, as stated on this concept (ancestors' constraints apply as well)
    applicable_sex: str | None = None  # "female" / "male"
    min_age_years: float | None = None  # inclusive
    max_age_years: float | None = None  # inclusive


def _num(value: object) -> float | None:
    return float(value.toPython()) if isinstance(value, Literal) else None


def _age(value: object) -> float | None:
    """A constraint's age, None when malformed (`validate` reports it; loading must not fail)."""
    try:
        return _num(value)
    except (TypeError, ValueError):
        return None


# Effective constraints of a disorder (its own and its ancestors'): sexes required (two: none
# possible for a known sex), youngest and oldest possible age.
Limits = tuple[frozenset[str], float, float]


_LAB_Q = """
SELECT ?lab ?type ?name ?unit ?vtype WHERE {
  ?lab a ?type ; skos:prefLabel ?name ; crg:canonicalUnit ?unit .
  FILTER(?type IN (crg:LabTest, crg:VitalSign))
  OPTIONAL { ?lab crg:valueType ?vtype }
}"""
_CONV_Q = """
SELECT ?lab ?from ?factor ?offset WHERE {
  ?lab crg:conversion ?c . ?c crg:fromUnit ?from ; crg:factor ?factor .
  OPTIONAL { ?c crg:offset ?offset }
}"""
_RANGE_Q = """
SELECT ?lab ?low ?high ?sex ?amin ?amax ?srcl WHERE {
  ?lab crg:referenceRange ?r .
  OPTIONAL { ?r crg:low ?low } OPTIONAL { ?r crg:high ?high } OPTIONAL { ?r crg:sex ?sex }
  OPTIONAL { ?r crg:ageMin ?amin } OPTIONAL { ?r crg:ageMax ?amax }
  OPTIONAL { ?r crg:source/rdfs:label ?srcl }
}"""
_DIS_Q = """
SELECT ?d ?term WHERE { ?d a crg:Disorder ; skos:prefLabel ?term . }"""


class KnowledgeGraph:
    """The loaded graph and its lookups; build with `load_graph`."""

    def __init__(self, graph: Graph, version: str) -> None:
        self.graph = graph
        self.version = version
        self._labs: dict[str, LabConcept] = {}
        self._disorders: dict[str, DisorderConcept] = {}
        self._icd_to_snomed: dict[str, str] = {}
        self._icd_who: dict[str, str] = {}
        self._children: dict[str, frozenset[str]] | None = None  # built on first use
        self._limits: dict[str, Limits] = {}  # only disorders with a constraint in their IS-A path
        self._index()

    # -- indexing ---------------------------------------------------------------------------
    def _index(self) -> None:
        g = self.graph
        convs: dict[str, dict[str, tuple[float, float]]] = {}
        for row in g.query(_CONV_Q, initNs=PREFIXES):
            lab, frm, factor, offset = row  # type: ignore[misc]
            convs.setdefault(str(lab), {})[units.normalise(str(frm))] = (
                _num(factor) or 0.0, _num(offset) or 0.0)
        ranges: dict[str, list[RefRange]] = {}
        for row in g.query(_RANGE_Q, initNs=PREFIXES):
            lab, low, high, sex, amin, amax, srcl = row  # type: ignore[misc]
            ranges.setdefault(str(lab), []).append(RefRange(
                _num(low), _num(high), str(sex) if sex is not None else None,
                _num(amin), _num(amax), str(srcl or "")))
        for row in g.query(_LAB_Q, initNs=PREFIXES):
            lab, typ, name, unit, vtype = row  # type: ignore[misc]
            code = local(lab, LOINC)
            if not code:
                continue
            seen = tuple(sorted(str(u) for u in g.objects(lab, CRG.seenUnit)))
            self._labs[code] = LabConcept(
                code, str(name), str(unit), "vital" if typ == CRG.VitalSign else "lab",
                str(vtype) if vtype is not None else "quantity", convs.get(str(lab), {}),
                tuple(ranges.get(str(lab), [])), seen)
        # constraint triples are few: read them by predicate, not per disorder
        sexes = {s: str(o).strip().lower() for s, o in g.subject_objects(CRG.applicableSex)}
        min_age = {s: _age(o) for s, o in g.subject_objects(CRG.minAgeYears)}
        max_age = {s: _age(o) for s, o in g.subject_objects(CRG.maxAgeYears)}
        for row in g.query(_DIS_Q, initNs=PREFIXES):
            d, term = row  # type: ignore[misc]
            snomed = local(d, SCT)
            if not snomed:
                continue
            icds = [local(i, ICD) for i in g.objects(d, CRG.icd10cm)]
            # Turtle order is lost, so codes are sorted and `snomed_for_icd10` resolves a code
            # shared by several disorders to the shallowest (most general) of them
            for who in g.objects(d, CRG.icd10who):
                self._icd_who.setdefault(local(who, ICD).upper(), snomed)
            self._disorders[snomed] = DisorderConcept(
                snomed, str(term),
                tuple(sorted(str(s) for s in g.objects(d, SKOS.altLabel))),
                tuple(sorted(i for i in icds if i)),
                tuple(sorted(local(p, SCT) for p in g.objects(d, RDFS.subClassOf)
                             if local(p, SCT))),
                str(d), sexes.get(d), min_age.get(d), max_age.get(d))
        constrained = {local(s, SCT) for s in (*sexes, *min_age, *max_age)}
        depth: dict[str, int] = {}
        for s in self._disorders:
            line = self.ancestors(s)
            depth[s] = len(line)
            if constrained and (line | {s}) & constrained:
                self._limits[s] = self._combine(line | {s})
        for snomed, dis in sorted(self._disorders.items(), key=lambda kv: (depth[kv[0]], kv[0])):
            for code in dis.icd10:
                self._icd_to_snomed.setdefault(code.upper(), snomed)

    def _combine(self, codes: set[str]) -> Limits:
        sexes: set[str] = set()
        low, high = -math.inf, math.inf
        for c in codes:
            dis = self._disorders.get(c)
            if dis is None:
                continue
            if dis.applicable_sex in ("female", "male"):
                sexes.add(dis.applicable_sex)
            if dis.min_age_years is not None:
                low = max(low, dis.min_age_years)
            if dis.max_age_years is not None:
                high = min(high, dis.max_age_years)
        return frozenset(sexes), low, high

    # -- lookups ----------------------------------------------------------------------------
    def lab(self, loinc: str) -> LabConcept | None:
        return self._labs.get(loinc)

    def labs(self) -> dict[str, LabConcept]:
        return dict(self._labs)

    def disorder(self, snomed: str) -> DisorderConcept | None:
        return self._disorders.get(snomed)

    def disorders(self) -> dict[str, DisorderConcept]:
        return dict(self._disorders)

    def ancestors(self, snomed: str) -> set[str]:
        """All IS-A ancestors inside the graph (not the concept itself)."""
        seen: set[str] = set()
        todo = list(self._disorders[snomed].parents) if snomed in self._disorders else []
        while todo:
            p = todo.pop()
            if p not in seen:
                seen.add(p)
                if p in self._disorders:
                    todo.extend(self._disorders[p].parents)
        return seen

    def descendants(self, snomed: str) -> set[str]:
        """All IS-A descendants inside the graph (not the concept itself)."""
        if self._children is None:
            kids: dict[str, set[str]] = {}
            for code, dis in self._disorders.items():
                for parent in dis.parents:
                    kids.setdefault(parent, set()).add(code)
            self._children = {k: frozenset(v) for k, v in kids.items()}
        seen: set[str] = set()
        todo = list(self._children.get(snomed, ()))
        while todo:
            c = todo.pop()
            if c not in seen:
                seen.add(c)
                todo.extend(self._children.get(c, ()))
        return seen

    def limits(self, snomed: str) -> Limits | None:
        """(sexes required, youngest, oldest age) from the disorder and its ancestors; None when
        nothing constrains it."""
        return self._limits.get(snomed)

    def possible(self, snomed: str, sex: str | None, age_years: float | None) -> bool:
        """False when the patient's sex or age rules the disorder out (its own constraints or an
        ancestor's); an unknown sex ("other", "unknown", None), age or code never does."""
        lim = self._limits.get(snomed)
        if lim is None:
            return True
        sexes, low, high = lim
        s = sex.strip().lower() if isinstance(sex, str) else None
        if s in ("female", "male") and sexes and sexes != {s}:
            return False
        return age_years is None or math.isnan(age_years) or low <= age_years <= high

    def most_specific(self, codes: Iterable[str]) -> list[str]:
        """The codes that are no IS-A ancestor of another one, in their order (duplicates once):
        a parent adds nothing beside its child."""
        unique = list(dict.fromkeys(codes))
        implied: set[str] = set()
        for c in unique:
            implied |= self.ancestors(c)
        return [c for c in unique if c not in implied]

    def snomed_for_icd10(self, code: str) -> str | None:
        """SNOMED id for an ICD-10-CM code; walks up (E11.65 -> E11.6 -> E11) when unmapped."""
        key = code.strip().upper()
        while key:
            if key in self._icd_to_snomed:
                return self._icd_to_snomed[key]
            if key in self._icd_who:
                return self._icd_who[key]
            key = key[:-1].rstrip(".")
        return None

    def to_canonical(self, loinc: str, value: float, unit: str) -> float:
        """value (in unit as sent) in the LOINC code's canonical unit."""
        lab = self._labs.get(loinc)
        if lab is None:
            raise UnknownCodeError(f"unknown LOINC code {loinc}")
        if lab.value_type == "coded":
            raise UnitConversionError(f"LOINC {loinc} is a coded result, not a quantity")
        src = units.normalise(unit)
        dst = units.normalise(lab.canonical_unit)
        if src == dst:
            return float(value)
        if src in lab.conversions:
            factor, offset = lab.conversions[src]
            return float(value) * factor + offset
        try:
            return units.convert(float(value), src, dst)
        except UnitConversionError:
            raise UnitConversionError(
                f"cannot convert {unit!r} to {lab.canonical_unit!r} for LOINC {loinc}") from None

    def reference_range(self, loinc: str, sex: str | None,
                        age_years: float | None) -> tuple[float | None, float | None]:
        """(low, high) for this sex and age; the sex-neutral range when no specific one fits."""
        lab = self._labs.get(loinc)
        if lab is None:
            return None, None
        best: RefRange | None = None
        for r in lab.ranges:
            if r.sex is not None and r.sex != sex:
                continue
            if age_years is not None and (
                    (r.age_min is not None and age_years < r.age_min)
                    or (r.age_max is not None and age_years >= r.age_max)):
                continue
            if best is None or (r.sex is not None and best.sex is None):
                best = r
        if best is None and sex is None:
            # unknown sex: the widest interval of the sex-specific ones
            specific = [r for r in lab.ranges if r.sex is not None]
            if specific:
                lows = [r.low for r in specific if r.low is not None]
                highs = [r.high for r in specific if r.high is not None]
                return (min(lows) if lows else None, max(highs) if highs else None)
        return (best.low, best.high) if best else (None, None)

    def label(self, uri: str) -> str:
        """Preferred label of any node (its local name when it has none)."""
        node = URIRef(uri)
        for pred in (SKOS.prefLabel, RDFS.label):
            value = self.graph.value(node, pred)
            if value is not None:
                return str(value)
        return uri.rsplit("/", 1)[-1].rsplit("#", 1)[-1]


def graph_files(path: str | Path | None) -> list[Path]:
    """The RDF files a graph location means: the package's core + prebuilt data by default."""
    if path is None:
        files = [PACKAGE_DIR / f for f in CORE_FILES]
        files += sorted(p for p in DATA_DIR.glob("*") if p.suffix in (".nt", ".ttl"))
        return files
    p = Path(path)
    if p.is_dir():
        return sorted(q for q in p.rglob("*") if q.suffix in (".nt", ".ttl"))
    if not p.exists():
        raise FileNotFoundError(f"knowledge graph not found: {p}")
    return [p]


def _load(files: Iterable[Path]) -> KnowledgeGraph:
    g = Graph()
    for prefix, ns in PREFIXES.items():
        g.bind(prefix, ns)
    digest = hashlib.sha256()
    for f in files:
        data = f.read_bytes()
        digest.update(f.name.encode() + b"\0" + data)
        g.parse(data=data, format="nt" if f.suffix == ".nt" else "turtle")
    return KnowledgeGraph(g, "kg-" + digest.hexdigest()[:16])


@lru_cache(maxsize=1)
def _default_graph() -> KnowledgeGraph:
    return _load(graph_files(None))


def load_graph(path: str | Path | None = None) -> KnowledgeGraph:
    """The shipped graph (cached once per process) or the graph at `path` (file or folder)."""
    if path is None:
        return _default_graph()
    return _load(graph_files(path))
