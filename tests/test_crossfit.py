"""Cross-fitted label-free evidence (`cascade train crossfit`, training/crossfit.py) and its use
in calibration (`cascade calibrate --label-free`, cascade/evidence.py): the folds, out-of-fold
tiers that never saw the texts they score, the large model's cached answers, the path's items
left out, and clear errors for a file that does not fit."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cascade.evidence import EVIDENCE_FORMAT, read_evidence
from cascade.thresholds import CalibrationError
from training.crossfit import folds_of


def test_folds_are_disjoint_cover_everything_and_are_seeded():
    folds = folds_of(10, 3, seed=0)
    assert sorted(np.concatenate(folds).tolist()) == list(range(10))
    assert sorted(len(f) for f in folds) == [3, 3, 4]
    assert [f.tolist() for f in folds] == [f.tolist() for f in folds_of(10, 3, seed=0)]
    assert [f.tolist() for f in folds] != [f.tolist() for f in folds_of(10, 3, seed=1)]
    with pytest.raises(ValueError, match="--folds 1"):
        folds_of(10, 1, seed=0)


def test_an_evidence_file_that_does_not_fit_is_refused_by_name(tmp_path):
    good = {"format": EVIDENCE_FORMAT, "text_digests": ["a", "b"],
            "runs": [{"name": "student", "labels": ["x", None], "confidence": [0.9, 0.0]},
                     {"name": "llm", "labels": ["x", "y"], "confidence": [1.0, 1.0]}]}
    path = tmp_path / "evidence.json"
    path.write_text(json.dumps(good))
    runs, digests, _ = read_evidence(path, ["student", "llm"])
    assert digests == ["a", "b"] and runs[0].labels == ["x", None] and runs[1].is_llm and not runs[0].is_llm
    with pytest.raises(CalibrationError, match=r"evidence.json: its tiers \['student', 'llm'\] are not"):
        read_evidence(path, ["rules", "student", "llm"])
    for broken, message in (({**good, "format": "other/1"}, "format 'other/1'"),
                            ({**good, "text_digests": ["a"]}, "has 2 labels and 2 confidences for 1 items"),
                            ({**good, "runs": [good["runs"][0], {**good["runs"][1], "labels": ["x", None]}]},
                             "must answer every item")):
        path.write_text(json.dumps(broken))
        with pytest.raises(CalibrationError, match=message):
            read_evidence(path, ["student", "llm"])
    path.write_text("{not json")
    with pytest.raises(CalibrationError, match="not a readable evidence file"):
        read_evidence(path, ["student", "llm"])


def test_train_rows_out_of_range_is_refused(tmp_path):
    from cascade.app.demo import make_demo
    from training.distill import train_student

    make_demo(tmp_path / "d", per_label=(3, 2, 2))
    with pytest.raises(ValueError, match=r"train_rows: \[10000\] out of range"):
        train_student(tmp_path / "d", None, tmp_path / "s", size="debug", train_rows=[0, 10000], progress=False)


def test_limit_train_is_a_seeded_sample_not_the_head():
    """Split files are often grouped by label (CLINC150's first 6,000 rows hold 60 of its 151
    labels): `--limit-train` samples, the same rows for the same seed."""
    from training.large import learnt_train_rows

    rows = learnt_train_rows(15_100, 6_000, 0)
    assert rows == sorted(set(rows)) and len(rows) == 6_000 and rows == learnt_train_rows(15_100, 6_000, 0)
    assert rows != list(range(6_000)) and rows[-1] > 14_000  # spans the file
    assert learnt_train_rows(15_100, 6_000, 1) != rows
    assert learnt_train_rows(100, None, 0) == learnt_train_rows(100, 500, 0) == list(range(100))
    with pytest.raises(ValueError, match="--limit-train 0"):
        learnt_train_rows(100, 0, 0)


def test_crossfit_refuses_a_sample_of_another_train_split(tmp_path):
    from training.crossfit import _teacher_unseen_rows
    from training.large import learnt_train_rows

    (tmp_path / "train_summary.json").write_text(json.dumps({"train_rows": 50, "train_sample": {"of": 200, "seed": 0}}))
    with pytest.raises(ValueError, match="sampled its 50 train rows from 200 rows, but this data dir.s train split"):
        _teacher_unseen_rows(tmp_path, 180)
    unseen = _teacher_unseen_rows(tmp_path, 200)
    assert len(unseen) == 150 and not set(unseen.tolist()) & set(learnt_train_rows(200, 50, 0))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The quickstart's smoke cascade (its large model learnt every train row), and a copy whose
    large model learnt only a seeded half of train (`--limit-train`): the rest is evidence."""
    import shutil

    from cascade.app.quickstart import run_quickstart
    from training.large import train_large
    from training.recipes import SMOKE_LARGE
    from training.trainer import TrainConfig

    root = tmp_path_factory.mktemp("crossfit")
    run_quickstart(root / "full", smoke=True, progress=False)
    shutil.copytree(root / "full", root / "qs", ignore=shutil.ignore_patterns("large", "large.*"))
    train_large(root / "qs" / "data", root / "qs" / "large", size="debug", vocab_size=512, limit_train=120,
                cfg=TrainConfig(**SMOKE_LARGE), progress=False)
    return root


def test_crossfit_refuses_train_rows_the_large_model_learnt(smoke, capsys):
    from cascade.app.cli import main

    full = smoke / "full"
    assert main(["train", "crossfit", "--config", str(full / "cascade.toml"), "--data", str(full / "data"),
                 "--out", str(smoke / "refused"), "--no-progress"]) == 2
    assert "learnt from all 240 train rows: there its answers are its training labels" in capsys.readouterr().err
    assert not (smoke / "refused" / "evidence.json").exists()


def test_crossfit_scores_each_text_with_tiers_that_never_saw_it_and_calibrate_uses_it(smoke, capsys):
    from cascade.app.cli import main
    from cascade.data import load_split
    from training.distill import teacher_distributions
    from training.large import learnt_train_rows
    from training.recipes import SMOKE_LARGE
    from training.trainer import TrainConfig

    qs = smoke / "qs"
    out = smoke / "evidence"
    args = ["train", "crossfit", "--config", str(qs / "cascade.toml"), "--data", str(qs / "data"), "--out", str(out),
            "--folds", "2", "--toy-rules", "--no-progress"]
    assert main(args) == 0
    assert "out-of-fold agreement with the large model" in capsys.readouterr().out
    ev = json.loads((out / "evidence.json").read_text())
    train = load_split(qs / "data", "train")
    unseen = sorted(set(range(len(train))) - set(learnt_train_rows(len(train), 120, TrainConfig(**SMOKE_LARGE).seed)))
    assert ev["format"] == EVIDENCE_FORMAT and ev["n"] == len(train) - 120 and ev["folds"] == 2
    assert [r["name"] for r in ev["runs"]] == ["rules", "student", "llm"]
    # every text the large model did not learn scored by exactly one fold, whose tiers learnt from the other fold only
    records = [json.loads((out / f"fold-{j}" / "predictions.json").read_text()) for j in (0, 1)]
    held = [set(r["held_scored"]) for r in records]
    assert not held[0] & held[1] and held[0] | held[1] == set(unseen)
    for j in (0, 1):
        summary = json.loads((out / f"fold-{j}" / "student" / "train_summary.json").read_text())
        assert summary["train_texts"] == records[j]["train_rows"] and records[j]["train_rows"] < len(train)
        assert (out / f"fold-{j}" / "student" / "model.int8.onnx").exists()
        assert (out / f"fold-{j}" / "rules.toml").exists()
    # the large model's answers are its cached distribution's argmax, on every item
    probs, cached = teacher_distributions(qs / "large", [ex.text for ex in train], progress=False)
    labels = json.loads((qs / "large" / "cascade.json").read_text())["labels"]
    assert cached and ev["runs"][-1]["labels"] == [labels[i] for i in probs.argmax(-1)[unseen].tolist()]
    # a second run reuses the folds
    mtime = (out / "fold-0" / "predictions.json").stat().st_mtime_ns
    assert main(args) == 0 and (out / "fold-0" / "predictions.json").stat().st_mtime_ns == mtime
    capsys.readouterr()

    calibrate = ["calibrate", "--config", str(qs / "cascade.toml"), "--data", str(qs / "data"),
                 "--target-accuracy", "llm", "--max-loss", "0.05", "--confidence", "0.9", "--dry-run",
                 "--no-progress", "--label-free", str(out / "evidence.json")]
    # the path is learnt on train: with evidence from train it takes half of it, and none of it tests
    assert main(calibrate) == 0
    frontier = json.loads((qs / "cascade.frontier.json").read_text())
    on_path = frontier["evidence"]["dropped_on_path"]
    assert 0 < on_path < ev["n"] and frontier["evidence"]["n"] == ev["n"] - on_path
    printed = capsys.readouterr().out
    assert f"label-free evidence: {ev['n'] - on_path} items ({on_path} left out: on the path)" in printed
    assert main([*calibrate, "--path-split", "learn"]) == 0
    printed = capsys.readouterr().out
    assert f"label-free evidence: {ev['n']} items (0 left out: on the path)" in printed
    assert "with val alone" in printed or "val alone:" in printed
    frontier = json.loads((qs / "cascade.frontier.json").read_text())
    assert frontier["evidence"]["n"] == ev["n"] and "with_label_free" in frontier["evidence"]
    assert "unlabelled" in frontier["guarantee"]["method"]


def test_crossfit_refuses_a_tier_it_cannot_fit_again(smoke, capsys):
    from cascade.app.cli import main
    from cascade.config import dump_config, load_config

    qs = smoke / "qs"
    config = load_config(qs / "cascade.toml")
    config.tiers[0] = config.tiers[0].model_copy(update={"kind": "majority", "path": None, "options": {}})
    dump_config(config, qs / "majority.toml")
    assert main(["train", "crossfit", "--config", str(qs / "majority.toml"), "--data", str(qs / "data"),
                 "--out", str(smoke / "x"), "--no-progress"]) == 2
    assert "tier 'rules' is of kind 'majority'; cross-fitting can fit again rules, student tiers only" in \
        capsys.readouterr().err


def _write_log(d, entries):
    d.mkdir(parents=True, exist_ok=True)
    (d / "traffic-0000000000001-000001.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))


def test_audited_sample_keeps_escalated_items_at_the_audit_rate(tmp_path):
    from serving.traffic_log import audited_sample

    cheap = [{"text": f"c{i}", "tier": "student", "label": "a", "confidence": 0.9} for i in range(300)]
    audits = [{"text": f"c{i}", "tier": "student", "label": "a", "audit": True, "llm": {"label": "b"}}
              for i in range(60)] + [{"text_sha256": "ff", "tier": "student", "audit": True, "llm": {"label": "a"}}]
    escalated = [{"text": f"e{i}", "tier": "llm", "label": "b", "llm": {"label": "b", "confidence": 0.7}}
                 for i in range(1000)]
    degraded = [{"text": "d", "tier": "student", "degraded": True, "label": "a"}]
    _write_log(tmp_path / "log", cheap + audits + escalated + degraded)
    texts, answers, counts = audited_sample(tmp_path / "log", "llm", seed=0)
    assert counts["cheap_answers"] == 300 and counts["audits"] == 61 and counts["escalated"] == 1000
    assert counts["audit_rate"] == pytest.approx(61 / 300) and counts["no_text_skipped"] == 1
    assert 150 <= counts["escalated_kept"] <= 260  # binomial(1000, 0.203): mean 203, sd 13
    assert len(texts) == 60 + counts["escalated_kept"] and answers[0] == {"label": "b", "fields": None}
    assert audited_sample(tmp_path / "log", "llm", seed=0)[0] == texts  # seeded


def test_calibrate_takes_a_traffic_logs_audited_sample_without_the_texts_the_tiers_learnt(smoke, capsys):
    from cascade.app.cli import main
    from cascade.app.demo import make_demo
    from cascade.data import load_split

    qs = smoke / "qs"
    make_demo(smoke / "new", per_label=(4, 0, 0), seed=7)
    new = [ex.text for ex in load_split(smoke / "new", "train")]
    train = {ex.text for ex in load_split(qs / "data", "train")}
    seen = sorted(train)[:10]
    unseen = [t for t in new if t not in train]  # the demo generator repeats itself: some new texts are in train
    assert unseen
    entries = [{"text": t, "tier": "student", "label": "x"} for t in new + seen]
    entries += [{"text": t, "tier": "student", "label": "x", "audit": True, "llm": {"label": "x"}} for t in new + seen]
    _write_log(smoke / "log", entries)
    assert main(["calibrate", "--config", str(qs / "cascade.toml"), "--data", str(qs / "data"), "--target-accuracy",
                 "llm", "--max-loss", "0.05", "--confidence", "0.9", "--dry-run", "--no-progress", "--path-split",
                 "learn", "--label-free", str(smoke / "log")]) == 0
    captured = capsys.readouterr()
    assert f"{len(new) + 10} audited items" in captured.err
    left_out = len(new) + 10 - len(unseen)
    assert f"label-free evidence: {len(unseen)} items ({left_out} left out: texts the tiers may have learnt)" in \
        captured.out
