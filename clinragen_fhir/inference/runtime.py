"""The exported model on onnxruntime: prefix graph -> calibrated probabilities, then a KV-cached
greedy decode of the rationale for the concluded diagnoses. numpy in, numpy out."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tokenizers import Tokenizer

from clinragen_fhir.encoding.features import (
    BATCH_KEYS,
    CORE_BATCH_KEYS,
    loinc_vocabulary,
)
from clinragen_fhir.encoding.prompt import MAX_CONDITION_TOKENS, condition_rows
from clinragen_fhir.inference.errors import InputTooLong, ModelUnavailable
from clinragen_fhir.inference.generation import (
    Constraint,
    DiagnosisConstraint,
    Generated,
    greedy,
    token_pieces,
)
from clinragen_fhir.inference.grounding import (
    CodeOf,
    Evidence,
    RationaleConstraint,
    grounded_readings,
    token_budget,
)
from clinragen_fhir.inference.manifest import Manifest, read_manifest
from clinragen_fhir.inference.model_config import ModelConfig
from clinragen_fhir.inference.session import Provider, open_session, provider_in_use
from clinragen_fhir.predict.diagnosis_line import DIAGNOSIS_LABEL

log = logging.getLogger(__name__)
Precision = Literal["fp32", "int8"]
PREFIX_OUTPUTS = ("inputs_embeds", "attention_mask", "knowledge_attention", "diagnosis_logits")


@dataclass
class PrefixOutput:
    inputs_embeds: np.ndarray  # [B, P, D]
    attention_mask: np.ndarray  # [B, P]
    knowledge_attention: np.ndarray  # [B, layers, L+N, 1+K]
    diagnosis_logits: np.ndarray  # [B, n_disorders], before temperature


@dataclass
class Generation:
    texts: list[str]
    ids: np.ndarray
    prefix: PrefixOutput
    probabilities: np.ndarray  # [B, n_disorders], calibrated
    step_logits: list[np.ndarray] = field(default_factory=list)


class OnnxModel:
    """A saved model directory's ONNX export, loaded and checked; thread-compatible for reads
    (one instance per worker process)."""

    def __init__(self, model_dir: Path | str, precision: Precision = "fp32",
                 provider: Provider = "auto", threads: int = 0,
                 verify_hashes: bool = True) -> None:
        self.model_dir = Path(model_dir)
        self.precision = precision
        self.manifest: Manifest = read_manifest(self.model_dir, verify_hashes, precision)
        self.config = ModelConfig.read(self.model_dir / "config.json")
        tok_path = self.model_dir / "tokenizer" / "tokenizer.json"
        try:
            self.tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as exc:  # tokenizers raises a bare Exception on a bad file
            raise ModelUnavailable(tok_path, f"unreadable tokenizer ({exc})") from exc
        self.loinc_vocab = loinc_vocabulary(self.config.loinc_codes)
        self.prefix_path = self.manifest.file(precision, "prefix")
        self.decoder_path = self.manifest.file(precision, "decoder")
        self.prefix_session = open_session(self.prefix_path, provider, threads)
        self.decoder_session = open_session(self.decoder_path, provider, threads)
        emb_path = self.manifest.onnx_dir / "embeddings.npy"
        try:  # memory-mapped: only the rows of generated tokens are ever read
            self.embeddings = np.load(emb_path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise ModelUnavailable(emb_path, f"unreadable embeddings ({exc})") from exc
        spec = self.manifest.decoder
        if self.embeddings.shape != (spec.vocab_size, spec.hidden_size):
            raise ModelUnavailable(emb_path, f"shape {self.embeddings.shape}, the manifest says "
                                   f"{(spec.vocab_size, spec.hidden_size)}")
        self._check_graph_io()
        self.provider = provider_in_use(self.decoder_session)
        self._pieces: list[str] | None = None
        self._constraint: DiagnosisConstraint | None = None
        self._grounding: RationaleConstraint | None = None
        log.info("clinragen onnx model on %s", self.provider, extra={"fields": {
            "provider": self.provider, "precision": precision, "threads": threads or "default",
            "model": self.model_dir.name}})

    def _check_graph_io(self) -> None:
        names = [i.name for i in self.prefix_session.get_inputs()]
        if names[:len(CORE_BATCH_KEYS)] != list(CORE_BATCH_KEYS) or \
                not set(names) <= set(BATCH_KEYS):
            raise ModelUnavailable(self.prefix_path, f"inputs {names} are not the runtime's "
                                   f"{list(BATCH_KEYS)}")
        self._prefix_inputs = names  # a model without the record summary reads no test_*
        n = self.manifest.decoder.n_layers
        want = ["inputs_embeds", "attention_mask", "position_ids"] + [
            f"past_key_values.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
        got = [i.name for i in self.decoder_session.get_inputs()]
        if got != want:
            raise ModelUnavailable(self.decoder_path, f"inputs {got[:4]}... do not match a "
                                   f"{n}-layer decoder with KV cache")
        self._past_names = want[3:]

    # -- limits -------------------------------------------------------------------------------
    def check(self, arrays: dict[str, np.ndarray], new_tokens: int, condition: int = 0) -> None:
        """Refuse inputs the graphs were not exported for, naming the file and the limit
        (`condition`: the most tokens placed after the prefix, `encoding.prompt`)."""
        lim = self.manifest.limits
        sizes = {"lab readings": (arrays["lab_code"].shape[1], lim.max_labs),
                 "knowledge facts": (arrays["fact_ids"].shape[1], lim.max_facts),
                 "tokens per fact": (arrays["fact_ids"].shape[2], lim.max_fact_tokens),
                 "note tokens": (arrays["note_ids"].shape[1], lim.max_note_tokens),
                 "new tokens": (new_tokens, lim.max_new_tokens)}
        if "note_bag_ids" in self._prefix_inputs:
            sizes["distinct note tokens"] = (arrays["note_bag_ids"].shape[1], lim.max_note_bag)
        for what, (size, limit) in sizes.items():
            if size > limit:
                raise InputTooLong(self.manifest.path, what, size, limit)
        positions = self.prefix_length(arrays) + condition + new_tokens
        if positions > lim.max_positions:
            raise InputTooLong(self.decoder_path, "prefix + new tokens", positions,
                               lim.max_positions)
        top = max(int(arrays[k].max(initial=0)) for k in ("note_ids", "note_bag_ids")
                  if k in self._prefix_inputs)
        if top >= self.manifest.decoder.vocab_size:
            raise InputTooLong(self.prefix_path, "note token id", top,
                               self.manifest.decoder.vocab_size - 1)

    def prefix_length(self, arrays: dict[str, np.ndarray]) -> int:
        fixed = int(self.manifest.data.get("prompt_tokens", 0))
        return fixed + sum(int(arrays[k].shape[1]) for k in ("lab_code", "fact_ids", "note_ids"))

    # -- graphs -------------------------------------------------------------------------------
    def run_prefix(self, arrays: dict[str, np.ndarray]) -> PrefixOutput:
        feeds = {k: arrays[k] for k in self._prefix_inputs}
        out = self.prefix_session.run(list(PREFIX_OUTPUTS), feeds)
        return PrefixOutput(*out)

    def step(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray,
             position_ids: np.ndarray, past: list[np.ndarray] | None
             ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One decoder call: the whole prefix (past None) or one new token per row."""
        if past is None:
            spec = self.manifest.decoder
            empty = np.zeros((inputs_embeds.shape[0], spec.n_kv_heads, 0, spec.head_dim),
                             dtype=np.float32)
            past = [empty] * len(self._past_names)
        feeds: dict[str, np.ndarray] = {
            "inputs_embeds": np.ascontiguousarray(inputs_embeds, dtype=np.float32),
            "attention_mask": attention_mask, "position_ids": position_ids}
        feeds.update(zip(self._past_names, past, strict=True))
        logits, *present = self.decoder_session.run(None, feeds)
        return logits, present

    def embed(self, ids: np.ndarray) -> np.ndarray:
        out: np.ndarray = np.asarray(self.embeddings[ids], dtype=np.float32)
        return out

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated: sigmoid(logits / temperature)."""
        out: np.ndarray = 1.0 / (1.0 + np.exp(-logits / self.config.temperature))
        return out

    # -- decoding -----------------------------------------------------------------------------
    def pieces(self) -> list[str]:
        """Per-token appended text, built once (the constraint needs it)."""
        if self._pieces is None:
            spec = self.manifest.decoder
            anchor = self.tokenizer.token_to_id("a")
            anchor = anchor if anchor is not None else next(
                i for i in range(spec.vocab_size) if i not in self._special_ids())
            self._pieces = token_pieces(
                lambda rows: self.tokenizer.decode_batch(rows, skip_special_tokens=False),
                spec.vocab_size, anchor)
        return self._pieces

    def _special_ids(self) -> set[int]:
        return {int(v) for k, v in self.tokenizer.get_vocab(with_added_tokens=True).items()
                if k.startswith("<|")}

    def constraint(self) -> DiagnosisConstraint:
        """Built once (its token scan and memo are reused); `greedy` resets its rows."""
        if self._constraint is None:
            label = self.tokenizer.encode("\n" + DIAGNOSIS_LABEL, add_special_tokens=False).ids
            self._constraint = DiagnosisConstraint(self.pieces(), self.config.disorders,
                                                   self.manifest.decoder.eos_token_id,
                                                   label_ids=label)
        return self._constraint

    def grounding(self) -> RationaleConstraint:
        """Built once; `start_rows` sets each batch's lines."""
        if self._grounding is None:
            self._grounding = RationaleConstraint(self._encode,
                                                  self.manifest.decoder.eos_token_id)
        return self._grounding

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def condition(self, terms: Sequence[Sequence[str]],
                  readings: Sequence[Sequence[str]]) -> list[list[int]]:
        """Per row, the token ids after the prefix (`encoding.prompt.condition_ids`): the
        readings as text and the diagnoses the rationale explains."""
        return condition_rows(self._encode, terms, readings,
                              self.config.budgets.prompt_reading_tokens)

    def generate(self, arrays: dict[str, np.ndarray], max_new_tokens: int | None = None,
                 constrained: bool = False, keep_logits: bool = False, grounded: bool = False,
                 stop_at_eos: bool = True,
                 conclude: Callable[[np.ndarray], Sequence[Sequence[str]]] | None = None,
                 readings: Sequence[Sequence[str]] | None = None,
                 reading_supports: Sequence[Evidence] | None = None,
                 code_of: CodeOf | None = None) -> Generation:
        """Texts, new ids, prefix outputs and calibrated probabilities for a collated batch.

        The head runs first; `conclude(probabilities) -> terms per row` names the diagnoses the
        rationale is written for (none without it), as training put the labels there. With
        `reading_supports` (per reading, the disorders it is evidence for) and `code_of` (term
        -> SNOMED CT code), grounded lines cite only their diagnosis's own evidence
        (`inference.grounding`)."""
        n = self.config.max_new_tokens if max_new_tokens is None else max_new_tokens
        if grounded:  # room for a line per concluded code (at most max_codes of them)
            n = token_budget([[""] * self.config.max_codes], n)
        self.check(arrays, n, MAX_CONDITION_TOKENS + self.config.budgets.prompt_reading_tokens)
        prefix = self.run_prefix(arrays)
        probs = self.probabilities(prefix.diagnosis_logits)
        b = probs.shape[0]
        terms = conclude(probs) if conclude is not None else [[]] * b
        shown: Sequence[Sequence[str]] = readings if readings is not None else [[]] * b
        supports = reading_supports
        if grounded:
            shown, supports = grounded_readings(shown, reading_supports, terms, code_of)
        cond = self.condition(terms, shown)
        width = max(len(c) for c in cond)
        cond_ids = np.full((b, width), self.manifest.decoder.pad_token_id, dtype=np.int64)
        cond_mask = np.zeros((b, width), dtype=prefix.attention_mask.dtype)
        for i, c in enumerate(cond):  # left-padded: every row's condition ends in the last
            cond_ids[i, width - len(c):] = c  # column, from which the first token is predicted
            cond_mask[i, width - len(c):] = 1
        embeds = np.concatenate([prefix.inputs_embeds, self.embed(cond_ids)], 1)
        mask = np.concatenate([prefix.attention_mask, cond_mask], 1)
        spec = self.manifest.decoder
        constraint: Constraint | None = None
        if grounded:
            constraint = self.grounding()
            constraint.start_shown(terms, shown, supports, code_of,
                                   self.config.budgets.prompt_reading_tokens)
        elif constrained:
            constraint = self.constraint()
        gen: Generated = greedy(self.step, self.embed, embeds, mask, n, spec.eos_token_id,
                                spec.pad_token_id, constraint, keep_logits, stop_at_eos)
        texts = [self.tokenizer.decode([int(t) for t in row], skip_special_tokens=True).strip()
                 for row in gen.ids]
        return Generation(texts, gen.ids, prefix, probs, gen.logits)


def describe(model: OnnxModel) -> dict[str, Any]:
    """What is loaded, for logs and the benchmark."""
    return {"model_dir": str(model.model_dir), "precision": model.precision,
            "provider": model.provider, "limits": model.manifest.limits.__dict__}
