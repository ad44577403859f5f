"""The record summary the diagnosis head reads: one token per test over the whole lookback, one
for age and sex. Torch-free featurisation first, then the model and its ONNX graph."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from clinragen_fhir.encoding.features import (
    PATIENT_STATS,
    TEST_STATS,
    Budgets,
    collate,
    featurise,
    featurise_patient,
    featurise_tests,
    squash,
)
from clinragen_fhir.encoding.schema import PatientContext
from tests.unit.test_model_features import INDEX, NOTES, lab_frame, retrieval, tokenizer

VOCAB = {"A": 2, "B": 3, "W": 4}


def test_each_test_is_summarised_over_its_whole_history() -> None:
    frame = lab_frame([("A", 100.0, "2024-01-01", 70.0, 130.0),   # z = 0
                       ("A", 190.0, "2024-02-01", 70.0, 130.0),   # z = 3
                       ("A", 130.0, "2024-03-01", 70.0, 130.0),   # z = 1 (newest)
                       ("W", 80.0, "2024-02-15", np.nan, np.nan),  # no range: raw values
                       ("W", 84.0, "2024-03-02", np.nan, np.nan),
                       ("X", 5.0, "2024-03-02", 1.0, 2.0)])        # not in the vocabulary
    codes, stats = featurise_tests(frame, VOCAB, INDEX, 8)
    assert codes.tolist() == [4, 2]  # the test read most recently first; X left out
    assert stats.shape == (2, TEST_STATS) and stats.dtype == np.float32
    a, w = stats[1], stats[0]
    want_a = [squash(np.array(v)).item() for v in (1.0, 0.0, 3.0, 4.0 / 3.0, 1.0)]
    assert a[:5] == pytest.approx(want_a, abs=1e-5)  # newest, lowest, highest, mean, newest-oldest
    assert a[5] == 1.0 and w[5] == 0.0  # on the reference-range scale / raw
    assert w[0] == pytest.approx(squash(np.array(84.0)).item(), abs=1e-5)
    assert a[6] == pytest.approx(np.log1p(3)) and w[6] == pytest.approx(np.log1p(2))
    assert a[7] == pytest.approx(np.log1p(2.0) / 8.0, abs=1e-5)  # newest A: two days before


def test_the_test_budget_keeps_the_most_recent_tests() -> None:
    frame = lab_frame([("A", 1.0, "2024-01-01", 0.0, 2.0), ("B", 1.0, "2024-02-01", 0.0, 2.0),
                       ("W", 1.0, "2024-03-01", 0.0, 2.0)])
    codes, _ = featurise_tests(frame, VOCAB, INDEX, 2)
    assert codes.tolist() == [4, 3]
    assert featurise_tests(frame, VOCAB, INDEX, 0)[0].shape == (0,)  # off
    assert featurise_tests(frame.iloc[:0], VOCAB, INDEX, 4)[1].shape == (0, TEST_STATS)


def test_patient_stats_and_the_switch() -> None:
    born = datetime(1964, 3, 3, tzinfo=UTC)
    p = PatientContext("p", sex="female", birth_date=born, index_time=INDEX)
    assert featurise_patient(p) == pytest.approx([0.6, 1.0, 1.0, 0.0], abs=1e-3)
    assert featurise_patient(PatientContext("q")).tolist() == [0.0, 0.0, 0.0, 0.0]
    frame = lab_frame([("A", 150.0, "2024-03-01", 70.0, 130.0)])
    on = featurise(frame, NOTES, p, retrieval(), tokenizer(), VOCAB, Budgets(max_tests=4))
    off = featurise(frame, NOTES, p, retrieval(), tokenizer(), VOCAB, Budgets())
    assert on.test_code.tolist() == [2] and on.patient_stats[2] == 1.0
    assert off.test_code.shape == (0,) and not off.patient_stats.any()
    arrays = collate([on, off])
    assert arrays["test_stats"].shape == (2, 1, TEST_STATS)
    assert arrays["test_mask"].tolist() == [[1.0], [0.0]]
    assert arrays["patient_stats"].shape == (2, PATIENT_STATS)


# ---------------------------------------------------------------------------------------------
# the model

torch = pytest.importorskip("torch")
pytest.importorskip("peft")


def summary_model() -> object:
    from model.backbone import tiny_backbone
    from model.clinragen import ClinRaGen, ClinRaGenConfig
    from tests.unit.test_model import PROMPT_WORDS
    from tests.unit.test_model_features import WORDS

    slm, tok = tiny_backbone([*WORDS, *PROMPT_WORDS], seed=0)
    config = ClinRaGenConfig(loinc_codes=["A", "B"], disorders=["44054006", "38341003"],
                             disorder_terms=["diabetes", "hypertension"],
                             budgets=Budgets(max_labs=2, max_facts=4, max_fact_tokens=6,
                                             max_note_tokens=12, max_tests=4), max_new_tokens=6)
    torch.manual_seed(0)
    model = ClinRaGen(slm, tok, config)
    model.add_lora()
    with torch.no_grad():  # a trained-looking summary path, so the test can see it matter
        for p in model.prefix.tests.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def patient(model: object, values: list[float]) -> object:
    from model.clinragen import ClinRaGen

    assert isinstance(model, ClinRaGen)
    rows = [("A", v, f"2024-0{1 + i // 28}-{1 + i % 28:02d}", 70.0, 130.0)
            for i, v in enumerate(values)]
    p = PatientContext("p", sex="male", birth_date=datetime(1950, 1, 1, tzinfo=UTC),
                       index_time=INDEX)
    return featurise(lab_frame(rows), NOTES, p, retrieval(), model.tokenizer.backend_tokenizer,
                     model.loinc_vocab, model.config.budgets)


def test_the_history_reaches_the_head_but_not_the_decoder_prefix() -> None:
    """Two patients whose newest readings are the same (the readings budget keeps 2) but whose
    history differs: the head's logits differ, the decoder's prefix does not."""
    model = summary_model()
    assert model.prefix.input_names()[-4:] == ["test_code", "test_stats", "test_mask",
                                               "patient_stats"]
    calm = patient(model, [100.0, 100.0, 110.0, 120.0])
    spiked = patient(model, [400.0, 100.0, 110.0, 120.0])
    with torch.no_grad():
        a = model.prefix(**model.batch([calm]).tensors)
        b = model.prefix(**model.batch([spiked]).tensors)
    assert torch.equal(a[0], b[0])  # inputs_embeds: the decoder sees the same prefix
    assert not torch.allclose(a[3], b[3])  # diagnosis logits: the head saw the spike
    assert a[2].shape[2] == calm.lab_code.shape[0] + calm.note_ids.shape[0]  # labs + notes


def test_padding_the_summary_changes_nothing() -> None:
    model = summary_model()
    short, long = patient(model, [120.0]), patient(model, [100.0, 150.0, 200.0])
    with torch.no_grad():
        alone = model.prefix(**model.batch([short]).tensors)[3]
        padded = model.prefix(**model.batch([short, long]).tensors)[3][:1]
    assert torch.allclose(alone, padded, atol=1e-5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_the_summary_exports_to_onnx_and_matches_torch(tmp_path: Path) -> None:
    model = summary_model()
    assert_prefix_onnx_matches_torch(
        model, [patient(model, [100.0, 150.0]), patient(model, [90.0])],
        [patient(model, [100.0, 300.0, 90.0, 95.0, 120.0]), patient(model, [80.0])], tmp_path)


def assert_prefix_onnx_matches_torch(model: object, exported: list[object], other: list[object],
                                     tmp_path: Path) -> None:
    """Export the prefix on `exported`, run it on `other` (another batch and other lengths): the
    graph declares the builder's inputs and matches torch within 1e-4."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from model.clinragen import ClinRaGen
    from model.export import PREFIX_OUTPUTS, export_prefix

    assert isinstance(model, ClinRaGen)
    path = tmp_path / "prefix.onnx"
    export_prefix(model, exported, path)  # type: ignore[arg-type]
    session = ort.InferenceSession(str(path))
    names = [i.name for i in session.get_inputs()]
    assert names == model.prefix.input_names()
    arrays = collate(other)  # type: ignore[arg-type]
    got = session.run(list(PREFIX_OUTPUTS), {k: arrays[k] for k in names})
    with torch.no_grad():
        want = model.prefix(**model.batch(other).tensors)  # type: ignore[arg-type]
    for g, w in zip(got, want, strict=True):
        assert g.shape == tuple(w.shape)
        assert np.abs(g - w.numpy()).max() < 1e-4
