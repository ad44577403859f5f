"""The ClinRaGen model (training side, needs torch): backbone SLM, prefix builder, wrapper.

The torch-free parts live in the runtime package: featurisation in
`clinragen_fhir.encoding.features`, the diagnosis line in `clinragen_fhir.predict.diagnosis_line`,
token generation in `clinragen_fhir.inference.generation`. `model.features` and `model.decode`
are left only for importers not yet changed (model/clinragen.py, training/distill.py,
training/evaluate.py); delete them once those import the runtime modules.
Import the torch parts from their modules (`model.clinragen`, `model.prefix`, `model.backbone`)
so that importing `model` never pulls torch in.
"""
