"""The label vocabulary: the disorders a patient's labs or vital signs can reveal.

Torch-free, so the dataset builder, the evaluation and the release gate share one definition.
"""

from __future__ import annotations

from clinragen_fhir.knowledge import KnowledgeGraph
from clinragen_fhir.knowledge.graph import SCT, local
from clinragen_fhir.knowledge.retrieval import rule_index


def revealable_disorders(kg: KnowledgeGraph) -> set[str]:
    """SNOMED ids of the disorders a patient's labs or vitals can reveal: those at least one
    crg:Finding supports through a crg:Association. (The graph has no per-disorder marker of
    note-revealability: any disorder term can be mentioned in a note, and the dataset masks every
    disorder name in the notes, so notes add none.)"""
    return {local(a.disorder, SCT) for assocs in rule_index(kg).assocs_by_finding.values()
            for a in assocs if a.polarity == "supports"} & set(kg.disorders())
