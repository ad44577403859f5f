"""The parts of the CDS Hooks service (clinragen_fhir/cds_hooks.py): auth, card, requests, store."""
