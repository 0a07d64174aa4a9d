"""Classification and routing metrics: pure functions over gold labels and predictions."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

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
    for row in report["tiers"]:
        row.update(tier_latency_and_calibration(gold, preds, row["name"]))
    answered = set(tier_names)
    report["latency_ms"] = latency_summary([p.latency_ms for p in preds if p.tier in answered])
    report["per_label"] = per_label_scores(gold, labels)
    report["confusion"] = confusion_summary(gold, labels)
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


# --- per-label scores, confusion, latency and calibration (numpy; the eval reports read them) ---


def _confusion_counts(gold: Sequence[str], pred: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Every label seen in gold or predictions (sorted) and the counts [gold, pred] over them."""
    labels = sorted(set(gold) | set(pred))
    index = {lab: k for k, lab in enumerate(labels)}
    counts = np.zeros((len(labels), len(labels)), dtype=np.int64)
    np.add.at(counts, ([index[g] for g in gold], [index[p] for p in pred]), 1)
    return labels, counts


def per_label_scores(gold: Sequence[str], pred: Sequence[str], no_answer: str = "") -> list[dict]:
    """Per label: precision, recall, F1 (0.0 where undefined, as `precision_recall_f1`), support
    (gold count) and predicted count; worst F1 first (then the larger support, then the name).
    `no_answer` (the label an item without an answer is scored under) gets no row: such an
    item counts against its gold label's recall only."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    labels, counts = _confusion_counts(gold, pred)
    tp = np.diag(counts).astype(float)
    support, predicted = counts.sum(axis=1), counts.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    rows = [{"label": lab, "precision": float(precision[k]), "recall": float(recall[k]), "f1": float(f1[k]),
             "support": int(support[k]), "predicted": int(predicted[k])}
            for k, lab in enumerate(labels) if lab != no_answer]
    rows.sort(key=lambda r: (r["f1"], -r["support"], r["label"]))
    return rows


def confusion_summary(gold: Sequence[str], pred: Sequence[str], top: int = 15, no_answer: str = "") -> dict:
    """The confusion matrix restricted to the `top` labels with the most off-diagonal mass (items
    of the label answered wrong, plus items answered the label wrongly), most confused first.

    Returns:
        {"labels": [...], "matrix": rows of counts (row: gold, column: predicted),
         "support": each label's gold count over the whole split}. Empty lists without errors.
    """
    labels, counts = _confusion_counts(gold, pred)
    off = counts - np.diag(np.diag(counts))
    mass = off.sum(axis=0) + off.sum(axis=1)
    keep = [k for k in np.argsort(-mass, kind="stable") if mass[k] > 0 and labels[k] != no_answer][:top]
    return {"labels": [labels[k] for k in keep],
            "matrix": counts[np.ix_(keep, keep)].tolist() if keep else [],
            "support": [int(counts[k].sum()) for k in keep]}


def latency_summary(ms: Sequence[float]) -> dict | None:
    """p50/p95/p99/mean/max of per-item milliseconds (None for no items)."""
    if not len(ms):
        return None
    x = np.asarray(ms, dtype=float)
    p50, p95, p99 = np.percentile(x, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "mean": float(x.mean()),
            "max": float(x.max())}


def reliability_bins(confidence: Sequence[float], correct: Sequence[bool], n_bins: int = 10) -> list[dict]:
    """Equal-width confidence bins over [0, 1]: per bin its range, item count, mean confidence
    and accuracy (None where empty). A confidence of exactly 1.0 falls in the last bin."""
    conf = np.clip(np.asarray(confidence, dtype=float), 0.0, 1.0)
    hit = np.asarray(correct, dtype=float)
    which = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    bins = []
    for b in range(n_bins):
        inside = which == b
        n = int(inside.sum())
        bins.append({"lo": b / n_bins, "hi": (b + 1) / n_bins, "n": n,
                     "confidence": float(conf[inside].mean()) if n else None,
                     "accuracy": float(hit[inside].mean()) if n else None})
    return bins


def expected_calibration_error(bins: Sequence[dict]) -> float | None:
    """ECE: the item-weighted mean |accuracy - confidence| over the bins (None for no items)."""
    total = sum(b["n"] for b in bins)
    if not total:
        return None
    return sum(b["n"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins if b["n"])


def tier_latency_and_calibration(gold: Sequence[str], preds: Sequence[Prediction], name: str) -> dict:
    """For the items tier `name` answered: latency percentiles (each item's `latency_ms`, its
    time across every tier it went through), the reliability bins and their ECE."""
    idx = [i for i, p in enumerate(preds) if p.tier == name]
    bins = reliability_bins([preds[i].confidence for i in idx], [preds[i].label == gold[i] for i in idx])
    return {"latency_ms": latency_summary([preds[i].latency_ms for i in idx]),
            "ece": expected_calibration_error(bins), "reliability": bins}


# --- extraction ------------------------------------------------------------------------------
# Span metrics compare (field, normalised value) multisets per item (cascade.fields): a
# predicted value counts once per gold occurrence it matches; the type must match exactly.


def span_scores(gold: Sequence[dict | None], pred: Sequence[dict | None], names: Sequence[str] = ()) -> dict:
    """Micro precision/recall/F1 over every (field, value) and per field, and whole-item
    exact match. `names` adds fields that never occur (they report zero support)."""
    from cascade.fields import value_multiset

    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold items but {len(pred)} predictions")
    tp: dict[str, int] = {}
    n_pred: dict[str, int] = {}
    n_gold: dict[str, int] = {}
    exact = 0
    for g, p in zip(gold, pred):
        gm, pm = value_multiset(g), value_multiset(p)
        exact += gm == pm
        for (name, _), c in gm.items():
            n_gold[name] = n_gold.get(name, 0) + c
        for (name, v), c in pm.items():
            n_pred[name] = n_pred.get(name, 0) + c
            tp[name] = tp.get(name, 0) + min(c, gm.get((name, v), 0))

    def prf(t: int, np_: int, ng: int) -> dict:
        precision = t / np_ if np_ else 0.0
        recall = t / ng if ng else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {"precision": precision, "recall": recall, "f1": f1, "support": ng, "predicted": np_}

    fields = sorted(set(names) | set(n_gold) | set(n_pred))
    per_field = {name: prf(tp.get(name, 0), n_pred.get(name, 0), n_gold.get(name, 0)) for name in fields}
    micro = prf(sum(tp.values()), sum(n_pred.values()), sum(n_gold.values()))
    return {"span_precision": micro["precision"], "span_recall": micro["recall"], "span_f1": micro["f1"],
            "exact_match": exact / len(gold) if gold else 0.0, "per_field": per_field}


METRICS = {"classify": ("accuracy",), "extract": ("exact_match",), "joint": ("joint", "exact_match", "accuracy")}


def default_metric(task: str) -> str:
    """What calibration's target is by default: label accuracy, fields exact match, or both right."""
    return METRICS[task][0]


def answer_key(metric: str, label: str | None, fields: dict | None):
    """A hashable form of an answer such that two answers are equal under `metric` exactly when
    their keys are: the calibration and routing code compares keys as it compared labels."""
    from cascade.fields import value_multiset

    if metric == "accuracy":
        return label
    key = tuple(sorted(value_multiset(fields).items()))
    return key if metric == "exact_match" else (label, key)


def item_correct(metric: str, gold_label: str | None, gold_fields: dict | None, pred: Prediction) -> bool:
    return answer_key(metric, pred.label, pred.fields) == answer_key(metric, gold_label, gold_fields)
