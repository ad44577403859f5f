"""Greedy decoding with a KV cache, and the constraint that keeps the diagnosis line valid.

Everything here is numpy. `greedy` drives any step function (the ONNX decoder in production, a
stub in tests); `DiagnosisConstraint` lets the model write freely until it writes the
`Diagnosis:` label, then only lets through tokens that continue a list of SNOMED ids from the
model's disorder vocabulary (or "none"), so the line always parses to codes the head knows.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from clinragen_fhir.predict.diagnosis_line import DIAGNOSIS_LABEL

# (inputs_embeds [B,T,D], attention_mask [B,S], position_ids [B,T], past) -> (logits [B,V], past)
StepFn = Callable[[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray] | None],
                  tuple[np.ndarray, list[np.ndarray]]]
EmbedFn = Callable[[np.ndarray], np.ndarray]  # token ids [B] -> embeddings [B, D]

_SEP = re.compile(r"[;,\s]+")
_ALLOWED_CHARS = set("0123456789;, \t") | set("none")


class Constraint(Protocol):
    """What `greedy` drives: a per-batch state machine over the generated tokens."""

    def start(self, batch: int) -> None: ...

    def mask(self, logits: np.ndarray, remaining: int, finished: np.ndarray) -> np.ndarray: ...

    def advance(self, tokens: np.ndarray) -> None: ...


@dataclass
class _Row:
    text: str = ""
    line_at: int = -1  # index in `text` just after the label; -1 until the label is written
    forced: list[int] = field(default_factory=list)  # token ids to emit before anything else


class DiagnosisConstraint:
    """Constrained decoding of the diagnosis line (a per-batch state machine).

    `pieces[i]` is the text token i appends. Once a row's text contains the label, its next
    token must keep the text after the label a prefix of `code (sep code)*` or `none`, with
    codes from `codes`, no repeats and at most `max_codes`; eos is allowed once the line is
    complete. `label_ids`, when given, are forced in when only `reserve` tokens remain and the
    model has not written the label yet, so every output ends with a parsable line.
    """

    def __init__(self, pieces: Sequence[str], codes: Collection[str], eos_id: int,
                 label_ids: Sequence[int] = (), reserve: int = 24, max_codes: int = 6) -> None:
        self.pieces = list(pieces)
        self.codes = frozenset(codes)
        self.prefixes = frozenset(c[:i] for c in self.codes for i in range(1, len(c) + 1))
        self.none_prefixes = frozenset("none"[:i] for i in range(1, 5))
        self.eos_id = eos_id
        self.label_ids = list(label_ids)
        self.reserve = reserve
        self.max_codes = max_codes
        # tokens that can appear in the line at all: a few hundred, checked each step
        self.candidates = np.array([i for i, p in enumerate(self.pieces)
                                    if p and set(p) <= _ALLOWED_CHARS and i != eos_id],
                                   dtype=np.int64)
        self.rows: list[_Row] = []
        # pieces that can continue an item (no leading separator)
        self._continuations = [self.pieces[int(i)] for i in self.candidates
                               if not _SEP.match(self.pieces[int(i)])]
        self._memo: dict[tuple[str, bool], bool] = {}

    def start(self, batch: int) -> None:
        self.rows = [_Row() for _ in range(batch)]

    def _state(self, line: str) -> tuple[bool, bool]:
        """(the line is a valid prefix that can still be completed, the line is complete)."""
        runs = _SEP.findall(line)
        if any(sum(ch in ";," for ch in r) > 1 for r in runs):
            return False, False  # "44054006 ; ;": one separator between codes
        lead = _SEP.match(line)
        if lead is not None and any(ch in ";," for ch in lead.group()):
            return False, False
        items = _SEP.split(line)
        done, last = [x for x in items[:-1] if x], items[-1]
        if len(set(done)) != len(done) or len(done) > self.max_codes:
            return False, False
        if "none" in done:
            ok = done == ["none"] and not last
            return ok, ok
        if any(x not in self.codes for x in done):
            return False, False
        if not last:
            return True, bool(done)
        first = not done
        if last in self.codes:
            ok = last not in done and len(done) < self.max_codes
            return ok, ok
        if first and last == "none":
            return True, True
        if (last in self.prefixes or (first and last in self.none_prefixes)) \
                and self._extendable(last, first):
            return True, False
        return False, False

    def _extendable(self, last: str, first: bool) -> bool:
        """Some sequence of candidate tokens completes this partial item (no dead ends such as
        a token "4405" when no token continues it)."""
        key = (last, first)
        if key not in self._memo:
            self._memo[key] = False  # a cycle cannot complete anything
            ok = last in self.codes or (first and last == "none")
            for piece in self._continuations if not ok else ():
                head = _SEP.split(piece, maxsplit=1)
                grown = last + head[0]
                if len(head) > 1:  # the piece ends the item: it must be whole
                    ok = grown in self.codes or (first and grown == "none")
                elif grown in self.prefixes or (first and grown in self.none_prefixes):
                    ok = self._extendable(grown, first)
                if ok:
                    break
            self._memo[key] = ok
        return self._memo[key]

    def mask(self, logits: np.ndarray, remaining: int, finished: np.ndarray) -> np.ndarray:
        """Logits with disallowed tokens at -inf (rows outside the line are untouched)."""
        out = logits
        for b, row in enumerate(self.rows):
            if finished[b]:
                continue
            if row.line_at < 0 and not row.forced and self.label_ids \
                    and remaining <= self.reserve:
                row.forced = list(self.label_ids)
            if row.forced:
                keep = np.array([row.forced[0]])
            elif row.line_at >= 0:
                line = row.text[row.line_at:]
                complete = self._state(line)[1]
                allowed = [int(t) for t in self.candidates
                           if self._state(line + self.pieces[int(t)])[0]]
                if complete or not allowed:
                    allowed.append(self.eos_id)
                keep = np.array(allowed, dtype=np.int64)
            else:
                continue
            if out is logits:
                out = logits.copy()
            row_logits = np.full_like(out[b], -np.inf)
            row_logits[keep] = out[b, keep]
            out[b] = row_logits
        return out

    def advance(self, tokens: np.ndarray) -> None:
        for b, row in enumerate(self.rows):
            t = int(tokens[b])
            if row.forced and row.forced[0] == t:
                row.forced.pop(0)
            row.text += self.pieces[t] if 0 <= t < len(self.pieces) else ""
            if row.line_at < 0 and not row.forced:
                at = row.text.rfind(DIAGNOSIS_LABEL)
                if at >= 0:
                    row.line_at = at + len(DIAGNOSIS_LABEL)
                    if not self._state(row.text[row.line_at:])[0]:
                        row.line_at = len(row.text)  # e.g. "Diagnosis:**": drop the residue


@dataclass
class Generated:
    ids: np.ndarray  # [B, G] new tokens; pad after a row's eos
    logits: list[np.ndarray]  # per step [B, V] before any constraint (when kept)


def positions(mask: np.ndarray) -> np.ndarray:
    """Position ids that skip masked slots (cumsum of the mask), as training computes them."""
    out: np.ndarray = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)
    return out


def greedy(step: StepFn, embed: EmbedFn, inputs_embeds: np.ndarray, mask: np.ndarray,
           max_new_tokens: int, eos_id: int, pad_id: int,
           constraint: Constraint | None = None, keep_logits: bool = False,
           stop_at_eos: bool = True) -> Generated:
    """Greedy decoding: one prefill over the prefix, then one cached step per token.

    A row that wrote eos keeps receiving `pad_id` with mask 1 until every row is done, as
    transformers' `generate` does, so batched and single-patient outputs agree.
    """
    b = inputs_embeds.shape[0]
    attn = (mask > 0).astype(np.int64)
    logits, past = step(inputs_embeds, attn, positions(attn), None)
    out = np.full((b, max(max_new_tokens, 0)), pad_id, dtype=np.int64)
    finished = np.zeros(b, dtype=bool)
    kept: list[np.ndarray] = []
    if constraint is not None:
        constraint.start(b)
    n = 0
    for i in range(max_new_tokens):
        if keep_logits:
            kept.append(logits)
        scores = logits if constraint is None else constraint.mask(
            logits, max_new_tokens - i, finished)
        nxt = scores.argmax(-1).astype(np.int64)
        nxt[finished] = pad_id
        out[:, i] = nxt
        n = i + 1
        if constraint is not None:
            constraint.advance(nxt)
        if stop_at_eos:
            finished |= nxt == eos_id
        if finished.all() or i == max_new_tokens - 1:
            break
        attn = np.concatenate([attn, np.ones((b, 1), dtype=np.int64)], 1)
        pos = attn.sum(1, keepdims=True) - 1
        logits, past = step(embed(nxt)[:, None, :], attn, pos.astype(np.int64), past)
    return Generated(out[:, :n], kept)


def token_pieces(decode_batch: Callable[[list[list[int]]], list[str]], vocab_size: int,
                 anchor: int) -> list[str]:
    """The text each token appends after ordinary text (decode([anchor, t]) - decode([anchor])):
    right for byte-level BPE (no space added) and word-level tokenizers (a space added)."""
    base = decode_batch([[anchor]])[0]
    texts = decode_batch([[anchor, t] for t in range(vocab_size)])
    return [t[len(base):] if t.startswith(base) else t for t in texts]
