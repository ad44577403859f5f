"""Each input resource once, parsed by fhir.resources: the shared first step of the lab frame
and the notes. A repeat, or a resource the model refuses, becomes a recorded skip with the
reason (never an exception), so one bad record cannot fail a patient's run."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from clinragen_fhir.encoding.schema import Skip
from clinragen_fhir.fhir.resources import first_error

Model = TypeVar("Model", bound=BaseModel)


def validated(raws: Iterable[Any], model: type[Model], resource_type: str,
              skips: list[Skip]) -> Iterator[tuple[str, Model]]:
    """(`Type/id`, parsed resource) for each resource in `raws` not seen before and valid;
    a duplicate or a malformed one is appended to `skips`."""
    seen: set[str] = set()
    for raw in raws:
        ref = f"{resource_type}/{raw.get('id', '?')}" if isinstance(raw, dict) \
            else f"{resource_type}/?"
        if ref in seen:
            skips.append(Skip(ref, "duplicate of a resource already read"))
            continue
        seen.add(ref)
        try:
            yield ref, model.model_validate(raw)
        except ValidationError as exc:
            skips.append(Skip(ref, f"malformed {resource_type}: {first_error(exc)}"))
