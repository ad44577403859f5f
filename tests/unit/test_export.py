"""ONNX export of a tiny ClinRaGen built in-process: parity gate, manifest, int8 graphs.

`exported_model_dir()` is shared with the runtime and torch-free tests: one export per session.
"""

from __future__ import annotations

import json
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from clinragen_fhir.encoding.features import (  # noqa: E402
    Budgets,
    Features,
    Modalities,
    featurise,
)
from clinragen_fhir.knowledge import retrieve  # noqa: E402
from model.backbone import tiny_backbone  # noqa: E402
from model.clinragen import ClinRaGen, ClinRaGenConfig  # noqa: E402
from model.export import (  # noqa: E402
    ExportError,
    ParityError,
    check_parity,
    export,
    macro_f1,
)
from tests.unit.onnx_fixtures import CODES, LOINC, TERMS, WORDS, graph, patients  # noqa: E402


def build(seed: int = 0) -> ClinRaGen:
    """A random 2-layer Llama whose word vocabulary includes the disorder codes; its head reads
    the record summary and the notes' vocabulary, as the default model's does."""
    slm, tok = tiny_backbone(WORDS, seed=seed)
    cfg = ClinRaGenConfig(loinc_codes=LOINC, disorders=CODES, disorder_terms=TERMS,
                          knowledge_version=graph().version, max_new_tokens=12,
                          budgets=Budgets(max_tests=8, max_note_bag=64))
    torch.manual_seed(seed)
    model = ClinRaGen(slm, tok, cfg, graph())
    model.init_lab_codes({"4548-4": "HbA1c", "2345-7": "Glucose", "8480-6": "Systolic"})
    model.add_lora()
    return model.eval()


def features_of(model: ClinRaGen, n: int = 32) -> list[Features]:
    out = []
    for i, (labs, ns, p) in enumerate(patients(n)):
        mods = Modalities(knowledge=i % 5 != 4)  # some patients without knowledge
        r = retrieve(graph(), labs, ns, p)
        out.append(featurise(labs, ns, p, r, model.tokenizer.backend_tokenizer,
                             model.loinc_vocab, model.config.budgets, mods))
    return out


@cache
def exported_model_dir() -> Path:
    """A saved and exported (fp32 + int8) tiny model, once per test session."""
    root = Path(tempfile.mkdtemp(prefix="clinragen-export-"))
    model = build()
    model.save(root / "model")
    export(root / "model", features_of(model), model, int8=True, new_tokens=6,
           cost_tokens=12)
    return root / "model"


@cache
def manifest() -> dict[str, Any]:
    return dict(json.loads((exported_model_dir() / "onnx" / "manifest.json").read_text()))


@pytest.mark.slow
def test_export_writes_graphs_and_a_manifest_with_versions_limits_and_hashes() -> None:
    m = manifest()
    onnx_dir = exported_model_dir() / "onnx"
    assert m["format"] == "clinragen-onnx" and m["opset"] == 17
    assert m["versions"]["torch"] and m["versions"]["onnxruntime"]
    assert m["limits"]["max_note_tokens"] == 384 and m["limits"]["max_positions"] == 4096
    assert m["decoder"] == {"n_layers": 2, "n_kv_heads": 2, "head_dim": 8, "hidden_size": 32,
                            "vocab_size": len(dict.fromkeys(
                                ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *WORDS])),
                            "eos_token_id": 2, "pad_token_id": 2}
    for name, entry in m["files"].items():
        assert (onnx_dir / name).stat().st_size == entry["bytes"] and len(entry["sha256"]) == 64
    assert set(m["model_files"]) == {"config.json", "tokenizer/tokenizer.json"}
    assert set(m["variants"]) == {"fp32", "int8"}


@pytest.mark.slow
def test_parity_gate_passed_on_32_patients() -> None:
    p = manifest()["parity"]
    assert p["patients"] >= 32 and p["greedy_tokens_identical"]
    assert p["max_logit_diff"] < 1e-3 and p["max_diagnosis_logit_diff"] < 1e-3


@pytest.mark.slow
def test_parity_gate_raises_when_onnx_and_torch_disagree() -> None:
    """The graphs of seed 0 against a torch model of seed 1 must fail loudly."""
    from clinragen_fhir.inference.runtime import OnnxModel

    other = build(seed=1)
    onnx_model = OnnxModel(exported_model_dir(), "fp32", "cpu")
    with pytest.raises(ParityError, match=r"max \\|logit diff\\|"):
        check_parity(other, onnx_model, features_of(other, 4), new_tokens=3)


@pytest.mark.slow
def test_export_needs_32_patients_and_a_saved_model_dir(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"config.json missing"):
        export(tmp_path, [], build())
    model = build()
    model.save(tmp_path / "m")
    with pytest.raises(ExportError, match=r"at least 32 patients"):
        export(tmp_path / "m", features_of(model, 3), model)


@pytest.mark.slow
def test_int8_graphs_are_smaller_and_their_cost_is_recorded() -> None:
    m = manifest()
    cost = m["int8_cost"]
    assert cost["patients"] == 32 and 0.0 <= cost["identical_decisions"] <= 1.0
    # the head is in the fp32 prefix graph, which the int8 variant shares: no decision moves
    assert m["variants"]["int8"]["prefix"] == m["variants"]["fp32"]["prefix"]
    assert cost["max_probability_shift"] == 0.0 and cost["identical_decisions"] == 1.0
    onnx_dir = exported_model_dir() / "onnx"
    assert (onnx_dir / "int8" / "decoder.onnx").stat().st_size < (
        onnx_dir / "decoder.onnx").stat().st_size


def test_macro_f1() -> None:
    gold = [{"a"}, {"b"}, set()]
    assert macro_f1(gold, gold, ["a", "b", "c"]) == 1.0
    assert macro_f1([{"a"}, set(), {"b"}], gold, ["a", "b"]) == pytest.approx((1.0 + 0.0) / 2)


def test_decoder_graph_matches_transformers_with_padding_inside_the_prefix() -> None:
    """The hand-written decoder step equals the SLM's forward, padded slots included."""
    from model.export import DecoderStep

    model = build()
    lm = model.base_lm()
    step = DecoderStep(lm).eval()
    embeds = torch.randn(2, 7, 32)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 2:4] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    empty = [torch.zeros(2, 2, 0, 8) for _ in range(4)]
    with torch.no_grad():
        got, *_ = step(embeds, mask, pos, *empty)
        want = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits[:, -1]
    assert np.abs(got.numpy() - want.numpy()).max() < 1e-5
