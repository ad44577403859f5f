"""Graph checks (`knowledge validate`) and dataset coverage (`knowledge stats`)."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rdflib import Literal
from rdflib.namespace import RDF, RDFS, SKOS, XSD

from clinragen_fhir.knowledge import units
from clinragen_fhir.knowledge.errors import KnowledgeError
from clinragen_fhir.knowledge.graph import CRG, ICD, LOINC, SCT, KnowledgeGraph, local

DIRECTIONS = {"high", "above", "low", "range", "rise", "fold-rise"}
SEXES = {"female", "male"}
NUMBERS = {XSD.decimal, XSD.integer, XSD.double, XSD.float, XSD.nonNegativeInteger}
MAX_AGE = 130.0  # an age beyond any recorded human life is a typo


def validate(kg: KnowledgeGraph) -> list[str]:
    """Problems found (empty = valid): sources, dangling codes, units, ranges, thresholds."""
    g = kg.graph
    problems: list[str] = []
    sources = set(g.subjects(RDF.type, CRG.Source))
    for s in sources:
        if g.value(s, RDFS.label) is None or g.value(s, CRG.citation) is None:
            problems.append(f"source {s} lacks a label or citation")
    findings = set(g.subjects(RDF.type, CRG.Finding))
    disorders = set(g.subjects(RDF.type, CRG.Disorder))
    for a in g.subjects(RDF.type, CRG.Association):
        src = g.value(a, CRG.source)
        if src is None or src not in sources:
            problems.append(f"fact {a} has no known source")
        strength = g.value(a, CRG.strength)
        if not isinstance(strength, Literal) or not 0 <= float(strength) <= 1:
            problems.append(f"fact {a} strength {strength} not in [0, 1]")
        if g.value(a, CRG.finding) not in findings:
            problems.append(f"fact {a} names an undefined finding")
        if g.value(a, CRG.disorder) not in disorders:
            problems.append(f"fact {a} names an undefined disorder {g.value(a, CRG.disorder)}")
        if str(g.value(a, CRG.polarity)) not in ("supports", "opposes"):
            problems.append(f"fact {a} polarity must be supports/opposes")
    used = set(g.objects(None, CRG.finding))
    hpo_loaded = (None, CRG.graphSource, Literal("hpo")) in g
    for f in findings:
        if f not in used:
            problems.append(f"finding {f} supports or opposes nothing")
        direction: str = str(g.value(f, CRG.direction))
        if direction not in DIRECTIONS:
            problems.append(f"finding {f} direction {direction!r} unknown")
        thr = g.value(f, CRG.threshold)
        if not isinstance(thr, Literal):
            problems.append(f"finding {f} has no numeric threshold")
        upper = g.value(f, CRG.upperThreshold)
        if direction == "range" and (not isinstance(upper, Literal) or not isinstance(thr, Literal)
                                     or float(upper) <= float(thr)):
            problems.append(f"finding {f}: range needs upperThreshold > threshold")
        obs = list(g.objects(f, CRG.observable))
        if not obs:
            problems.append(f"finding {f} has no observable")
        for o in obs:
            lab = kg.lab(local(o, LOINC))
            if lab is None:
                problems.append(f"finding {f} observable {o} is not a defined lab")
        for h in g.objects(f, CRG.hpo):
            if hpo_loaded and g.value(h, SKOS.prefLabel) is None:
                problems.append(f"finding {f} HPO term {h} not in the HPO triples")
    icd_loaded = (None, CRG.graphSource, Literal("icd10cm")) in g
    for d in disorders:
        if g.value(d, SKOS.prefLabel) is None:
            problems.append(f"disorder {d} has no preferred term")
        if not local(d, SCT):
            problems.append(f"disorder {d} is not a SNOMED CT id")
        for p in g.objects(d, RDFS.subClassOf):
            if p not in disorders:
                problems.append(f"disorder {d} parent {p} is not defined (dangling)")
        for icd_code in g.objects(d, CRG.icd10cm):
            if icd_loaded and g.value(icd_code, SKOS.prefLabel) is None:
                problems.append(f"disorder {d} ICD-10-CM {local(icd_code, ICD)} invalid")
    problems += _constraint_problems(kg, disorders)
    for code, lab in kg.labs().items():
        try:
            units.parse(lab.canonical_unit)
        except KnowledgeError as exc:
            problems.append(f"LOINC {code}: canonical unit {exc}")
            continue
        if lab.value_type == "quantity":
            for u in (*lab.seen_units, *map(str, lab.conversions)):
                try:
                    kg.to_canonical(code, 1.0, u)
                except KnowledgeError as exc:
                    problems.append(f"LOINC {code}: unit {u!r}: {exc}")
        for r in lab.ranges:
            if r.low is None and r.high is None:
                problems.append(f"LOINC {code}: empty reference range")
            if r.low is not None and r.high is not None and not r.low < r.high:
                problems.append(f"LOINC {code}: range low {r.low} >= high {r.high}")
            if (r.low is not None and r.low < 0) or (r.high is not None and r.high <= 0):
                problems.append(f"LOINC {code}: range {r.low}-{r.high} not plausible")
            if r.sex not in (None, "male", "female"):
                problems.append(f"LOINC {code}: range sex {r.sex!r} unknown")
            if not r.source:
                problems.append(f"LOINC {code}: range without a source")
    return problems


def _constraint_problems(kg: KnowledgeGraph, disorders: set[Any]) -> list[str]:
    """Sex/age constraints: one well-formed value each, on a disorder, an age interval that is
    not empty, and no descendant of a female-only disorder marked male-only (or vice versa)."""
    g = kg.graph
    problems: list[str] = []
    for pred, name in ((CRG.applicableSex, "applicableSex"), (CRG.minAgeYears, "minAgeYears"),
                       (CRG.maxAgeYears, "maxAgeYears")):
        for d in set(g.subjects(pred)):
            values = list(g.objects(d, pred))
            if d not in disorders:
                problems.append(f"{name} on {d}, which is not a disorder")
            if len(values) > 1:
                problems.append(f"disorder {d} has {len(values)} {name} values")
            for v in values:
                if pred == CRG.applicableSex:
                    if not isinstance(v, Literal) or str(v) not in SEXES:
                        problems.append(f"disorder {d} applicableSex {str(v)!r} is not "
                                        "'female' or 'male'")
                elif (not isinstance(v, Literal) or v.datatype not in NUMBERS or v.ill_typed
                      or not 0 <= float(v) <= MAX_AGE):
                    problems.append(f"disorder {d} {name} {str(v)!r} is not an age in years "
                                    f"(a number in [0, {MAX_AGE:g}])")
    for code in kg.disorders():
        lim = kg.limits(code)
        if lim is None:
            continue
        sexes, low, high = lim
        if len(sexes) > 1:
            problems.append(f"disorder {code}: its own and its ancestors' applicableSex "
                            "contradict (female and male)")
        if low > high:
            problems.append(f"disorder {code}: minAgeYears {low:g} > maxAgeYears {high:g} "
                            "(with its ancestors')")
    return problems


def counts_by_class(kg: KnowledgeGraph) -> dict[str, int]:
    """Instances per class (core classes, HPO terms, ICD-10-CM codes) and triples."""
    q = "SELECT ?c (COUNT(DISTINCT ?s) AS ?n) WHERE { ?s a ?c } GROUP BY ?c"
    out: dict[str, int] = {}
    for c, n in kg.graph.query(q):  # type: ignore[misc]
        name = str(c).rsplit("#", 1)[-1].rsplit("/", 1)[-1]
        if str(c).startswith(str(SKOS)) and name == "Concept":
            name = "ICD-10-CM code (skos:Concept)"
        elif name == "Class" and "owl" in str(c):
            name = "HPO term (owl:Class)"
        out[name] = int(n)
    out["triples"] = len(kg.graph)
    return out


@dataclass
class Coverage:
    """Share of a data set's lab Observations and Conditions the graph knows."""

    lab_obs: Counter[str] = field(default_factory=Counter)
    vital_obs: Counter[str] = field(default_factory=Counter)
    conditions: Counter[str] = field(default_factory=Counter)
    condition_tags: dict[str, str] = field(default_factory=dict)

    def rows(self, kg: KnowledgeGraph) -> list[tuple[str, int, int]]:
        """(what, covered, total) rows of the coverage table."""
        def share(counter: Counter[str], known: set[str]) -> tuple[int, int]:
            return sum(n for c, n in counter.items() if c in known), sum(counter.values())

        labs = set(kg.labs())
        dis = set(kg.disorders())
        disorder_codes = {c for c, t in self.condition_tags.items() if t == "disorder"}
        clinical = disorder_codes | (set(self.conditions) & dis)
        rows = []
        for what, counter, known in (
                ("lab Observations", self.lab_obs, labs),
                ("vital-sign readings", self.vital_obs, labs)):
            rows.append((what, *share(counter, known)))
            rows.append(("  distinct codes", len(set(counter) & known), len(counter)))
        sub = Counter({c: n for c, n in self.conditions.items() if c in clinical})
        rows.append(("Conditions: disorders (tag 'disorder' or a graph disorder)",
                     *share(sub, dis)))
        rows.append(("  distinct codes", len(set(sub) & dis), len(sub)))
        rows.append(("Conditions: all, incl. social/situation findings",
                     *share(self.conditions, dis)))
        return rows


def _tag(display: str) -> str:
    return display.rsplit("(", 1)[-1].rstrip(")").strip() if display.endswith(")") else ""


def scan_dataset(folder: Path) -> Coverage:
    """Count lab/vital codes and Condition codes in a folder of Bundles (.json / .json.gz)."""
    cov = Coverage()
    for p in sorted(folder.rglob("*.json*")):
        opener: Any = gzip.open if p.suffix == ".gz" else open
        with opener(p, "rt", encoding="utf-8") as fh:
            bundle = json.load(fh)
        for e in bundle.get("entry", []):
            r = e.get("resource", {})
            if r.get("resourceType") == "Observation":
                cats = {c.get("code") for cat in r.get("category", [])
                        for c in cat.get("coding", [])}
                target = (cov.lab_obs if "laboratory" in cats
                          else cov.vital_obs if "vital-signs" in cats else None)
                if target is None:
                    continue
                if "laboratory" in cats:
                    target[_loinc(r.get("code", {}))] += 1
                else:
                    for part in r.get("component") or [r]:
                        target[_loinc(part.get("code", {}))] += 1
            elif r.get("resourceType") == "Condition":
                for c in r.get("code", {}).get("coding", []):
                    if c.get("system") == "http://snomed.info/sct":
                        cov.conditions[c["code"]] += 1
                        cov.condition_tags[c["code"]] = _tag(c.get("display", ""))
                        break
    return cov


def _loinc(concept: dict[str, Any]) -> str:
    for c in concept.get("coding", []):
        if c.get("system") == "http://loinc.org":
            return str(c.get("code", ""))
    return ""
