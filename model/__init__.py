"""The ClinRaGen model (training side, needs torch): backbone SLM, prefix builder, wrapper.

The torch-free parts live in the runtime package: featurisation in
`clinragen_fhir.encoding.features`, the diagnosis line in `clinragen_fhir.predict.diagnosis_line`,
token generation in `clinragen_fhir.inference.generation`.
Import the torch parts from their modules (`model.clinragen`, `model.prefix`, `model.backbone`)
so that importing `model` never pulls torch in.
"""
