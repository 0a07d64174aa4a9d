"""`cascade eval`: run a cascade over a labelled split and report accuracy, shares and speed."""

from __future__ import annotations

import time
from pathlib import Path

from cascade.config import CascadeConfig, build_cascade, load_config
from cascade.data import load_labels, load_split
from cascade.metrics import classification_report
from cascade.router import Cascade
from cascade.textcheck import TextError, clean_text
from cascade.types import ItemFailure, Prediction

# Tier kinds that count as "the large model" for `llm_share`.
LLM_KINDS = frozenset({"llm"})
FAILED = "(no answer)"  # the tier name a failed item is scored under


def predict_timed(cascade: Cascade, texts: list[str], batch_size: int = 256
                  ) -> tuple[list[Prediction | ItemFailure], float]:
    """Route `texts` in batches of `batch_size`: per text a Prediction (or the ItemFailure of a
    text that got none: refused by `clean_text`, or failed alone in a tier), and the wall
    seconds they took. One bad text costs its own answer, never its batch's."""
    answers: list[Prediction | ItemFailure | None] = [None] * len(texts)
    clean: list[tuple[int, str]] = []
    for i, text in enumerate(texts):
        try:
            clean.append((i, clean_text(text, f"item {i}")))
        except TextError as exc:
            answers[i] = ItemFailure(exc.code, str(exc))
    t0 = time.perf_counter()
    for start in range(0, len(clean), batch_size):
        chunk = clean[start:start + batch_size]
        for (i, _), answer in zip(chunk, cascade.answer_batch([t for _, t in chunk])):
            answers[i] = answer
    return answers, time.perf_counter() - t0


def as_predictions(answers: list[Prediction | ItemFailure]) -> tuple[list[Prediction], list[dict]]:
    """Answers as Predictions for scoring (an item without one scores as wrong, under the tier
    name FAILED), and the failures, each with its index, code and message."""
    preds, failed = [], []
    for i, a in enumerate(answers):
        if isinstance(a, ItemFailure):
            failed.append({"index": i, "code": a.code, "message": a.message})
            preds.append(Prediction("", 0.0, FAILED))
        else:
            preds.append(a)
    return preds, failed


def evaluate(cascade: Cascade, config: CascadeConfig, texts: list[str], gold: list[str],
             oos_label: str | None = None, batch_size: int = 256) -> dict:
    """Route `texts` in batches of `batch_size` and score the answers against `gold`."""
    answers, seconds = predict_timed(cascade, texts, batch_size)
    preds, failed = as_predictions(answers)
    names = [t.name for t in cascade.tiers]
    llm = [spec.name for spec in config.tiers if spec.kind in LLM_KINDS and spec.name in names]
    report = classification_report(gold, preds, names, seconds, oos_label, llm,
                                   {name: c.mean_ms for name, c in cascade.counters.items()})
    for row, tier in zip(report["tiers"], cascade.tiers):
        stats = getattr(tier, "stats", None)
        if callable(stats):
            row.update(stats())
        row["errors"] = cascade.counters[tier.name].errors
        row["item_errors"] = cascade.counters[tier.name].item_errors
    report["failed"] = len(failed)
    report["failures"] = failed[:50]  # the first ones, with their index: enough to find the rest
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
