"""The ClinRaGen model (training side, needs torch): backbone SLM, prefix builder, wrapper.

`model.features` and `model.decode` are torch-free and are meant to move into the runtime.
Import the torch parts from their modules (`model.clinragen`, `model.prefix`, `model.backbone`)
so that importing `model.features` never pulls torch in.
"""
