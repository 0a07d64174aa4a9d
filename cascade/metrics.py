"""Classification and routing metrics: pure functions over gold labels and predictions."""

from __future__ import annotations

from collections.abc import Sequence

from cascade.types import Prediction


def accuracy(gold: Sequence[str], pred: Sequence[str]) -> float:
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    if not gold:
        return 0.0
    return sum(g == p for g, p in zip(gold, pred)) / len(gold)


def precision_recall_f1(gold: Sequence[str], pred: Sequence[str], label: str) -> tuple[float, float, float]:
    """Precision, recall and F1 of one label (0.0 where undefined, as scikit-learn does)."""
    tp = sum(g == label and p == label for g, p in zip(gold, pred))
    n_pred = sum(p == label for p in pred)
    n_gold = sum(g == label for g in gold)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def macro_f1(gold: Sequence[str], pred: Sequence[str]) -> float:
    """Unweighted mean F1 over every label that occurs in gold or predictions."""
    labels = sorted(set(gold) | set(pred))
    if not labels:
        return 0.0
    return sum(precision_recall_f1(gold, pred, lab)[2] for lab in labels) / len(labels)


def tier_breakdown(gold: Sequence[str], preds: Sequence[Prediction], tier_names: Sequence[str],
                   tier_mean_ms: dict[str, float] | None = None) -> list[dict]:
    """Per tier: share of items it answered, its accuracy on them, and its mean ms per item seen."""
    n = len(preds)
    rows = []
    for name in tier_names:
        idx = [i for i, p in enumerate(preds) if p.tier == name]
        answered = len(idx)
        rows.append({
            "name": name,
            "answered": answered,
            "share": answered / n if n else 0.0,
            "accuracy": (sum(preds[i].label == gold[i] for i in idx) / answered) if answered else None,
            "mean_ms": (tier_mean_ms or {}).get(name, 0.0),
        })
    return rows


def classification_report(gold: Sequence[str], preds: Sequence[Prediction], tier_names: Sequence[str],
                          seconds: float, oos_label: str | None = None,
                          llm_tiers: Sequence[str] = (), tier_mean_ms: dict[str, float] | None = None) -> dict:
    """The keys `cascade eval --json` promises (DESIGN.md § CLI contract)."""
    labels = [p.label for p in preds]
    report = {
        "n": len(preds),
        "accuracy": accuracy(gold, labels),
        "macro_f1": macro_f1(gold, labels),
        "tiers": tier_breakdown(gold, preds, tier_names, tier_mean_ms),
        "llm_share": sum(p.tier in set(llm_tiers) for p in preds) / len(preds) if preds else 0.0,
        "degraded": sum(p.degraded for p in preds),
        "items_per_s": len(preds) / seconds if seconds > 0 else float("inf"),
        "seconds": seconds,
    }
    report["confused_pairs"] = most_confused(gold, labels)
    if oos_label is not None:
        p, r, f = precision_recall_f1(gold, labels, oos_label)
        report.update({"oos_precision": p, "oos_recall": r, "oos_f1": f})
        in_scope = [i for i, g in enumerate(gold) if g != oos_label]
        report["in_scope_accuracy"] = (
            sum(labels[i] == gold[i] for i in in_scope) / len(in_scope) if in_scope else 0.0
        )
    return report


def most_confused(gold: Sequence[str], pred: Sequence[str], top: int = 10) -> list[dict]:
    """The most frequent (gold, predicted) error pairs, most frequent first."""
    from collections import Counter

    pairs = Counter((g, p) for g, p in zip(gold, pred) if g != p)
    return [{"gold": g, "pred": p, "count": c} for (g, p), c in pairs.most_common(top)]
