"""Per-patient retrieval: abnormal findings (with the readings that triggered them), the disorders
they support or oppose, negation-aware note mentions, and the paths between them.

The rule definitions are read from the graph by SPARQL once per graph version and cached
(`rules`); the evaluation itself is plain numpy over the patient's lab frame (`labs`); note
mentions are `mentions`; the result types are `results`.
"""

from __future__ import annotations

from clinragen_fhir.knowledge.retrieval.labs import MAX_TRIGGER_ROWS, retrieve
from clinragen_fhir.knowledge.retrieval.mentions import find_mentions
from clinragen_fhir.knowledge.retrieval.results import (
    DisorderSupport,
    FindingHit,
    NoteMention,
    PathStep,
    Retrieval,
    SupportRef,
)
from clinragen_fhir.knowledge.retrieval.rules import (
    RuleIndex,
    rule_index,
    supported_by,
    supporting_tests,
)

__all__ = ["MAX_TRIGGER_ROWS", "DisorderSupport", "FindingHit", "NoteMention", "PathStep",
           "Retrieval", "RuleIndex", "SupportRef", "find_mentions", "retrieve",
           "rule_index", "supported_by", "supporting_tests"]
