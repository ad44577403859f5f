"""Errors that name the file and the limit, so an operator can act on one log line."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from clinragen_fhir.knowledge import Retrieval


class ModelUnavailable(Exception):
    """The model directory cannot be used: missing, corrupt, or exported from another version."""

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    @property
    def short(self) -> str:
        """The message without the directory (for reports: no server paths in clinical text)."""
        return f"{self.path.name}: {self.problem}"


class InputTooLong(ValueError):
    """An input exceeds what the exported graphs were declared for.

    `retrieval`: the patient's knowledge retrieval when the predictor had run it (so the rule
    baseline that takes over does not run it again), else None."""

    def __init__(self, path: Path | str, what: str, size: int, limit: int) -> None:
        self.path, self.what, self.size, self.limit = Path(path), what, size, limit
        self.retrieval: Retrieval | None = None
        super().__init__(f"{what} is {size}, over the limit of {limit} declared by {self.path}")

    @property
    def short(self) -> str:
        return f"{self.what} is {self.size}, over the limit of {self.limit} ({self.path.name})"
