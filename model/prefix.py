"""The prefix builder: lab readings, knowledge facts and note tokens -> the SLM's `inputs_embeds`.

Plain tensors in, plain tensors out, no Python objects and no data-dependent branches, so
`torch.onnx.export` can trace it with dynamic batch/length axes. Switching a modality off means
masking it (zero-length input padded to one masked slot), never a different graph.

Layout of the sequence handed to the SLM (the prompt pieces are fixed token ids, buffers here):

    [pre] [lab header] labs(L) [fact header] facts(K) [note header] notes(N) [post]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from clinragen_fhir.encoding.features import CORE_BATCH_KEYS

NEG_INF = -1e9  # additive mask; finite so a fully masked row cannot produce NaN


@dataclass(frozen=True)
class PrefixConfig:
    d_model: int  # the SLM's hidden size: lab and fact tokens live in its embedding space
    n_loinc: int  # LOINC vocabulary size, padding and unknown included
    n_disorders: int  # classification head outputs
    n_heads: int = 8
    n_fusion_layers: int = 1
    n_time_freqs: int = 8
    gate_init: float = 0.1  # tanh(0.1) ~ 0.1: knowledge starts as a small nudge, not noise
    dropout: float = 0.0
    n_test_stats: int = 0  # > 0: the head also reads the record summary (`TestEncoder`)
    n_patient_stats: int = 0
    note_bag: bool = False  # the head also reads the notes' vocabulary (`NoteBagReader`)


class LabEncoder(nn.Module):
    """One token per reading: what (LOINC) + how abnormal (value) + when (time) + where to (trend).

    The code embedding starts as the SLM's own embedding of the lab's name (`init_codes`), so a
    lab token means to the SLM what the words "Hemoglobin A1c" mean. Value and trend enter with
    their masks beside them: an unknown value is 0 with mask 0, which the encoder can tell apart.
    """

    freqs: Tensor

    def __init__(self, cfg: PrefixConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.code = nn.Embedding(cfg.n_loinc, d, padding_idx=0)
        self.value = nn.Linear(2, d)  # [value, value known]
        self.trend = nn.Linear(3, d)  # [trend, trend known, log1p(gap days)]
        self.time = nn.Linear(2 * cfg.n_time_freqs, d)  # Fourier features of log1p(days before)
        # periods from ~1 to ~3000 days on the log1p scale
        freqs = math.pi / torch.logspace(-0.5, 1.0, cfg.n_time_freqs)
        self.register_buffer("freqs", freqs, persistent=False)
        for lin in (self.value, self.trend, self.time):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)

    @torch.no_grad()
    def init_codes(self, vectors: Tensor) -> None:
        """Row i <- the SLM embedding (mean over the name's tokens) of LOINC id i."""
        self.code.weight.copy_(vectors)

    def forward(self, code: Tensor, value: Tensor, value_mask: Tensor, time: Tensor, trend: Tensor,
                trend_mask: Tensor, gap: Tensor, mask: Tensor) -> Tensor:
        t = torch.log1p(time).unsqueeze(-1) * self.freqs
        x: Tensor = (self.code(code)
             + self.value(torch.stack([value * value_mask, value_mask], -1))
             + self.trend(torch.stack([trend * trend_mask, trend_mask,
                                       torch.log1p(gap) * trend_mask], -1))
             + self.time(torch.cat([torch.sin(t), torch.cos(t)], -1)))
        return x * mask.unsqueeze(-1)


class TestEncoder(nn.Module):
    """One token per test over the whole lookback: the test's code embedding plus an MLP of its
    summary (newest, lowest, highest, mean...) read *together with* the code, so the same
    number can mean high for one test and normal for another (a sum of a code and a shared value
    projection cannot say that). The last layer starts near zero: a test token starts as its
    name."""

    def __init__(self, d_model: int, n_stats: int, hidden: int = 256, code_dim: int = 32) -> None:
        super().__init__()
        self.code = nn.Linear(d_model, code_dim)
        self.mlp = nn.Sequential(nn.Linear(n_stats + code_dim, hidden), nn.GELU(),
                                 nn.Linear(hidden, d_model))
        last = cast(nn.Linear, self.mlp[2])
        nn.init.normal_(last.weight, std=0.02)
        nn.init.zeros_(last.bias)

    def forward(self, code_embeds: Tensor, stats: Tensor, mask: Tensor) -> Tensor:
        x: Tensor = code_embeds + self.mlp(torch.cat([stats, self.code(code_embeds)], -1))
        return x * mask.unsqueeze(-1)


class FactEncoder(nn.Module):
    """A fact's text embedded with the SLM's token embeddings, mean-pooled, then projected.

    The projection starts as the identity, so a fact token starts as the average of its words.
    """

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_model, d_model)
        nn.init.eye_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, token_embeds: Tensor, token_mask: Tensor) -> Tensor:
        m = token_mask.unsqueeze(-1)
        pooled = (token_embeds * m).sum(-2) / m.sum(-2).clamp(min=1.0)
        out: Tensor = self.proj(pooled)
        return out


class GatedCrossAttention(nn.Module):
    """Lab/note tokens attend to the knowledge facts; tanh gates scale what is added (Flamingo).

    A learned "no knowledge" slot is always attendable, so with knowledge off (or no facts found)
    the softmax is defined and the gate decides how much of nothing to add. Returns the attention
    weights (mean over heads) so `explain` can show which facts each token used.
    """

    def __init__(self, cfg: PrefixConfig) -> None:
        super().__init__()
        d, self.n_heads = cfg.d_model, cfg.n_heads
        assert d % cfg.n_heads == 0, "d_model must divide into heads"
        self.norm_q, self.norm_kv, self.norm_ff = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.null = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.attn_gate = nn.Parameter(torch.tensor(cfg.gate_init))
        self.ff_gate = nn.Parameter(torch.tensor(cfg.gate_init))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, kv: Tensor, kv_mask: Tensor) -> tuple[Tensor, Tensor]:
        b, s, d = x.shape
        h, hd = self.n_heads, d // self.n_heads
        kv = torch.cat([self.null.expand(b, 1, d), self.norm_kv(kv)], 1)  # [B, 1+K, D]
        kv_mask = torch.cat([torch.ones_like(kv_mask[:, :1]), kv_mask], 1)
        q = self.q(self.norm_q(x)).view(b, s, h, hd).transpose(1, 2)  # [B, H, S, hd]
        k = self.k(kv).view(b, -1, h, hd).transpose(1, 2)
        v = self.v(kv).view(b, -1, h, hd).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)  # [B, H, S, 1+K]
        scores = scores + (1.0 - kv_mask)[:, None, None, :] * NEG_INF
        weights = torch.softmax(scores, -1)
        out = (self.drop(weights) @ v).transpose(1, 2).reshape(b, s, d)
        x = x + torch.tanh(self.attn_gate) * self.o(out)
        x = x + torch.tanh(self.ff_gate) * self.drop(self.ff(self.norm_ff(x)))
        return x, weights.mean(1)

    def gates(self) -> tuple[float, float]:
        return float(torch.tanh(self.attn_gate.detach())), float(torch.tanh(self.ff_gate.detach()))


class DiagnosisHead(nn.Module):
    """Multi-label logits from label-wise attention over the fused tokens (as in CAML): every
    disorder has its own query, so diabetes can look at the HbA1c token while anaemia looks at
    haemoglobin, instead of all disorders sharing one pooled summary.

    It lives in the prefix builder (not on the SLM's hidden states) so the ONNX prefix graph gives
    the calibrated probabilities without running the decoder.
    """

    def __init__(self, d_model: int, n_disorders: int, d_attn: int = 64) -> None:
        super().__init__()
        self.d_attn = d_attn
        self.norm = nn.LayerNorm(d_model)
        self.key = nn.Linear(d_model, d_attn)
        self.value = nn.Linear(d_model, d_attn)
        self.queries = nn.Parameter(torch.randn(n_disorders, d_attn) * 0.02)
        self.null = nn.Parameter(torch.zeros(1, 1, d_model))  # attended when all is masked
        self.weight = nn.Parameter(torch.randn(n_disorders, d_attn) * 0.02)
        self.bias = nn.Parameter(torch.zeros(n_disorders))

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        b, _, d = tokens.shape
        tokens = self.norm(torch.cat([self.null.expand(b, 1, d), tokens], 1))
        mask = torch.cat([torch.ones_like(mask[:, :1]), mask], 1)
        keys, values = self.key(tokens), self.value(tokens)  # [B, 1+T, A]
        scores = torch.einsum("bta,ja->bjt", keys, self.queries) / math.sqrt(self.d_attn)
        scores = scores + (1.0 - mask)[:, None, :] * NEG_INF
        pooled = torch.einsum("bjt,bta->bja", torch.softmax(scores, -1), values)
        logits: Tensor = (pooled * self.weight).sum(-1) + self.bias
        return logits


class NoteBagReader(nn.Module):
    """Diagnosis logits from the notes' vocabulary (every distinct token of the visit's notes,
    `features.featurise_note_bag`), by label-wise attention as in CAML: each disorder's query
    finds the words that speak for it (a drug, a finding) wherever in the record they were
    written. Tokens are the SLM's own (frozen) embeddings plus how often they occur.

    Its output weights start at zero, so a model gains it without its logits moving; a zero
    "no word" slot keeps the softmax defined for a visit without notes.
    """

    def __init__(self, d_model: int, n_disorders: int, d_attn: int = 64) -> None:
        super().__init__()
        self.d_attn = d_attn
        self.norm = nn.LayerNorm(d_model)
        self.proj = nn.Linear(d_model + 1, d_attn)
        self.queries = nn.Parameter(torch.randn(n_disorders, d_attn) * 0.02)
        self.weight = nn.Parameter(torch.zeros(n_disorders, d_attn))

    def forward(self, embeds: Tensor, weight: Tensor, mask: Tensor) -> Tensor:
        h = torch.tanh(self.proj(torch.cat([self.norm(embeds), weight.unsqueeze(-1)], -1)))
        h = torch.cat([torch.zeros_like(h[:, :1]), h * mask.unsqueeze(-1)], 1)  # [B, 1+U, A]
        mask = torch.cat([torch.ones_like(mask[:, :1]), mask], 1)
        scores = torch.einsum("bua,ja->bju", h, self.queries) / math.sqrt(self.d_attn)
        scores = scores + (1.0 - mask)[:, None, :] * NEG_INF
        pooled = torch.einsum("bju,bua->bja", torch.softmax(scores, -1), h)
        logits: Tensor = (pooled * self.weight).sum(-1)
        return logits


class PrefixBuilder(nn.Module):
    """The multimodal, knowledge-augmented prefix plus the diagnosis logits.

    `token_embedding` is the SLM's input embedding, shared (and frozen): note tokens and fact words
    are embedded exactly as the SLM embeds text. `prompt` holds the fixed prompt pieces as ids.
    Returns (inputs_embeds [B,P,D], attention_mask [B,P], knowledge_attention
    [B, layers, L+N, 1+K] (slot 0 = "no knowledge"), diagnosis_logits [B, n_disorders]).
    """

    PIECES = ("pre", "lab_header", "fact_header", "note_header", "post")

    def __init__(self, cfg: PrefixConfig, token_embedding: nn.Module,
                 prompt: dict[str, list[int]]) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_embedding = token_embedding
        for name in self.PIECES:
            self.register_buffer(f"{name}_ids", torch.tensor(prompt[name], dtype=torch.long))
        self.labs = LabEncoder(cfg)
        self.facts = FactEncoder(cfg.d_model)
        self.fusion = nn.ModuleList(GatedCrossAttention(cfg) for _ in range(cfg.n_fusion_layers))
        self.head = DiagnosisHead(cfg.d_model, cfg.n_disorders)
        # the record summary: the head's alone (the decoder's prefix does not change with it)
        self.tests = TestEncoder(cfg.d_model, cfg.n_test_stats) if cfg.n_test_stats else None
        self.patient = nn.Linear(cfg.n_patient_stats, cfg.d_model) \
            if cfg.n_test_stats and cfg.n_patient_stats else None
        # the notes' vocabulary: the head's alone too, after the record summary in the inputs
        assert not cfg.note_bag or self.patient is not None, "the note bag needs the summary"
        self.note_bag = NoteBagReader(cfg.d_model, cfg.n_disorders) if cfg.note_bag else None

    def input_names(self) -> list[str]:
        """The `BATCH_KEYS` this builder reads, in order (the ONNX graph's inputs)."""
        names = list(CORE_BATCH_KEYS)
        if self.tests is not None:
            names += ["test_code", "test_stats", "test_mask"]
        if self.patient is not None:
            names.append("patient_stats")
        if self.note_bag is not None:
            names += ["note_bag_ids", "note_bag_weight", "note_bag_mask"]
        return names

    def piece_lengths(self) -> dict[str, int]:
        return {name: int(getattr(self, f"{name}_ids").numel()) for name in self.PIECES}

    def _piece(self, name: str, batch: int) -> Tensor:
        ids: Tensor = getattr(self, f"{name}_ids")
        return self.embed(ids).unsqueeze(0).expand(batch, -1, -1)

    def embed(self, ids: Tensor) -> Tensor:
        """Token ids -> the SLM's own input embeddings."""
        out: Tensor = self.token_embedding(ids)
        return out

    def forward(self, lab_code: Tensor, lab_value: Tensor, lab_value_mask: Tensor,
                lab_time: Tensor, lab_trend: Tensor, lab_trend_mask: Tensor, lab_gap: Tensor,
                lab_mask: Tensor, note_ids: Tensor, note_mask: Tensor, fact_ids: Tensor,
                fact_token_mask: Tensor, fact_mask: Tensor, test_code: Tensor | None = None,
                test_stats: Tensor | None = None, test_mask: Tensor | None = None,
                patient_stats: Tensor | None = None, note_bag_ids: Tensor | None = None,
                note_bag_weight: Tensor | None = None, note_bag_mask: Tensor | None = None
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The record summary (`test_*`, `patient_stats`) and the notes' vocabulary
        (`note_bag_*`) are read only when the model has them: a model without them exports a
        graph without those inputs."""
        b = lab_code.shape[0]
        labs, notes, facts, attention = self.fuse(
            lab_code, lab_value, lab_value_mask, lab_time, lab_trend, lab_trend_mask, lab_gap,
            lab_mask, note_ids, note_mask, fact_ids, fact_token_mask, fact_mask)
        logits = self.diagnose(torch.cat([labs, facts, notes], 1),
                               torch.cat([lab_mask, fact_mask, note_mask], 1),
                               test_code, test_stats, test_mask, patient_stats,
                               note_bag_ids, note_bag_weight, note_bag_mask)
        ones = {n: torch.ones(b, int(getattr(self, f"{n}_ids").numel()), dtype=lab_mask.dtype,
                              device=lab_mask.device) for n in self.PIECES}
        embeds = torch.cat([self._piece("pre", b), self._piece("lab_header", b), labs,
                            self._piece("fact_header", b), facts,
                            self._piece("note_header", b), notes, self._piece("post", b)], 1)
        mask = torch.cat([ones["pre"], ones["lab_header"], lab_mask, ones["fact_header"],
                          fact_mask, ones["note_header"], note_mask, ones["post"]], 1)
        return embeds, mask, attention, logits

    def fuse(self, lab_code: Tensor, lab_value: Tensor, lab_value_mask: Tensor,
             lab_time: Tensor, lab_trend: Tensor, lab_trend_mask: Tensor, lab_gap: Tensor,
             lab_mask: Tensor, note_ids: Tensor, note_mask: Tensor, fact_ids: Tensor,
             fact_token_mask: Tensor, fact_mask: Tensor
             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(labs, notes, facts, knowledge attention): the lab and note tokens after attending
        to the knowledge, which the decoder's prefix and the head share."""
        n_labs = lab_code.shape[1]
        labs = self.labs(lab_code, lab_value, lab_value_mask, lab_time, lab_trend,
                         lab_trend_mask, lab_gap, lab_mask)
        notes = self.embed(note_ids) * note_mask.unsqueeze(-1)
        facts = self.facts(self.embed(fact_ids), fact_token_mask)
        facts = facts * fact_mask.unsqueeze(-1)
        x = torch.cat([labs, notes], 1)  # queries: every lab and note token
        x_mask = torch.cat([lab_mask, note_mask], 1)
        attention = []
        for layer in self.fusion:
            x, w = layer(x, facts, fact_mask)
            x = x * x_mask.unsqueeze(-1)
            attention.append(w)
        return x[:, :n_labs], x[:, n_labs:], facts, torch.stack(attention, 1)

    def diagnose(self, tokens: Tensor, mask: Tensor, test_code: Tensor | None = None,
                 test_stats: Tensor | None = None, test_mask: Tensor | None = None,
                 patient_stats: Tensor | None = None, note_bag_ids: Tensor | None = None,
                 note_bag_weight: Tensor | None = None, note_bag_mask: Tensor | None = None
                 ) -> Tensor:
        """Diagnosis logits from the fused tokens plus, when the model has them, the record
        summary and the notes' vocabulary. Training's head phase calls this alone on cached
        fused tokens: both go straight to the head (not through the fusion), so nothing before
        it changes."""
        tokens_, masks = [tokens], [mask]
        if self.tests is not None:
            assert test_code is not None and test_stats is not None and test_mask is not None
            # the test's name as the lab tokens read it; the head does not retrain it
            code = self.labs.code(test_code).detach()
            tokens_.append(self.tests(code, test_stats, test_mask))
            masks.append(test_mask)
        if self.patient is not None:
            assert patient_stats is not None
            tokens_.append(self.patient(patient_stats).unsqueeze(1))
            masks.append(torch.ones_like(mask[:, :1]))
        logits: Tensor = self.head(torch.cat(tokens_, 1), torch.cat(masks, 1))
        if self.note_bag is not None:
            assert note_bag_ids is not None and note_bag_weight is not None \
                and note_bag_mask is not None
            logits = logits + self.note_bag(self.embed(note_bag_ids).detach(), note_bag_weight,
                                            note_bag_mask)
        return logits

    def gates(self) -> list[tuple[float, float]]:
        """tanh(attention gate), tanh(feed-forward gate) of each fusion layer."""
        return [cast(GatedCrossAttention, layer).gates() for layer in self.fusion]

    def slots(self, n_labs: int, n_facts: int, n_notes: int) -> dict[str, slice]:
        """Where labs, facts and notes sit in the prefix (for explain and for ONNX callers)."""
        p = self.piece_lengths()
        start_labs = p["pre"] + p["lab_header"]
        start_facts = start_labs + n_labs + p["fact_header"]
        start_notes = start_facts + n_facts + p["note_header"]
        return {"labs": slice(start_labs, start_labs + n_labs),
                "facts": slice(start_facts, start_facts + n_facts),
                "notes": slice(start_notes, start_notes + n_notes)}
