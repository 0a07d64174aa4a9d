"""`cascade eval`: run a cascade over a labelled split and report accuracy, shares and speed."""

from __future__ import annotations

import time
from pathlib import Path

from cascade.config import CascadeConfig, build_cascade, load_config
from cascade.data import load_labels, load_split
from cascade.metrics import classification_report
from cascade.router import Cascade

# Tier kinds that count as "the large model" for `llm_share`.
LLM_KINDS = frozenset({"llm"})


def predict_timed(cascade: Cascade, texts: list[str], batch_size: int = 256) -> tuple[list, float]:
    """Route `texts` in batches of `batch_size`: the answers and the wall seconds they took."""
    preds = []
    t0 = time.perf_counter()
    for start in range(0, len(texts), batch_size):
        preds.extend(cascade.predict_batch(texts[start:start + batch_size]))
    return preds, time.perf_counter() - t0


def evaluate(cascade: Cascade, config: CascadeConfig, texts: list[str], gold: list[str],
             oos_label: str | None = None, batch_size: int = 256) -> dict:
    """Route `texts` in batches of `batch_size` and score the answers against `gold`."""
    preds, seconds = predict_timed(cascade, texts, batch_size)
    names = [t.name for t in cascade.tiers]
    llm = [spec.name for spec in config.tiers if spec.kind in LLM_KINDS and spec.name in names]
    report = classification_report(gold, preds, names, seconds, oos_label, llm,
                                   {name: c.mean_ms for name, c in cascade.counters.items()})
    for row, tier in zip(report["tiers"], cascade.tiers):
        stats = getattr(tier, "stats", None)
        if callable(stats):
            row.update(stats())
        row["errors"] = cascade.counters[tier.name].errors
    return report


def run_eval(config_path: str | Path, data_dir: str | Path, split: str = "test",
             baseline: bool = False, batch_size: int = 256, limit: int | None = None) -> dict:
    """Evaluate the configured cascade; with `baseline`, also its last tier alone."""
    config_path = Path(config_path)
    config = load_config(config_path)
    examples = load_split(data_dir, split)
    if limit is not None:
        examples = examples[:limit]
    label_set = load_labels(data_dir)
    texts = [ex.text for ex in examples]
    gold = [ex.label for ex in examples]
    cascade = build_cascade(config, config_path.parent)
    report = evaluate(cascade, config, texts, gold, label_set.oos_label, batch_size)
    report.update({"split": split, "data": str(data_dir), "config": str(config_path)})
    if baseline:
        last = cascade.tiers[-1]
        alone = Cascade([last], [0.0])
        report["baseline"] = evaluate(alone, config, texts, gold, label_set.oos_label, batch_size)
        report["baseline"]["tier"] = last.name
    return report


def format_report(report: dict) -> str:
    """A plain-text table for the terminal."""
    lines = [
        f"{report['n']} items  accuracy {report['accuracy']:.4f}  macro-F1 {report['macro_f1']:.4f}  "
        f"llm share {report['llm_share']:.3f}  {report['items_per_s']:.0f} items/s",
    ]
    if "oos_recall" in report:
        lines.append(f"out-of-scope precision {report['oos_precision']:.4f}  recall {report['oos_recall']:.4f}")
    lines.append(f"{'tier':<16}{'share':>8}{'accuracy':>10}{'mean ms':>10}")
    for row in report["tiers"]:
        acc = "-" if row["accuracy"] is None else f"{row['accuracy']:.4f}"
        lines.append(f"{row['name']:<16}{row['share']:>8.3f}{acc:>10}{row['mean_ms']:>10.3f}")
    if "baseline" in report:
        b = report["baseline"]
        lines.append(f"baseline ({b['tier']} alone): accuracy {b['accuracy']:.4f}  macro-F1 {b['macro_f1']:.4f}  "
                     f"{b['items_per_s']:.0f} items/s")
    return "\n".join(lines)
