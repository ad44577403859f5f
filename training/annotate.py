"""Attach teacher rationales (all stages) to a built dataset, in place or into a new folder.

Each split's JSONL is rewritten through a temporary file and renamed, so an interrupted run
leaves the previous file intact; the LLM cache makes a rerun cheap. The manifest records which
teacher wrote the rationales and how many answers were rejected.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from training.data import SPLITS
from training.example import Example, read_examples, write_examples
from training.teacher import Teacher

BATCH = 16  # examples per teacher call (the LLM teacher runs a batch concurrently)


@dataclass
class AnnotateReport:
    teacher: str
    examples: int = 0
    stages: Counter[str] = field(default_factory=Counter)  # stage -> rationales written
    rejected: Counter[str] = field(default_factory=Counter)  # stage -> rejected answers
    seconds: float = 0.0
    usage: dict[str, int] = field(default_factory=dict)  # LLM tokens and requests

    def to_json(self) -> dict[str, Any]:
        return {"teacher": self.teacher, "examples": self.examples,
                "stages": dict(self.stages), "rejected": dict(self.rejected),
                "seconds": round(self.seconds, 2), "usage": self.usage}


def _batches(examples: Iterator[Example], size: int) -> Iterator[list[Example]]:
    batch: list[Example] = []
    for ex in examples:
        batch.append(ex)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def annotate_dataset(in_dir: Path, teacher: Teacher, out_dir: Path | None = None,
                     splits: Sequence[str] = SPLITS, progress: bool = True,
                     batch_size: int = BATCH) -> AnnotateReport:
    """Write `teacher`'s rationales into every example of the splits (JSONL and manifest)."""
    started = time.perf_counter()
    out_dir = out_dir or in_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    report = AnnotateReport(teacher.name)
    for split in splits:
        src = in_dir / f"{split}.jsonl"
        if not src.exists():
            continue
        total = sum(1 for line in src.open(encoding="utf-8") if line.strip())
        tmp = out_dir / f".{split}.jsonl.tmp"

        def annotated(src: Path = src, split: str = split, total: int = total
                      ) -> Iterator[Example]:
            bar = tqdm(total=total, desc=f"annotate {split}", unit="example",
                       disable=not progress)
            for batch in _batches(read_examples(src), batch_size):
                for ex, out in zip(batch, teacher.annotate(batch), strict=True):
                    ex.rationales = dict(out.rationales)
                    ex.meta["teacher"] = teacher.name
                    ex.meta["teacher_rejected"] = dict(out.rejected)
                    report.stages.update(out.rationales.keys())
                    report.rejected.update(out.rejected.keys())
                    report.examples += 1
                    yield ex
                bar.update(len(batch))
            bar.close()

        write_examples(tmp, annotated())
        tmp.replace(out_dir / f"{split}.jsonl")
    report.seconds = time.perf_counter() - started
    client = getattr(teacher, "client", None)
    if client is not None:
        report.usage = client.stats.as_dict()
    manifest_path = in_dir / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        manifest["teacher"] = report.to_json()
        if out_dir != in_dir:
            shutil.copyfile(manifest_path, out_dir / "manifest.json")
        (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return report
