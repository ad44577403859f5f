"""The notes' vocabulary the diagnosis head reads: every distinct token of all the visit's notes,
with its count. Torch-free featurisation first, then the model and its ONNX graph."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from clinragen_fhir.encoding.features import (
    Budgets,
    Modalities,
    collate,
    featurise,
    featurise_note_bag,
)
from clinragen_fhir.encoding.schema import Note, PatientContext
from tests.unit.test_model_features import INDEX, NOTES, lab_frame, retrieval, tokenizer

VOCAB = {"A": 2, "B": 3}


def note(doc: str, day: int, text: str) -> Note:
    return Note(f"DocumentReference/{doc}", "1", datetime(2024, 3, day, tzinfo=UTC), text)


def test_the_bag_counts_each_token_of_every_note_once() -> None:
    tok = tokenizer()
    notes = [note("a", 1, "the patient reports thirst"), note("b", 2, "thirst and thirst")]
    ids, weight = featurise_note_bag(notes, tok, 64)
    want = {w: tok.token_to_id(w) for w in ("the", "patient", "reports", "thirst", "and")}
    assert ids.tolist() == sorted(want.values())  # ascending, each once
    counts = dict(zip(ids.tolist(), weight.tolist(), strict=True))
    assert counts[want["thirst"]] == pytest.approx(np.log1p(3))
    assert counts[want["the"]] == pytest.approx(np.log1p(1))
    assert ids.dtype == np.int64 and weight.dtype == np.float32


def test_the_budget_keeps_the_rarest_words_and_redact_applies() -> None:
    tok = tokenizer()
    notes = [note("a", 1, "the patient reports thirst and fever")]
    ids, _ = featurise_note_bag(notes, tok, 2)
    everything, _ = featurise_note_bag(notes, tok, 64)
    assert ids.tolist() == everything.tolist()[-2:]  # the highest ids
    assert featurise_note_bag(notes, tok, 0)[0].shape == (0,)  # off
    assert featurise_note_bag([], tok, 8)[0].shape == (0,)
    masked, _ = featurise_note_bag(notes, tok, 64, redact=lambda n: "no fever")
    assert masked.tolist() == sorted([tok.token_to_id("no"), tok.token_to_id("fever")])


def test_the_bag_follows_the_notes_switch_and_pads() -> None:
    p = PatientContext("p", sex="female", index_time=INDEX)
    frame = lab_frame([("A", 150.0, "2024-03-01", 70.0, 130.0)])
    budgets = Budgets(max_tests=4, max_note_bag=16)
    on = featurise(frame, NOTES, p, retrieval(), tokenizer(), VOCAB, budgets)
    off = featurise(frame, NOTES, p, retrieval(), tokenizer(), VOCAB, budgets,
                    Modalities(notes=False))
    assert len(on.note_bag_ids) == 8 and off.note_bag_ids.shape == (0,)
    arrays = collate([on, off])
    assert arrays["note_bag_ids"].shape == (2, 8)
    assert arrays["note_bag_mask"].sum(1).tolist() == [8.0, 0.0]
    assert not featurise(frame, NOTES, p, retrieval(), tokenizer(), VOCAB,
                         Budgets(max_tests=4)).note_bag_ids.size  # the model's budget is 0


# ---------------------------------------------------------------------------------------------
# the model

torch = pytest.importorskip("torch")
pytest.importorskip("peft")


def bag_model(trained: bool = True) -> object:
    from model.backbone import tiny_backbone
    from model.clinragen import ClinRaGen, ClinRaGenConfig
    from tests.unit.test_model import PROMPT_WORDS
    from tests.unit.test_model_features import WORDS

    slm, tok = tiny_backbone([*WORDS, *PROMPT_WORDS], seed=0)
    config = ClinRaGenConfig(loinc_codes=["A", "B"], disorders=["44054006", "38341003"],
                             disorder_terms=["diabetes", "hypertension"],
                             budgets=Budgets(max_labs=2, max_facts=4, max_fact_tokens=6,
                                             max_note_tokens=3, max_tests=4, max_note_bag=32),
                             max_new_tokens=6)
    torch.manual_seed(0)
    model = ClinRaGen(slm, tok, config)
    model.add_lora()
    if trained:  # a trained-looking reader, so the test can see it matter
        with torch.no_grad():
            for p in model.prefix.note_bag.parameters():
                p.normal_(0, 0.5)
    return model.eval()


def patient(model: object, notes: list[Note]) -> object:
    from model.clinragen import ClinRaGen

    assert isinstance(model, ClinRaGen)
    p = PatientContext("p", sex="male", birth_date=datetime(1950, 1, 1, tzinfo=UTC),
                       index_time=INDEX)
    frame = lab_frame([("A", 120.0, "2024-03-01", 70.0, 130.0)])
    return featurise(frame, notes, p, retrieval(), model.tokenizer.backend_tokenizer,
                     model.loinc_vocab, model.config.budgets)


NEWEST = note("new", 2, "tired no fever today")


def test_an_old_note_reaches_the_head_but_not_the_decoder_prefix() -> None:
    """Two patients with the same newest note (the decoder reads 3 of its tokens) and different
    older notes: the head's logits differ, the decoder's prefix does not."""
    model = bag_model()
    assert model.prefix.input_names()[-3:] == ["note_bag_ids", "note_bag_weight",
                                               "note_bag_mask"]
    thirst = patient(model, [note("old", 1, "the patient reports thirst"), NEWEST])
    calm = patient(model, [note("old", 1, "the patient reports no fever"), NEWEST])
    with torch.no_grad():
        a = model.prefix(**model.batch([thirst]).tensors)
        b = model.prefix(**model.batch([calm]).tensors)
    assert torch.equal(a[0], b[0])  # inputs_embeds
    assert not torch.allclose(a[3], b[3])  # diagnosis logits


def test_a_fresh_reader_adds_nothing_and_padding_changes_nothing() -> None:
    fresh = bag_model(trained=False)
    short = patient(fresh, [NEWEST])
    without = replace(short, note_bag_ids=np.zeros(0, np.int64),  # type: ignore[type-var]
                      note_bag_weight=np.zeros(0, np.float32))
    with torch.no_grad():  # zero output weights: the bag cannot move a logit yet
        assert torch.allclose(fresh.prefix(**fresh.batch([short]).tensors)[3],
                              fresh.prefix(**fresh.batch([without]).tensors)[3], atol=1e-6)
    model = bag_model()
    small = patient(model, [NEWEST])
    big = patient(model, [note("old", 1, "the patient reports thirst and fever"), NEWEST])
    with torch.no_grad():
        alone = model.prefix(**model.batch([small]).tensors)[3]
        padded = model.prefix(**model.batch([small, big]).tensors)[3][:1]
    assert torch.allclose(alone, padded, atol=1e-5)


def test_the_head_refit_on_cached_tokens_reads_the_bag() -> None:
    """Training's head phase (`cached_head_logits`) gives the prefix's logits, bag included."""
    from training.distill import Encoded, cached_head_logits, fused_tokens

    model = bag_model()
    feats = [patient(model, [note("old", 1, "the patient reports thirst"), NEWEST]),
             patient(model, [NEWEST])]
    data = [Encoded(f, None, np.zeros(2, np.float32)) for f in feats]
    cache = fused_tokens(model, data, 2)
    batch = model.batch(feats)
    with torch.no_grad():
        got = cached_head_logits(model, cache, [0, 1], batch)
        want = model.prefix(**batch.tensors)[3]
    assert torch.allclose(got, want, atol=1e-2)  # the cache is half precision


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_the_bag_exports_to_onnx_and_matches_torch(tmp_path: Path) -> None:
    from tests.unit.test_record_summary import assert_prefix_onnx_matches_torch

    model = bag_model()
    assert_prefix_onnx_matches_torch(
        model, [patient(model, NOTES), patient(model, [NEWEST])],
        [patient(model, [note("old", 1, "the patient reports thirst and fever"), NEWEST]),
         patient(model, [])], tmp_path)
