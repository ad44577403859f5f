"""Predictions written back as FHIR DiagnosticReport + Provenance."""
