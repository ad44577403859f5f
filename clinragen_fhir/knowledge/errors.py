"""Knowledge errors: bad input is a ValueError the caller can report and skip."""

from __future__ import annotations


class KnowledgeError(ValueError):
    """Base of every knowledge-graph input error."""


class UnknownCodeError(KnowledgeError):
    """A LOINC / SNOMED / ICD code the graph does not hold."""


class UnitConversionError(KnowledgeError):
    """A unit that does not parse or cannot be converted to the canonical one."""


class RF2FormatError(KnowledgeError):
    """A malformed RF2 line: says which file, which line and why."""

    def __init__(self, path: str, line: int, reason: str) -> None:
        super().__init__(f"{path}:{line}: {reason}")
        self.path, self.line, self.reason = path, line, reason
