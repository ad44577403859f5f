"""The ONNX manifest: what was exported, from which model, with which limits and hashes.

The runtime refuses a directory whose manifest is missing, of another format version, or whose
hashes do not match the files (a half-copied or retrained model), rather than producing
diagnoses from mismatched parts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clinragen_fhir.inference.errors import ModelUnavailable

FORMAT = "clinragen-onnx"
FORMAT_VERSION = 1  # bump when graph inputs/outputs or the decoding contract change
ONNX_DIR = "onnx"
MANIFEST = "manifest.json"
MODEL_FILES = ("config.json", "tokenizer/tokenizer.json")  # hashed: they must match the graphs


@dataclass(frozen=True)
class Limits:
    """Sizes the graphs were exported and checked for; larger inputs are refused."""

    max_labs: int
    max_facts: int
    max_fact_tokens: int
    max_note_tokens: int
    max_positions: int  # prefix + generated tokens (the backbone's trained context)
    max_new_tokens: int
    max_note_bag: int = 0  # distinct note tokens the head reads (0: a graph without the bag)


@dataclass(frozen=True)
class DecoderSpec:
    n_layers: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    eos_token_id: int
    pad_token_id: int


@dataclass(frozen=True)
class Manifest:
    path: Path
    model_dir: Path
    limits: Limits
    decoder: DecoderSpec
    variants: dict[str, dict[str, str]]  # "fp32"/"int8" -> role ("prefix", "decoder") -> file
    data: dict[str, Any]

    @property
    def onnx_dir(self) -> Path:
        return self.path.parent

    def file(self, variant: str, role: str) -> Path:
        if variant not in self.variants:
            raise ModelUnavailable(self.path, f"no {variant!r} variant (has "
                                   f"{', '.join(sorted(self.variants))}); export with --int8")
        return self.onnx_dir / self.variants[variant][role]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def _check_files(base: Path, entries: dict[str, Any], manifest: Path, hashes: bool,
                 only: set[str] | None = None) -> None:
    for name, entry in entries.items():
        if only is not None and name not in only:
            continue
        f = base / name
        if not f.is_file():
            raise ModelUnavailable(f, f"missing (listed in {manifest})")
        if f.stat().st_size != int(entry["bytes"]):
            raise ModelUnavailable(f, f"{f.stat().st_size} bytes, the manifest says "
                                   f"{entry['bytes']}: corrupt or from another export")
        if hashes and sha256_file(f) != entry["sha256"]:
            raise ModelUnavailable(f, "sha256 differs from the manifest: corrupt or from "
                                   "another export")


def read_manifest(model_dir: Path | str, verify_hashes: bool = True,
                  variant: str | None = None) -> Manifest:
    """The manifest of `<model_dir>/onnx/`, checked against the files and the model beside it."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelUnavailable(model_dir, "model directory does not exist")
    path = model_dir / ONNX_DIR / MANIFEST
    if not path.is_file():
        raise ModelUnavailable(path, "missing: export the model first "
                               "(python -m model.export MODEL_DIR)")
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise ModelUnavailable(path, f"not a {FORMAT} manifest")
        if data.get("format_version") != FORMAT_VERSION:
            raise ModelUnavailable(path, f"format version {data.get('format_version')!r}, this "
                                   f"runtime reads {FORMAT_VERSION}: re-export the model")
        limits = Limits(**data["limits"])
        decoder = DecoderSpec(**data["decoder"])
        variants = {k: dict(v) for k, v in data["variants"].items()}
        files, model_files = dict(data["files"]), dict(data["model_files"])
    except (ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, ModelUnavailable):
            raise
        raise ModelUnavailable(path, f"unreadable manifest ({type(exc).__name__}: {exc})"
                               ) from exc
    # the model files beside the graphs: a retrained config.json means these graphs are stale
    _check_files(model_dir, model_files, path, hashes=True)
    wanted = set(variants[variant].values()) | {"embeddings.npy"} if variant in variants else None
    _check_files(path.parent, files, path, verify_hashes, wanted)
    return Manifest(path, model_dir, limits, decoder, variants, data)
