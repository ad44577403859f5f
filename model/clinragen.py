"""ClinRaGen: a small LM that reads labs, notes and retrieved knowledge and writes a rationale.

    FHIR -> lab frame + notes -> retrieve (knowledge) -> features (numpy) -> PrefixBuilder
         -> inputs_embeds -> SLM (LoRA) -> "rationale ... Diagnosis: <SNOMED codes>"
                          -> diagnosis head -> calibrated probabilities -> abstain or not

The SLM is frozen except for LoRA adapters; the lab encoder, fact encoder, gated knowledge
attention and diagnosis head (all in `PrefixBuilder`) are trained fully. `save`/`load` put
everything needed to run in one directory.

Over 400 lines because it is one class, the model, in its `# --` sections (construction, inputs,
forward, explanations, the Predictor interface, persistence); what it shares with the runtime is
imported (`encoding.features`, `inference.grounding`, `inference.model_config`,
`predict.conclude`), the prefix modules are `model.prefix`, the export `model.export`.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from clinragen_fhir.encoding.features import (
    PATIENT_STATS,
    TEST_STATS,
    UNK_ID,
    Budgets,
    Features,
    Modalities,
    collate,
    featurise,
    loinc_vocabulary,
)
from clinragen_fhir.encoding.prompt import PROMPT_POST, condition_rows
from clinragen_fhir.encoding.schema import Note, PatientContext
from clinragen_fhir.inference.generation import greedy
from clinragen_fhir.inference.grounding import (
    CodeOf,
    RationaleConstraint,
    evidence,
    grounded_readings,
    token_budget,
)
from clinragen_fhir.inference.model_config import ModelConfig
from clinragen_fhir.knowledge import KnowledgeGraph, retrieve
from clinragen_fhir.predict.conclude import concluded_prediction
from clinragen_fhir.predict.types import (
    Diagnosis,
    Evidence,
    Prediction,
    abstain_without_inputs,
    has_inputs,
)
from model.prefix import PrefixBuilder, PrefixConfig

log = logging.getLogger(__name__)
METHOD = "clinragen-torch"


@dataclass(frozen=True)
class Prompt:
    """The fixed text around the prefix (ChatML, as SmolLM2-Instruct was tuned on)."""

    pre: str = ("<|im_start|>system\nYou are a careful clinician. Reason from the lab results, the "
                "medical knowledge and the clinical notes.<|im_end|>\n<|im_start|>user\n")
    lab_header: str = "Lab results:"
    fact_header: str = "\nMedical knowledge:"
    note_header: str = "\nClinical notes:"
    post: str = PROMPT_POST  # then `condition_text` (the concluded diagnoses)


@dataclass(frozen=True)
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class ClinRaGenConfig(ModelConfig):
    """Everything but weights: what the runtime reads too (`inference.model_config.ModelConfig`:
    vocabularies, budgets, calibration, the conclusion rule, knowledge version) and what only the
    torch model needs (backbone, prompt, LoRA, fusion sizes)."""

    backbone: str = ""
    prompt: Prompt = field(default_factory=Prompt)
    lora: LoraSettings = field(default_factory=LoraSettings)
    n_fusion_layers: int = 1
    n_heads: int = 0  # 0: the SLM's number of attention heads
    gate_init: float = 0.1
    dropout: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> ClinRaGenConfig:
        d = json.loads(text)
        d["budgets"] = Budgets(**d["budgets"])
        d["prompt"] = Prompt(**d["prompt"])
        d["lora"] = LoraSettings(**{**d["lora"], "targets": tuple(d["lora"]["targets"])})
        return cls(**d)


@dataclass
class Batch:
    features: list[Features]  # the references explain() maps attention back to
    tensors: dict[str, Tensor]


@dataclass
class Output:
    loss: Tensor | None
    lm_loss: Tensor | None
    diagnosis_loss: Tensor | None
    logits: Tensor  # LM logits, [B, T, vocab] with targets, else [B, 1, vocab] (the next token)
    diagnosis_logits: Tensor  # [B, n_disorders], before temperature
    knowledge_attention: Tensor  # [B, layers, L+N, 1+K]


@dataclass(frozen=True)
class Explanation:
    """What the output attended to most; scores sum to 1 within facts and within labs."""

    facts: list[tuple[str, str, float]]  # (fact id, fact text, score)
    labs: list[tuple[str, str, str, float]]  # (Observation/<id>, LOINC, time, score)
    gates: list[tuple[float, float]]  # per fusion layer: tanh(attention gate), tanh(ff gate)


class ClinRaGen(nn.Module):
    """The whole model; also a `clinragen_fhir.predict.types.Predictor` (`name`, `predict`)."""

    name = METHOD
    slm: Any  # a PreTrainedModel, or a PeftModel around one

    def __init__(self, slm: PreTrainedModel | PeftModel, tokenizer: Any, config: ClinRaGenConfig,
                 kg: KnowledgeGraph | None = None) -> None:
        super().__init__()
        self.slm = slm
        self.tokenizer = tokenizer
        self.config = config
        self.kg = kg
        self.loinc_vocab = loinc_vocabulary(config.loinc_codes)
        self._freeze_backbone()
        lm_cfg = self.base_lm().config
        prompt = {name: self._ids(getattr(config.prompt, name)) for name in PrefixBuilder.PIECES}
        self.prefix = PrefixBuilder(PrefixConfig(
            d_model=lm_cfg.hidden_size, n_loinc=len(self.loinc_vocab) + 2,
            n_disorders=len(config.disorders), n_heads=config.n_heads
            or lm_cfg.num_attention_heads, n_fusion_layers=config.n_fusion_layers,
            gate_init=config.gate_init, dropout=config.dropout,
            n_test_stats=TEST_STATS if config.budgets.max_tests > 0 else 0,
            n_patient_stats=PATIENT_STATS, note_bag=config.budgets.max_note_bag > 0),
            slm.get_input_embeddings(), prompt)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def build(cls, slm: PreTrainedModel, tokenizer: Any, kg: KnowledgeGraph, lora: bool = True,
              disorders: Collection[str] | None = None, **overrides: Any) -> ClinRaGen:
        """A fresh model over the graph's labs and disorders (or the given subset of them, the
        head's outputs); lab codes start as their names."""
        labs = kg.labs()
        concepts = sorted((d for d in kg.disorders().values()
                           if disorders is None or d.snomed in disorders),
                          key=lambda d: d.snomed)
        config = ClinRaGenConfig(
            loinc_codes=sorted(labs), disorders=[d.snomed for d in concepts],
            disorder_terms=[d.term for d in concepts], knowledge_version=kg.version,
            backbone=str(getattr(slm.config, "_name_or_path", "")), **overrides)
        model = cls(slm, tokenizer, config, kg)
        model.init_lab_codes({code: lab.name for code, lab in labs.items()})
        if lora:
            model.add_lora()
        return model

    @torch.no_grad()
    def init_lab_codes(self, names: dict[str, str]) -> None:
        """LOINC embedding i <- mean SLM embedding of the lab's name ("unknown" for id 1)."""
        vectors = torch.zeros_like(self.prefix.labs.code.weight)

        def embed(text: str) -> Tensor:
            ids = self._ids(text) or self._ids("test")
            return self.prefix.embed(torch.tensor(ids, device=vectors.device)).mean(0)

        vectors[UNK_ID] = embed("laboratory test")
        for code, i in self.loinc_vocab.items():
            vectors[i] = embed(names.get(code, code))
        self.prefix.labs.init_codes(vectors)

    def add_lora(self) -> None:
        """Wrap the SLM in LoRA adapters; only they (and the prefix builder) are trained."""
        s = self.config.lora
        self.slm = get_peft_model(self.slm, LoraConfig(
            r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout,
            target_modules=list(s.targets), task_type="CAUSAL_LM"))
        self._freeze_backbone()

    def _freeze_backbone(self) -> None:
        for name, p in self.slm.named_parameters():
            p.requires_grad = "lora_" in name

    def base_lm(self) -> PreTrainedModel:
        lm = self.slm.get_base_model() if isinstance(self.slm, PeftModel) else self.slm
        return cast(PreTrainedModel, lm)

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def parameter_counts(self) -> tuple[int, int]:
        """(total, trainable), each shared tensor counted once."""
        params = {id(p): p for p in self.parameters()}.values()
        return (sum(p.numel() for p in params),
                sum(p.numel() for p in params if p.requires_grad))

    # -- inputs -------------------------------------------------------------------------------
    def featurise(self, labs: pd.DataFrame, notes: Sequence[Note], patient: PatientContext,
                  modalities: Modalities | None = None,
                  redact: Callable[[Note], str] | None = None, cite: bool = False) -> Features:
        """One patient's features; runs the knowledge retrieval when knowledge is on. With
        `cite`, the shown readings are the runtime's (`inference.grounding.evidence`: each
        marked with what it is evidence for, earlier evidence added) for a grounded rationale;
        without, the newest of each test, as the training prompts had them."""
        modalities = modalities or Modalities()
        retrieval = None
        if modalities.knowledge:
            if self.kg is None:
                raise ValueError("knowledge is on but the model has no knowledge graph")
            retrieval = retrieve(self.kg, labs, notes, patient)
        names = {c: lab.name for c, lab in self.kg.labs().items()} if self.kg else None
        supports = evidence(self.kg, patient.sex) if cite and self.kg is not None else None
        return featurise(labs, notes, patient, retrieval, self.tokenizer.backend_tokenizer,
                         self.loinc_vocab, self.config.budgets, modalities, redact, names,
                         supports)

    def batch(self, features: Sequence[Features]) -> Batch:
        device = self.prefix.labs.code.weight.device
        tensors = {k: torch.from_numpy(v).to(device) for k, v in collate(features).items()}
        return Batch(list(features), tensors)

    # -- forward ------------------------------------------------------------------------------
    def _rows(self, rows: Sequence[Sequence[int]], device: torch.device,
              left: bool = False) -> tuple[Tensor, Tensor]:
        """Padded ids and their mask: right-padded, or left-padded (the condition: every row's
        then ends in the last column, from which the first generated token is predicted)."""
        n = max(1, *(len(r) for r in rows))
        ids = torch.full((len(rows), n), int(self.tokenizer.pad_token_id or 0), device=device)
        mask = torch.zeros(len(rows), n, device=device)
        for i, r in enumerate(rows):
            if r:
                span = slice(n - len(r), n) if left else slice(0, len(r))
                ids[i, span] = torch.tensor(list(r), device=device)
                mask[i, span] = 1.0
        return ids, mask

    def condition(self, terms: Sequence[Sequence[str]],
                  readings: Sequence[Sequence[str]]) -> list[list[int]]:
        """Per row, the token ids after the prefix (`encoding.prompt.condition_ids`): the
        readings as text and the diagnoses the rationale explains."""
        return condition_rows(self._ids, terms, readings,
                              self.config.budgets.prompt_reading_tokens)

    def with_condition(self, embeds: Tensor, mask: Tensor, terms: Sequence[Sequence[str]] | None,
                       readings: Sequence[Sequence[str]] | None = None) -> tuple[Tensor, Tensor]:
        n = len(embeds)
        cond = self.condition(terms if terms is not None else [[]] * n,
                              readings if readings is not None else [[]] * n)
        ids, cmask = self._rows(cond, embeds.device, left=True)
        return torch.cat([embeds, self.prefix.embed(ids)], 1), torch.cat([mask, cmask], 1)

    def forward(self, batch: Batch, targets: Sequence[str] | None = None,
                disorder_targets: Tensor | None = None,
                terms: Sequence[Sequence[str]] | None = None) -> Output:
        """Teacher-forced LM loss on `targets` (the rationale of the diagnoses in `terms`, which
        follow the prefix as text) and/or the head's multi-label loss on `disorder_targets`."""
        embeds, mask, attention, diag_logits = self.prefix(**batch.tensors)
        ids: Tensor | None = None
        tmask: Tensor | None = None
        keep = 1  # without targets only the next-token logits are useful ([B, 1, V])
        if targets is not None:
            embeds, mask = self.with_condition(embeds, mask, terms,
                                               [f.readings for f in batch.features])
            eos = self.tokenizer.eos_token or ""
            ids, tmask = self._rows([self._ids(t + eos) for t in targets], embeds.device)
            embeds = torch.cat([embeds, self.prefix.embed(ids)], 1)
            mask = torch.cat([mask, tmask], 1)
            keep = ids.shape[1] + 1  # logits only where a target token is predicted: the LM
            # head over 49k tokens at every prefix position cost more than the decoder layers
        out = self.slm(inputs_embeds=embeds, attention_mask=mask.long(),
                       position_ids=positions(mask), logits_to_keep=keep)
        lm_loss = None
        if ids is not None and tmask is not None:
            logits = out.logits[:, :-1].float()  # column k predicts target token k
            per = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                              ids.reshape(-1), reduction="none")
            lm_loss = (per * tmask.reshape(-1)).sum() / tmask.sum().clamp(min=1.0)
        diag_loss = None
        if disorder_targets is not None:
            diag_loss = nn.functional.binary_cross_entropy_with_logits(
                diag_logits, disorder_targets.to(diag_logits.dtype))
        losses = [x for x in (lm_loss, diag_loss) if x is not None]
        return Output(sum(losses) if losses else None, lm_loss, diag_loss,  # type: ignore[arg-type]
                      out.logits, diag_logits, attention)

    @torch.no_grad()
    def generate(self, batch: Batch, max_new_tokens: int | None = None,
                 terms: Sequence[Sequence[str]] | None = None) -> tuple[list[str], Tensor]:
        """Greedy rationale per patient for the diagnoses in `terms` (the head's conclusions):
        (texts, new token ids [B, G])."""
        embeds, mask, _, _ = self.prefix(**batch.tensors)
        embeds, mask = self.with_condition(embeds, mask, terms,
                                           [f.readings for f in batch.features])
        ids = self.slm.generate(
            inputs_embeds=embeds, attention_mask=mask.long(), do_sample=False,
            max_new_tokens=max_new_tokens or self.config.max_new_tokens,
            eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id)
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return [t.strip() for t in texts], ids

    @torch.no_grad()
    def generate_grounded(self, batch: Batch, terms: Sequence[Sequence[str]],
                          max_new_tokens: int | None = None,
                          code_of: CodeOf | None = None) -> list[str]:
        """What the runtime writes (`inference.grounding`): one line per concluded diagnosis,
        each reading copied from the prompt's readings (with `code_of`, term -> SNOMED CT code,
        only its own diagnosis's evidence, `Features.reading_supports`), decoded by the
        runtime's own `greedy` with this model's decoder as the step function."""
        embeds, mask, _, _ = self.prefix(**batch.tensors)
        readings, supports = grounded_readings(
            [f.readings for f in batch.features], [f.reading_supports for f in batch.features],
            terms, code_of)  # the runtime's order (OnnxModel.generate)
        embeds, mask = self.with_condition(embeds, mask, terms, readings)
        eos = int(self.tokenizer.eos_token_id)
        pad = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos)
        constraint = RationaleConstraint(self._ids, eos)
        constraint.start_shown(terms, readings, supports, code_of,
                               self.config.budgets.prompt_reading_tokens)

        def step(e: np.ndarray, m: np.ndarray, p: np.ndarray, past: Any) -> tuple[np.ndarray, Any]:
            out = self.slm(inputs_embeds=torch.from_numpy(e), attention_mask=torch.from_numpy(m),
                           position_ids=torch.from_numpy(p), past_key_values=past,
                           use_cache=True, logits_to_keep=1)
            return out.logits[:, -1].float().numpy(), out.past_key_values

        def embed(ids: np.ndarray) -> np.ndarray:
            return self.prefix.embed(torch.from_numpy(ids)).numpy()

        n = token_budget(terms, max_new_tokens or self.config.max_new_tokens)
        gen = greedy(step, embed, embeds.numpy(), mask.numpy(), n, eos, pad, constraint)
        texts = self.tokenizer.batch_decode(gen.ids, skip_special_tokens=True)
        return [str(t).strip() for t in texts]

    @torch.no_grad()
    def probabilities(self, batch: Batch) -> Tensor:
        """Calibrated disorder probabilities: sigmoid(logits / temperature)."""
        logits = self.prefix(**batch.tensors)[3]
        return torch.sigmoid(logits / self.config.temperature)

    def fit_temperature(self, logits: Tensor, targets: Tensor) -> float:
        """Temperature scaling on held-out logits (one scalar, so the ranking never changes)."""
        log_t = torch.zeros((), requires_grad=True)
        opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=100)
        logits, targets = logits.detach().float(), targets.float()

        def closure() -> Tensor:
            opt.zero_grad()
            loss = nn.functional.binary_cross_entropy_with_logits(logits / log_t.exp(), targets)
            loss.backward()  # type: ignore[no-untyped-call]
            return loss

        opt.step(closure)  # type: ignore[no-untyped-call]
        self.config.temperature = float(log_t.detach().exp())
        return self.config.temperature

    # -- explanations -------------------------------------------------------------------------
    @contextmanager
    def _eager_attention(self) -> Iterator[None]:
        """sdpa returns no attention weights; switch to eager for the explaining pass only."""
        lm = self.base_lm()
        before = lm.config._attn_implementation
        lm.set_attn_implementation("eager")
        try:
            yield
        finally:
            lm.set_attn_implementation(before)

    @torch.no_grad()
    def explain(self, batch: Batch, generated: Tensor | None = None,
                top_k: int = 5) -> list[Explanation]:
        """Which facts and lab readings the output attended to most.

        Score of a prefix slot = SLM attention to it from the generated tokens (or, with nothing
        generated, from the last prompt token), averaged over layers and heads. A fact also gets
        the attention paid to lab/note tokens, routed through the knowledge cross-attention and
        scaled by its gate: that is how knowledge reached the SLM without being looked at.
        """
        embeds, mask, katt, _ = self.prefix(**batch.tensors)
        p = embeds.shape[1]
        if generated is not None and generated.shape[1] > 0:
            gen_mask = _until_eos(generated, int(self.tokenizer.eos_token_id))
            embeds = torch.cat([embeds, self.prefix.embed(generated)], 1)
            mask = torch.cat([mask, gen_mask], 1)
            queries = torch.cat([torch.zeros_like(mask[:, :p]), gen_mask], 1)
        else:
            queries = torch.zeros_like(mask)
            queries[:, p - 1] = 1.0
        with self._eager_attention():
            out = self.slm(inputs_embeds=embeds, attention_mask=mask.long(),
                           position_ids=positions(mask), output_attentions=True,
                           logits_to_keep=1)
        att = sum(layer.mean(1) for layer in out.attentions) / len(out.attentions)  # [B, T, T]
        a = (queries.unsqueeze(-1) * att).sum(1) / queries.sum(1, keepdim=True)  # [B, T]
        t = batch.tensors
        n_labs, n_facts, n_notes = (t[k].shape[1] for k in ("lab_code", "fact_ids", "note_ids"))
        slots = self.prefix.slots(n_labs, n_facts, n_notes)
        gates = self.prefix.gates()
        g = torch.tensor([ga for ga, _ in gates], device=a.device)
        a_query = torch.cat([a[:, slots["labs"]], a[:, slots["notes"]]], 1)  # [B, L+N]
        routed = torch.einsum("bq,blqk,l->bk", a_query, katt[..., 1:], g) / len(gates)
        fact_score = (a[:, slots["facts"]] + routed) * t["fact_mask"]
        lab_score = a[:, slots["labs"]] * t["lab_mask"]
        result = []
        for i, feats in enumerate(batch.features):
            fs = _normalise(fact_score[i, :len(feats.facts)])
            ls = _normalise(lab_score[i, :len(feats.labs)])
            facts = [(feats.facts[k].id, feats.facts[k].text, float(fs[k]))
                     for k in np.argsort(-fs, kind="stable")[:top_k]]
            labs = [(feats.labs[k].observation_id, feats.labs[k].loinc, feats.labs[k].time,
                     float(ls[k])) for k in np.argsort(-ls, kind="stable")[:top_k]]
            result.append(Explanation(facts, labs, gates))
        return result

    # -- the Predictor interface the pipeline calls ---------------------------------------------
    @torch.no_grad()
    def predict(self, labs: pd.DataFrame, notes: Sequence[Note],
                patient: PatientContext) -> Prediction:
        """Rationale and diagnoses for one patient; abstains on no input or low confidence."""
        cfg = self.config
        base = Prediction(METHOD, cfg.method_version, cfg.knowledge_version, [], "")
        if not has_inputs(labs, notes):
            return abstain_without_inputs(base)
        self.eval()
        feats = self.featurise(labs, notes, patient)
        batch = self.batch([feats])
        probs = self.probabilities(batch)[0].tolist()
        index = {code: i for i, code in enumerate(cfg.disorders)}
        c = cfg.conclude(probs, self.kg, patient)
        # the head decides; the rationale is written for what it concluded
        texts, ids = self.generate(batch, terms=[cfg.terms(c)])
        why = self.explain(batch, ids)[0]
        by_obs = {r.observation_id: r for r in feats.labs}
        evidence = tuple(Evidence.of_reading(by_obs[o]) for o, _, _, _ in why.labs[:3]
                         if o in by_obs)
        facts = tuple(f for f, _, _ in why.facts)
        base.facts_used = list(facts)
        return concluded_prediction(base, c, texts[0], lambda code: Diagnosis(
            code, cfg.term(code), probs[index[code]], evidence, facts))

    # -- persistence --------------------------------------------------------------------------
    def save(self, path: str | Path, merge: bool = True) -> Path:
        """config.json, tokenizer/, backbone/ (LoRA merged in, or base + adapter/), prefix
        weights, and the backbone's NOTICE: one directory that runs on its own."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(self.config.to_json())
        self.tokenizer.save_pretrained(out / "tokenizer")
        if isinstance(self.slm, PeftModel):
            twin = copy.deepcopy(self.slm)
            if merge:
                twin.merge_and_unload().save_pretrained(out / "backbone")
            else:
                twin.unload().save_pretrained(out / "backbone")
                self.slm.save_pretrained(str(out / "adapter"))
        else:
            self.slm.save_pretrained(out / "backbone")
        state = {k: v.detach().contiguous() for k, v in self.prefix.state_dict().items()
                 if not k.startswith("token_embedding.")}
        save_file(state, str(out / "prefix.safetensors"))
        notice = Path(self.config.backbone) / "NOTICE"
        if notice.is_file():
            (out / "NOTICE").write_text(notice.read_text())
        return out

    @classmethod
    def load(cls, path: str | Path, kg: KnowledgeGraph | None = None,
             trainable: bool = False) -> ClinRaGen:
        """The model `save` wrote; warns when `kg` is not the graph version it was trained on."""
        src = Path(path)
        config = ClinRaGenConfig.from_json((src / "config.json").read_text())
        tokenizer = AutoTokenizer.from_pretrained(  # type: ignore[no-untyped-call]
            src / "tokenizer", local_files_only=True)
        slm: Any = AutoModelForCausalLM.from_pretrained(src / "backbone", local_files_only=True,
                                                        dtype=torch.float32)
        if (src / "adapter").is_dir():
            slm = PeftModel.from_pretrained(slm, src / "adapter", is_trainable=trainable)
        if kg is not None and kg.version != config.knowledge_version:
            log.warning("knowledge graph %s differs from the model's %s", kg.version,
                        config.knowledge_version)
        model = cls(slm, tokenizer, config, kg)
        missing, unexpected = model.prefix.load_state_dict(
            load_file(str(src / "prefix.safetensors")), strict=False)
        if unexpected or any(not k.startswith("token_embedding.") for k in missing):
            raise ValueError(f"prefix weights do not match: {missing=} {unexpected=}")
        return model.eval()


def positions(mask: Tensor) -> Tensor:
    """Position ids that skip masked slots, as `generate` computes them (cumsum of the mask)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _until_eos(ids: Tensor, eos: int) -> Tensor:
    """1 up to and including the first eos of each row, 0 after (generate pads with eos)."""
    seen = (ids == eos).long().cumsum(-1)
    return ((seen == 0) | ((seen == 1) & (ids == eos))).float()


def _normalise(x: Tensor) -> np.ndarray:
    v = x.detach().float().cpu().numpy()
    total = float(v.sum())
    return v / total if total > 0 and math.isfinite(total) else v
