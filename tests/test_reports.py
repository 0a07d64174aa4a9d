"""The reports people read: `cascade eval --json` writes per-label scores, the confusion and
reliability figures, latency per tier and per-item rows beside the JSON and Markdown; training
draws its loss curve; without matplotlib the figures are skipped with one line and the rest is
still written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cascade.app.cli import main
from cascade.evaluate import item_rows, report_paths
from cascade.types import ItemFailure, Prediction

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LABELS = [f"intent{k:02d}" for k in range(20)]
VOCAB = 64
CONTROL_ONLY = "\u0001\u0002"  # rows the dataset reader keeps but `clean_text` refuses: failures
SURROGATE = "\ud800 3"


def assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100


def tiny_task(make_dataset, tmp_path, n: int = 150) -> tuple[Path, Path]:
    """A 20-label dataset and a three-tier cascade over it (rules, a real ONNX student, a
    majority fallback) whose student is right on about 70% of the items: confusions to draw,
    confidences spread over the bins."""
    pytest.importorskip("onnx")
    from tests.helpers import onnx_student_dir

    rng = np.random.RandomState(1)
    table = np.random.RandomState(0).randn(VOCAB, len(LABELS)) * 3  # the student's logits, as the helper draws them
    rows = []
    for _ in range(n):
        ids = rng.randint(1, VOCAB, size=rng.randint(2, 6))
        right = LABELS[int(table[ids].sum(axis=0).argmax())]
        rows.append((" ".join(map(str, ids)), right if rng.rand() < 0.7 else LABELS[rng.randint(len(LABELS))]))
    rows += [("refund 3 4", "intent00"), ("refund please", "intent00"), (CONTROL_ONLY, "intent01"),
             (SURROGATE, "intent02")]
    data = make_dataset({s: rows for s in ("train", "val", "test")})
    onnx_student_dir(tmp_path / "student", LABELS, vocab=VOCAB)
    (tmp_path / "pack.toml").write_text("[[rule]]\nlabel = 'intent00'\npattern = '\\brefund\\b'\n")
    (tmp_path / "cascade.toml").write_text(
        "[task]\nname='t'\n"
        "[[tiers]]\nname='rules'\nkind='rules'\npath='pack.toml'\n"
        "[[tiers]]\nname='student'\nkind='student'\npath='student'\nthreshold=0.6\noptions={model='model.onnx'}\n"
        "[[tiers]]\nname='fallback'\nkind='majority'\npath='ds'\noptions={label='intent01'}\n")
    return data, tmp_path / "cascade.toml"


def test_eval_writes_every_report(make_dataset, tmp_path):
    data, config = tiny_task(make_dataset, tmp_path)
    out = tmp_path / "reports" / "eval.json"
    assert main(["eval", "--config", str(config), "--data", str(data), "--json", str(out)]) == 0
    paths = report_paths(out)
    assert [p.name for p in paths.values()] == ["eval.json", "eval.md", "eval.items.jsonl", "eval.confusion.png",
                                                "eval.reliability.png"]
    report = json.loads(out.read_text())
    n = report["n"]
    assert n == 154 and report["failed"] == 2
    # the keys other code reads are still there
    assert {"accuracy", "macro_f1", "n", "tiers", "llm_share", "items_per_s", "confused_pairs"} <= set(report)
    assert report["files"] == {"markdown": "eval.md", "items": "eval.items.jsonl",
                               "confusion_png": "eval.confusion.png", "reliability_png": "eval.reliability.png"}

    # per label: every label seen, worst F1 first, support summing to the items
    per_label = report["per_label"]
    assert [r["f1"] for r in per_label] == sorted(r["f1"] for r in per_label)
    assert sum(r["support"] for r in per_label) == n
    assert len(per_label) == len({r["label"] for r in per_label}) <= len(LABELS)
    assert np.mean([r["f1"] for r in per_label]) == pytest.approx(report["macro_f1"], abs=0.05)

    # latency percentiles and calibration for each tier that answered anything
    for tier in report["tiers"]:
        assert tier["answered"] > 0, tier["name"]
        lat = tier["latency_ms"]
        assert 0.0 <= lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
        assert 0.0 <= tier["ece"] <= 1.0 and sum(b["n"] for b in tier["reliability"]) == tier["answered"]
    assert report["latency_ms"]["p99"] >= report["latency_ms"]["p50"]
    assert 2 <= len(report["confusion"]["labels"]) <= 15

    # one row per item, in the split's order; the failure carries its error
    items = [json.loads(line) for line in paths["items"].read_text().splitlines()]
    assert [r["index"] for r in items] == list(range(n))
    assert [r["id"] for r in items[:2]] == ["test-0", "test-1"]
    assert all(r["correct"] == (r["label"] == r["gold"]) for r in items if "error" not in r)
    assert {r["tier"] for r in items if "error" not in r} == {"rules", "student", "fallback"}
    failed = [r for r in items if "error" in r]
    assert [(r["text"], r["error"]["code"]) for r in failed] == [(CONTROL_ONLY, "empty_text"),
                                                                 (SURROGATE, "invalid_unicode")]
    assert sum(r["correct"] for r in items) / n == pytest.approx(report["accuracy"])
    assert all(r["latency_ms"] > 0 for r in items if "error" not in r)

    assert_png(paths["confusion_png"])
    assert_png(paths["reliability_png"])
    md = paths["markdown"].read_text()
    assert md.startswith("# Cascade evaluation")
    assert "| tier | answered | p50 ms | p95 ms | p99 ms | ECE |" in md
    assert f"## Per label, worst F1 first (20 of {len(per_label)}" in md
    assert f"| {per_label[0]['label']} | {per_label[0]['precision']:.4f} |" in md
    assert "![confusion among the most-confused labels](eval.confusion.png)" in md
    assert "(eval.reliability.png)" in md and "eval.items.jsonl" in md


def test_eval_reports_without_matplotlib(make_dataset, tmp_path):
    """matplotlib blocked (`sys.modules['matplotlib'] = None`): the core imports, eval prints the
    one-line note once and still writes the JSON, the Markdown and the per-item rows."""
    data, config = tiny_task(make_dataset, tmp_path, n=40)
    out = tmp_path / "eval.json"
    (tmp_path / "eval.confusion.png").write_bytes(PNG_MAGIC)  # stale, from an earlier run: removed
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "import cascade.calibrate, cascade.evaluate, cascade.plots\n"
            "from cascade.app.cli import main\n"
            f"rc = main(['eval', '--config', {str(config)!r}, '--data', {str(data)!r}, '--json', {str(out)!r}])\n"
            "assert 'matplotlib' not in sys.modules or sys.modules['matplotlib'] is None\n"
            "sys.exit(rc)\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr[-3000:]
    note = "plots skipped: matplotlib is not installed (pip install 'cascade[plots]')"
    assert (run.stdout + run.stderr).count(note) == 1
    report = json.loads(out.read_text())
    assert report["files"]["confusion_png"] is None and report["files"]["reliability_png"] is None
    assert not (tmp_path / "eval.confusion.png").exists() and not (tmp_path / "eval.reliability.png").exists()
    assert len((tmp_path / "eval.items.jsonl").read_text().splitlines()) == report["n"] == 44
    md = (tmp_path / "eval.md").read_text()
    assert "## Per label, worst F1 first" in md and "not drawn: matplotlib is not installed" in md


def test_calibration_frontier_is_skipped_without_matplotlib(tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from cascade.calibrate import plot_frontier\n"
            "from cascade.thresholds import Point\n"
            "p = Point(thresholds=(0.5, 0.0), accuracy=0.9, llm_share=0.2, cost_ms=1.0, shares=(0.8, 0.2))\n"
            f"plot_frontier([p], p, {str(tmp_path / 'f.png')!r})\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "plots skipped: matplotlib is not installed" in run.stderr and not (tmp_path / "f.png").exists()


def test_item_rows_carry_the_answer_or_the_error():
    answers = [Prediction("a", 0.9, "rules", latency_ms=0.5, degraded=True), ItemFailure("tier_failed", "down", "llm")]
    rows = item_rows(["t0", "t1"], ["a", "b"], answers, ["x", "y"])
    assert rows[0] == {"index": 0, "id": "x", "text": "t0", "gold": "a", "label": "a", "tier": "rules",
                       "confidence": 0.9, "correct": True, "degraded": True, "latency_ms": 0.5}
    assert rows[1]["correct"] is False and rows[1]["label"] is None
    assert rows[1]["error"] == {"code": "tier_failed", "message": "down", "tier": "llm"}


def test_report_paths_derive_from_the_json_path(tmp_path):
    paths = report_paths(tmp_path / "runs" / "test.eval.json")
    assert paths["markdown"].name == "test.eval.md" and paths["items"].name == "test.eval.items.jsonl"
    assert report_paths("report")["confusion_png"] == Path("report.confusion.png")


def test_training_draws_its_loss_curve(tmp_path):
    pytest.importorskip("torch")
    from tests.test_trainer import make_trainer, toy_data

    trainer = make_trainer(tmp_path, toy_data(16), max_steps=6, warmup_steps=0)
    trainer.fit(progress=False)
    assert (tmp_path / "train_log.jsonl").exists()
    assert_png(tmp_path / "train_loss.png")


def test_loss_curve_reads_a_resumed_log_and_val_metrics(tmp_path):
    pytest.importorskip("matplotlib")
    from cascade.plots import loss_curve_png, read_log

    log = tmp_path / "train_log.jsonl"
    entries = [{"step": s, "loss": 5.0 / s} for s in range(1, 7)] + [{"step": 6, "val_accuracy": 0.4, "val_loss": 1.0}]
    entries += [{"step": s, "loss": 4.0 / s} for s in (5, 6)]  # resumed from step 4: steps 5 and 6 again
    entries += [{"step": 6, "val_accuracy": 0.5, "val_loss": 0.9}]
    log.write_text("".join(json.dumps(e) + "\n" for e in entries))
    kept = read_log(log)
    assert [e["step"] for e in kept if "loss" in e] == [1, 2, 3, 4, 5, 6] and kept[5]["loss"] == 4.0 / 6
    assert [e["val_accuracy"] for e in kept if "val_accuracy" in e] == [0.5]
    assert_png(loss_curve_png(log))
    (tmp_path / "no_loss.jsonl").write_text(json.dumps({"step": 1, "val_accuracy": 0.1}) + "\n")
    assert loss_curve_png(tmp_path / "no_loss.jsonl") is None
