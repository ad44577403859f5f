"""Secrets that must not fail open: placeholders copied from the example configs in deploy/
(compose's site.env and .env), which look like secrets and so would be used as such."""

from __future__ import annotations

# what the placeholders in deploy/compose/site.env and .env contain (and a PEM body `REPLACE`)
_MARKERS = ("change-me", "changeme", "replace-with", "replace-me")


def is_placeholder(value: str) -> bool:
    """True for `change-me-...`, `replace-with-...`, or a PEM whose body is `REPLACE`."""
    text = value.strip().lower()
    return any(m in text for m in _MARKERS) or "replace" in (
        line.strip() for line in text.splitlines())
