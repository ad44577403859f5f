"""The ClinRaGen model (training side, needs torch): backbone SLM, prefix builder, wrapper.

`model.features` and `model.decode` re-export the torch-free runtime modules
(`clinragen_fhir.encoding.features`, `clinragen_fhir.predict.decode`).
Import the torch parts from their modules (`model.clinragen`, `model.prefix`, `model.backbone`)
so that importing `model.features` never pulls torch in.
"""
