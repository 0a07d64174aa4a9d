import pytest

from cascade.metrics import (
    accuracy,
    classification_report,
    confusion_summary,
    expected_calibration_error,
    latency_summary,
    macro_f1,
    per_label_scores,
    precision_recall_f1,
    reliability_bins,
    tier_breakdown,
)
from cascade.types import Prediction

GOLD = ["a", "a", "b", "b", "oos", "oos"]
PRED = ["a", "b", "b", "b", "oos", "a"]


def test_accuracy_and_per_label_scores_by_hand():
    assert accuracy(GOLD, PRED) == pytest.approx(4 / 6)
    # label a: tp=1, predicted 2, gold 2 -> p=0.5, r=0.5, f1=0.5
    assert precision_recall_f1(GOLD, PRED, "a") == pytest.approx((0.5, 0.5, 0.5))
    # label b: tp=2, predicted 3, gold 2 -> p=2/3, r=1, f1=0.8
    assert precision_recall_f1(GOLD, PRED, "b") == pytest.approx((2 / 3, 1.0, 0.8))
    # oos: tp=1, predicted 1, gold 2 -> p=1, r=0.5, f1=2/3
    assert precision_recall_f1(GOLD, PRED, "oos") == pytest.approx((1.0, 0.5, 2 / 3))
    assert macro_f1(GOLD, PRED) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


def test_macro_f1_counts_labels_only_predicted():
    # "c" never occurs in gold but is predicted: it enters the mean with F1 0 (as scikit-learn).
    assert macro_f1(["a", "a"], ["a", "c"]) == pytest.approx((2 / 3 + 0.0) / 2)


def test_mismatched_lengths_are_an_error():
    with pytest.raises(ValueError):
        accuracy(["a"], [])


def test_tier_breakdown_and_report():
    preds = [Prediction(p, 0.9, "rules" if i < 2 else "llm") for i, p in enumerate(PRED)]
    rows = tier_breakdown(GOLD, preds, ["rules", "student", "llm"], {"rules": 0.1, "llm": 20.0})
    assert rows[0] == {"name": "rules", "answered": 2, "share": pytest.approx(1 / 3), "accuracy": 0.5, "mean_ms": 0.1}
    assert rows[1]["answered"] == 0 and rows[1]["accuracy"] is None
    assert rows[2]["accuracy"] == pytest.approx(3 / 4)
    report = classification_report(GOLD, preds, ["rules", "student", "llm"], seconds=2.0, oos_label="oos",
                                   llm_tiers=["llm"])
    assert report["llm_share"] == pytest.approx(4 / 6)
    assert report["items_per_s"] == pytest.approx(3.0)
    assert report["oos_precision"] == 1.0 and report["oos_recall"] == 0.5
    assert report["in_scope_accuracy"] == pytest.approx(3 / 4)
    assert [r["label"] for r in report["per_label"]] == ["a", "oos", "b"]
    assert [t["latency_ms"] is None for t in report["tiers"]] == [False, True, False]


def test_per_label_scores_by_hand_worst_f1_first():
    rows = per_label_scores(GOLD, PRED)
    assert [r["label"] for r in rows] == ["a", "oos", "b"]  # F1 0.5, 2/3, 0.8
    assert rows[0] == {"label": "a", "precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2, "predicted": 2}
    assert rows[1] == pytest.approx({"label": "oos", "precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2,
                                     "predicted": 1})
    assert rows[2] == pytest.approx({"label": "b", "precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2,
                                     "predicted": 3})
    for r in rows:  # the same numbers as the one-label function
        assert (r["precision"], r["recall"], r["f1"]) == pytest.approx(precision_recall_f1(GOLD, PRED, r["label"]))
    # an item without an answer (label "") counts against its gold label's recall, and gets no row
    assert per_label_scores(["a", "a"], ["a", ""]) == [
        {"label": "a", "precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2, "predicted": 1}]


def test_confusion_keeps_the_most_confused_labels():
    # errors: a->b and oos->a; off-diagonal mass a 2, b 1, oos 1
    assert confusion_summary(GOLD, PRED) == {"labels": ["a", "b", "oos"], "matrix": [[1, 1, 0], [0, 2, 0], [1, 0, 1]],
                                             "support": [2, 2, 2]}
    assert confusion_summary(GOLD, PRED, top=2) == {"labels": ["a", "b"], "matrix": [[1, 1], [0, 2]],
                                                    "support": [2, 2]}
    assert confusion_summary(["a", "b"], ["a", "b"]) == {"labels": [], "matrix": [], "support": []}


def test_reliability_bins_and_ece_by_hand():
    bins = reliability_bins([0.05, 0.15, 0.95, 1.0, 0.9], [False, True, True, True, False])
    assert [b["n"] for b in bins] == [1, 1, 0, 0, 0, 0, 0, 0, 0, 3]  # 1.0 lands in the last bin
    assert bins[9]["confidence"] == pytest.approx(0.95) and bins[9]["accuracy"] == pytest.approx(2 / 3)
    assert bins[2]["accuracy"] is None
    # 1/5 |0 - .05| + 1/5 |1 - .15| + 3/5 |2/3 - .95|
    assert expected_calibration_error(bins) == pytest.approx(0.01 + 0.17 + 0.17)
    assert expected_calibration_error(reliability_bins([], [])) is None


def test_latency_percentiles():
    assert latency_summary([1.0, 2.0, 3.0, 4.0]) == pytest.approx(
        {"p50": 2.5, "p95": 3.85, "p99": 3.97, "mean": 2.5, "max": 4.0})
    assert latency_summary([]) is None
