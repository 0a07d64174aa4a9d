"""bench/e2e.py, the end-to-end benchmark harness, at toy scale on real dataset slices: stages
resume, `--redo` re-runs from a stage on, the result JSON has the promised keys."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SYSTEMS = ("cascade", "large_only", "student_only", "tfidf", "threshold_router")
KEYS = {"accuracy", "macro_f1", "llm_share", "items_per_s", "cost_per_1k_rel"}


def e2e(workdir: Path, dataset: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "bench" / "e2e.py"), "--dataset", dataset, "--tiny", "--limit", "150",
           "--workdir", str(workdir), "--results-dir", str(workdir / "results"), "--docs", str(workdir / "results.md"),
           *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


def records(workdir: Path) -> dict[str, float]:
    return {p.stem: p.stat().st_mtime_ns for p in (workdir / "stages").glob("*.json")}


@pytest.mark.skipif(not (SHARED / "clinc150").exists(), reason="../shared/data/clinc150 not present")
def test_e2e_stages_resume_and_the_result_has_every_system(tmp_path):
    work = tmp_path / "clinc"
    first = e2e(work, "clinc150", "--until", "student")
    assert set(records(work)) == {"prepare", "rules", "large", "student"}
    assert "[student] running" in first.stdout and "[export]" not in first.stdout
    counts = json.loads((work / "stages" / "prepare.json").read_text())["counts"]
    assert counts == {"train": 150, "val": 150, "test": 150}
    before = records(work)

    second = e2e(work, "clinc150")  # picks up where the first stopped
    for stage in ("prepare", "rules", "large", "student"):
        assert f"[{stage}] done before, skipped" in second.stdout
    after = records(work)
    assert {k: after[k] for k in before} == before  # finished stages were not re-run
    assert set(after) == {"prepare", "rules", "large", "student", "export", "calibrate", "measure", "report"}

    result = json.loads((work / "results" / "clinc150.json").read_text())
    for name in SYSTEMS:
        assert KEYS <= set(result[name]), name
        assert result[name]["n"] == 150
        assert 0.0 <= result[name]["accuracy"] <= 1.0 and result[name]["items_per_s"] > 0
        assert "oos_recall" in result[name]
        if name == "tfidf":  # fitted and timed apart from the routed systems
            continue
        # every pass's accuracy, and how many answers moved between passes (counted, not fatal)
        assert len(result[name]["pass_accuracy"]) == len(result[name]["all_wall_s"]) == 2
        assert 0 <= result[name]["answers_changed_between_passes"] <= 150
        if result[name]["answers_changed_between_passes"] == 0:
            assert len(set(result[name]["pass_accuracy"])) == 1
    assert result["large_only"]["llm_share"] == 1.0 and result["large_only"]["cost_per_1k_rel"] == 1.0
    assert result["student_only"]["llm_share"] == 0.0 and result["tfidf"]["llm_share"] == 0.0
    assert abs(sum(result["cascade"]["tier_shares"].values()) - 1.0) < 1e-9
    assert set(result["targets"]) >= {"accuracy_gap_pt", "llm_share", "speedup", "student_over_large"}
    t = result["targets"]
    assert t["student_over_large"] == result["student_only"]["accuracy"] / result["large_only"]["accuracy"]
    assert t["llm_share_at_most_6pct"] == (t["llm_share"] <= 0.06)
    assert t["speedup_at_least_10x"] == (t["speedup"] >= 10.0)
    md = (work / "results" / "clinc150.md").read_text()
    assert "| large model alone |" in md and "OOS recall" in md
    # issue 16's targets, each marked from the figures
    assert "(target ≤ 6%: " in md and "(target ≥ 10×: " in md and "of the large model's accuracy (target ≥ 0.99: " in md
    assert (work / "results" / "clinc150.frontier.png").read_bytes()[:4] == b"\x89PNG"
    assert "## clinc150 (toy scale)" in (work / "results.md").read_text()

    third = e2e(work, "clinc150", "--redo", "calibrate")
    assert "[export] done before, skipped" in third.stdout
    assert "[calibrate] running" in third.stdout and "[measure] running" in third.stdout
    again = records(work)
    assert all(again[k] == after[k] for k in ("prepare", "rules", "large", "student", "export"))
    assert all(again[k] > after[k] for k in ("calibrate", "measure", "report"))


@pytest.mark.skipif(not (SHARED / "banking77").exists(), reason="../shared/data/banking77 not present")
def test_e2e_banking77_has_no_out_of_scope_column(tmp_path):
    work = tmp_path / "bank"
    e2e(work, "banking77")
    result = json.loads((work / "results" / "banking77.json").read_text())
    assert all(KEYS <= set(result[name]) for name in SYSTEMS)
    assert "oos_recall" not in result["cascade"]
    md = (work / "results" / "banking77.md").read_text()
    assert "OOS recall" not in md
    # the machine beside its figures: flags, and peaks measured in the same run
    cpu = result["cpu"]
    assert cpu["class"] and isinstance(cpu["flags"], list)
    assert cpu["matmul_flops_fp32"] > 0 and cpu["matmul_flops_bf16"] > 0
    assert f"{cpu['class']}: " in md and "GFLOP/s" in md
    assert "Command: `python bench/e2e.py --dataset banking77 --tiny --limit 150`" in md


@pytest.mark.skipif(not (SHARED / "snips").exists(), reason="../shared/data/snips not present")
def test_e2e_snips_scores_fields_for_every_system(tmp_path):
    """The joint task through every stage at toy scale: template rules, a tagging student, a
    large model writing schema-constrained JSON, calibration on the joint metric."""
    work = tmp_path / "snips"
    e2e(work, "snips", "--repeats", "1")
    result = json.loads((work / "results" / "snips.json").read_text())
    assert result["task"] == "joint" and result["metric"] == "joint"
    for name in ("cascade", "large_only", "student_only", "rules_only", "threshold_router"):
        row = result[name]
        assert row["n"] == 150 and 0.0 <= row["span_f1"] <= 1.0 and 0.0 <= row["joint_accuracy"] <= 1.0, name
        assert row["joint_accuracy"] <= min(row["accuracy"], row["exact_match"]) + 1e-9, name
    js = result["llm_json"]
    assert js["answers"] >= 150 and js["invalid"] == 0  # a toy model too: every answer within its schema
    assert result["large_only"]["llm_share"] == 1.0 and result["student_only"]["llm_share"] == 0.0
    assert set(result["targets"]) >= {"large_slot_f1", "score_gap_pt", "llm_share", "speedup", "llm_json_all_valid"}
    md = (work / "results" / "snips.md").read_text()
    assert "| large model alone |" in md and "slot F1" in md and "JointBERT" in md
    assert "## snips (toy scale)" in (work / "results.md").read_text()


def test_router_threshold_sends_the_asked_share():
    sys.path.insert(0, str(REPO / "bench"))
    from e2e import router_threshold

    conf = np.random.default_rng(0).random(1000).tolist()
    thr = router_threshold(conf, 0.25)
    assert sum(c < thr for c in conf) == 250
    assert router_threshold(conf, 0.0) == 0.0 and router_threshold(conf, 1.0) > 1.0
    # weighted as calibration weighs val: the 100 lowest items count 3x, so 100 of them are 0.25
    weights = np.where(np.argsort(np.argsort(conf)) < 100, 3.0, 1.0)  # 300 of 1200
    assert sum(c < router_threshold(conf, 0.25, weights) for c in conf) == 100


def test_docs_render_every_committed_result_against_todays_targets(tmp_path):
    """`write_docs` re-renders bench/results' dataset files, round 1's too (no CPU record, no
    confidence), and marks each against issue 16's targets from the figures."""
    sys.path.insert(0, str(REPO / "bench"))
    from e2e import write_docs

    docs = tmp_path / "results.md"
    docs.write_text("old head\n<!-- end of bench/e2e.py's part: what follows is kept as it is -->\nkept tail\n")
    write_docs(REPO / "bench" / "results", docs)
    text = docs.read_text()
    assert "old head" not in text and text.endswith("kept tail\n")
    for name in ("clinc150", "banking77", "snips"):
        assert f"## {name}" in text
    clinc = text[text.index("## clinc150"):text.index("## banking77")]
    assert "CPU flags not recorded" in clinc and "--confidence None" not in clinc
    assert "Large-model share: 12.0% (target ≤ 6%: **missed**)" in clinc
    assert "(target ≥ 10×: **missed**)" in clinc


def test_answers_changed_counts_a_moved_label_or_tier_not_a_moved_confidence():
    from cascade.evaluate import answers_changed
    from cascade.types import Prediction

    first = [Prediction("a", 0.9, "student"), Prediction("b", 0.5, "llm"), Prediction("c", 0.7, "llm")]
    again = [Prediction("a", 0.91, "student"), Prediction("d", 0.5, "llm"), Prediction("c", 0.7, "student")]
    assert answers_changed(first, first) == 0
    assert answers_changed(first, again) == 2  # b -> d, and c answered by another tier
    with pytest.raises(ValueError, match="not the same texts"):
        answers_changed(first, again[:2])
