"""Training: datasets from FHIR, the teacher, sequential rationale distillation, evaluation.

Training may import the runtime (`clinragen_fhir`); the runtime never imports this package.
"""
