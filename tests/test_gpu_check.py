"""bench/gpu_check.py, the check prepared for a lent GPU, run here on the CPU with --tiny: one
command, one JSON, every section ok (or fp8 skipped with its reason)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check") / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu", "--tiny",
                           "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_every_section_is_reported_with_its_status_and_time(report):
    assert set(report["sections"]) == {"engine", "fp8", "training"}
    for name, section in report["sections"].items():
        assert section["status"] in ("ok", "skipped"), (name, section.get("error"), section.get("traceback"))
        assert section["elapsed_s"] >= 0
    assert report["env"]["device"] == "cpu" and report["env"]["torch"] and report["env"]["transformers"]
    assert report["env"]["cpu"]["cores"] >= 1
    assert report["model"]["config"]["n_layers"] == 4  # --tiny
    assert report["elapsed_s"] > 0


def test_engine_matches_transformers_greedy_in_fp32(report):
    engine = report["sections"]["engine"]
    assert engine["status"] == "ok"
    run = engine["runs"]["fp32"]
    # fp32 on the CPU: the engine (C attention kernel or torch path) and transformers make the
    # same tokens, and the same log-probabilities to ~1e-6 (tests/test_engine.py holds the same
    # parity for single prompts; here the reference is one left-padded batch).
    assert run["agreement"] == {"token_agreement": 1.0, "prefix_agreement": 1.0, "sequences_identical": 1.0}
    assert run["parity"]["positions_compared"] == engine["prompts"] * engine["new_tokens_per_prompt"]
    assert run["parity"]["max_abs_logprob_diff"] < 1e-4
    assert run["engine"]["tokens_per_s"] > 0 and run["transformers"]["tokens_per_s"] > 0
    assert run["reference_distinct_tokens_per_sequence"] > 1  # the random model does not just repeat itself


def test_fp8_is_measured_or_skipped_with_a_reason(report):
    fp8 = report["sections"]["fp8"]
    if fp8["status"] == "skipped":
        assert fp8["reason"]
        return
    acc = fp8["accuracy"]["next_token_last_position"]
    assert fp8["converted_linears"] == 6  # 4 blocks: the first and last stay unconverted
    assert 0 <= acc["top1_agreement"] <= 1 and acc["positions"] == fp8["accuracy"]["prompts"]
    assert 0 < acc["mean_abs_logit_diff"] <= acc["max_abs_logit_diff"]
    assert 0 < fp8["accuracy"]["mlp_relative_error"]["max"] < 0.5
    assert fp8["speed"]["bf16_s"] > 0 and fp8["speed"]["fp8_s"] > 0


def test_training_mfu_is_a_fraction_of_the_measured_peak(report):
    train = report["sections"]["training"]
    assert train["status"] == "ok"
    assert train["tokens_per_s"] > 0 and train["measured_peak_flops"] > 0
    assert 0 < train["mfu"] <= 1
    assert train["mfu"] == pytest.approx(6 * train["n_params"] * train["tokens_per_s"] / train["measured_peak_flops"])
    assert "nominal_peak_flops" not in train  # the H200's 989 TFLOP/s is reported on CUDA only
