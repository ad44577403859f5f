"""Text made safe for the report's HTML page and its FHIR narrative (XHTML): escaped, and the
control characters XML forbids dropped, so server-held text can never become markup."""

from __future__ import annotations

import html
import re

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def esc(value: object) -> str:
    """Escaped text, valid in both HTML and XML (control characters dropped)."""
    return html.escape(_CONTROL.sub("", str(value)), quote=True)
