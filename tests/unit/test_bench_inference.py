"""bench/inference.py and bench/bandwidth.py logic (no timing): when the installed default
model can be reused, the physical-limit arithmetic, the baselines' summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.bandwidth import bytes_per_token, kv_cache_bytes, token_limit
from bench.inference import installed_matches, physical_limits, summarise_baselines


def _dirs(tmp_path: Path, have: dict[str, str], want: dict[str, str]) -> tuple[Path, Path]:
    model, artifact = tmp_path / "model", tmp_path / "artifact"
    (model / "onnx").mkdir(parents=True)
    artifact.mkdir()
    (model / "onnx" / "manifest.json").write_text("{}")
    (model / "installed-from.json").write_text(json.dumps({"artifact_sha256": have}))
    (artifact / "release.json").write_text(json.dumps({"sha256": want}))
    return model, artifact


def test_an_install_of_the_same_weights_is_reused_whatever_the_metrics(tmp_path: Path) -> None:
    model, artifact = _dirs(tmp_path, {"weights.safetensors": "a", "calibration.json": "b",
                                       "metrics.json": "old"},
                            {"weights.safetensors": "a", "calibration.json": "b",
                             "metrics.json": "new"})
    assert installed_matches(model, artifact)


def test_retrained_weights_or_no_export_mean_a_new_install(tmp_path: Path) -> None:
    model, artifact = _dirs(tmp_path, {"weights.safetensors": "a", "calibration.json": "b"},
                            {"weights.safetensors": "retrained", "calibration.json": "b"})
    assert not installed_matches(model, artifact)
    model, artifact = _dirs(tmp_path / "2", {"weights.safetensors": "a",
                                             "calibration.json": "b"},
                            {"weights.safetensors": "a", "calibration.json": "b"})
    (model / "onnx" / "manifest.json").unlink()
    assert not installed_matches(model, artifact)
    assert not installed_matches(tmp_path / "nowhere", artifact)


def test_the_limit_is_bandwidth_over_the_bytes_one_token_streams() -> None:
    assert kv_cache_bytes(8, 3, 64, 100) == 2 * 8 * 3 * 64 * 4 * 100
    per = bytes_per_token(200_000_000, 8, 3, 64, 100)
    assert per == 200_000_000 + kv_cache_bytes(8, 3, 64, 100)
    assert token_limit(10.0, 1e9) == pytest.approx(10.0)
    rows = [{"backend": "torch", "decode_tokens_per_s": 20.0},
            {"backend": "ort-int8", "decode_tokens_per_s": 50.0}]
    lim = physical_limits(rows, {"fp32": 200_000_000, "int8": 50_000_000},
                          {"n_layers": 8, "n_kv_heads": 3, "head_dim": 64}, 0.0,
                          {"copy_gb_s": 20.0, "read_gb_s": 12.0})
    assert [r["precision"] for r in lim] == ["fp32", "int8"]
    assert lim[0]["limit_tokens_per_s"] == pytest.approx(100.0)  # the faster figure: 20 GB/s
    assert lim[1]["limit_tokens_per_s"] == pytest.approx(400.0)
    assert lim[1]["share_of_limit"] == pytest.approx(50.0 / 400.0)


def test_baselines_are_summarised_per_patient_against_pytorch() -> None:
    rows = summarise_baselines([{"backend": "rules", "name": "rules", "latencies": [0.01, 0.03],
                                 "fitted": {}, "peak_rss_mib": 100.0, "loadavg_after": 1.0}],
                               {"patients_per_s": 0.5})
    assert rows[0]["ms_per_patient"] == pytest.approx(20.0)
    assert rows[0]["patients_per_s"] == pytest.approx(50.0)
    assert rows[0]["x_pytorch_patients_per_s"] == pytest.approx(100.0)


def test_greedy_agreement_is_judged_up_to_the_first_eos() -> None:
    from bench.inference import same_greedy, until_eos

    assert until_eos([5, 6, 2, 7], 2) == [5, 6, 2]
    assert until_eos([5, 6], 2) == [5, 6]
    # transformers bars eos (min_new_tokens) where the runtime writes it: equal up to there
    assert same_greedy([5, 6, 1, 9], [5, 6, 2, 9], 2)
    assert not same_greedy([5, 7, 1, 9], [5, 6, 2, 9], 2)
    assert same_greedy([5, 6, 7], [5, 6, 7], None)
