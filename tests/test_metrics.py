import pytest

from cascade.metrics import accuracy, classification_report, macro_f1, precision_recall_f1, tier_breakdown
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
