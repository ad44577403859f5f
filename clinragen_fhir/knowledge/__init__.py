"""Clinical knowledge: a curated SNOMED/LOINC/ICD-10-CM core graph, HPO and ICD triples,
an RF2 importer, and per-patient retrieval that the rules and the model read."""

from __future__ import annotations

from clinragen_fhir.knowledge.errors import (
    KnowledgeError,
    RF2FormatError,
    UnitConversionError,
    UnknownCodeError,
)
from clinragen_fhir.knowledge.graph import (
    DisorderConcept,
    KnowledgeGraph,
    LabConcept,
    load_graph,
)
from clinragen_fhir.knowledge.retrieval import (
    DisorderSupport,
    FindingHit,
    NoteMention,
    PathStep,
    Retrieval,
    SupportRef,
    retrieve,
)

__all__ = [
    "DisorderConcept",
    "DisorderSupport",
    "FindingHit",
    "KnowledgeError",
    "KnowledgeGraph",
    "LabConcept",
    "NoteMention",
    "PathStep",
    "RF2FormatError",
    "Retrieval",
    "SupportRef",
    "UnitConversionError",
    "UnknownCodeError",
    "load_graph",
    "retrieve",
]
