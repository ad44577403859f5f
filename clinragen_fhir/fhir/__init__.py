"""Talking to a FHIR R4 server and turning its resources into typed records."""
