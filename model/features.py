"""Moved to `clinragen_fhir.encoding.features` (the torch-free runtime featurises exactly as
training does); this re-export keeps `model.features` imports working."""

from clinragen_fhir.encoding.features import (
    BATCH_KEYS,
    DAY_SECONDS,
    PAD_ID,
    UNK_ID,
    Budgets,
    Encoding,
    Fact,
    Features,
    LabRef,
    Modalities,
    TextTokenizer,
    collate,
    featurise,
    featurise_facts,
    featurise_labs,
    featurise_notes,
    knowledge_facts,
    loinc_vocabulary,
    normalise_values,
    squash,
)

__all__ = [
    "BATCH_KEYS", "DAY_SECONDS", "PAD_ID", "UNK_ID", "Budgets", "Encoding", "Fact", "Features",
    "LabRef", "Modalities", "TextTokenizer", "collate", "featurise", "featurise_facts",
    "featurise_labs", "featurise_notes", "knowledge_facts", "loinc_vocabulary",
    "normalise_values", "squash",
]
