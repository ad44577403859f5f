"""What retrieval returns for one patient: the findings (with the readings that triggered them),
the disorders they support or oppose, the note mentions, and the paths between them."""

from __future__ import annotations

from dataclasses import dataclass, field

from clinragen_fhir.encoding.schema import Reading


@dataclass
class FindingHit:
    """A finding detected in this patient's labs."""

    id: str  # URI
    label: str
    loinc: str  # observable(s) that triggered it, comma-separated when several
    direction: str
    threshold: float
    upper_threshold: float | None
    unit: str
    min_count: int
    persistence_days: float
    rows: tuple[Reading, ...]  # the readings that made it fire
    strength: float = 0.0  # strongest association it takes part in (ranking)


@dataclass(frozen=True)
class SupportRef:
    """One fact behind a disorder's score."""

    fact: str  # URI of the crg:Association (or the note rule)
    evidence: str  # finding URI, or "DocumentReference/<id>#start-end" for a note mention
    strength: float
    source: str  # source label, e.g. "ADA 2024"
    source_uri: str


@dataclass
class DisorderSupport:
    """A disorder with the facts for and against it; score in [0, 1]."""

    snomed: str
    uri: str
    term: str
    score: float
    supporting: list[SupportRef] = field(default_factory=list)
    opposing: list[SupportRef] = field(default_factory=list)
    conclusion_threshold: float = 1.0


@dataclass(frozen=True)
class NoteMention:
    """A concept found in a note."""

    concept: str  # URI
    code: str  # SNOMED id
    kind: str  # "disorder" | "symptom"
    term: str  # the text matched
    negated: bool
    document_id: str
    start: int
    end: int


@dataclass(frozen=True)
class PathStep:
    """An edge of the explanation graph: finding/mention -> disorder."""

    source: str
    relation: str  # "supports" | "opposes" | "mentions" | "negates"
    target: str
    fact: str
    strength: float


@dataclass
class Retrieval:
    """What the knowledge says about one patient."""

    knowledge_version: str
    findings: list[FindingHit]
    disorders: list[DisorderSupport]
    note_mentions: list[NoteMention]
    paths: list[PathStep]
    labels: dict[str, str] = field(default_factory=dict)
    unknown_codes: list[str] = field(default_factory=list)  # LOINC codes the graph lacks
    lab_names: dict[str, str] = field(default_factory=dict)  # LOINC -> the graph's short name

    def facts(self) -> list[tuple[str, str, str]]:
        """(subject label, relation, object label) triples for the model to embed."""
        out: list[tuple[str, str, str]] = []
        for f in self.findings:
            for r in f.rows[-3:]:
                out.append((f.label, "observed as", r.describe()))
        for p in self.paths:
            out.append((self.labels.get(p.source, p.source), p.relation,
                        self.labels.get(p.target, p.target)))
        return out
