"""`cascade eval`: run a cascade over a labelled split and report accuracy, shares and speed."""

from __future__ import annotations

import json
import time
from pathlib import Path

from cascade.config import CascadeConfig, build_cascade, load_config
from cascade.data import load_labels, load_split, seeded_sample
from cascade.metrics import classification_report, item_correct, span_scores
from cascade.progress import Progress
from cascade.router import Cascade
from cascade.textcheck import TextError, clean_text
from cascade.types import ItemFailure, Prediction

# Tier kinds that count as "the large model" for `llm_share`.
LLM_KINDS = frozenset({"llm"})
FAILED = "(no answer)"  # the tier name a failed item is scored under


def predict_timed(cascade: Cascade, texts: list[str], batch_size: int = 256, progress: Progress | None = None
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
        if progress is not None:
            progress.update(len(chunk))
    return answers, time.perf_counter() - t0


def answers_changed(first: list[Prediction], again: list[Prediction]) -> int:
    """How many items a later pass over the same texts answered differently (label or tier) from
    the first: benchmarks score the first pass and count these, since the bf16 large model's
    answers move with the shape of the step they ran in (docs/engine.md "Answers and batch shape")."""
    if len(first) != len(again):
        raise ValueError(f"passes of {len(first)} and {len(again)} answers: not the same texts")
    return sum((p.label, p.tier) != (q.label, q.tier) for p, q in zip(first, again))


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


def item_rows(texts: list[str], gold: list[str], answers: list[Prediction | ItemFailure],
              ids: list[str] | None = None, gold_fields: list[dict] | None = None,
              metric: str = "accuracy") -> list[dict]:
    """One row per item, in order, for the `.items.jsonl` report: what it was, what it got, from
    which tier, how sure and how fast; an item without an answer carries its error instead.
    `correct` is under the task's `metric`; extraction rows carry their fields and the gold's."""
    rows = []
    for i, (text, g, a) in enumerate(zip(texts, gold, answers)):
        row = {"index": i, "id": ids[i] if ids else str(i), "text": text, "gold": g}
        gf = gold_fields[i] if gold_fields is not None else None
        if gold_fields is not None:
            row["gold_fields"] = gf
        if isinstance(a, ItemFailure):
            row.update({"label": None, "tier": None, "confidence": None, "correct": False, "degraded": False,
                        "latency_ms": None, "error": {"code": a.code, "message": a.message, "tier": a.tier}})
        else:
            row.update({"label": a.label, "tier": a.tier, "confidence": a.confidence,
                        "correct": item_correct(metric, g, gf, a), "degraded": a.degraded,
                        "latency_ms": a.latency_ms})
            if gold_fields is not None:
                row["fields"] = a.fields or {}
        rows.append(row)
    return rows


def extraction_report(gold: list[str], gold_fields: list[dict], preds: list[Prediction], tier_names: list[str],
                      metric: str, field_names: list[str] = ()) -> dict:
    """Span P/R/F1 (micro and per field) and exact match over all items and per tier, and the
    share of items right under the task's metric (what calibration holds to its target)."""
    out = span_scores(gold_fields, [p.fields for p in preds], field_names)
    right = [item_correct(metric, g, gf, p) for g, gf, p in zip(gold, gold_fields, preds)]
    out["metric"] = metric
    out["score"] = sum(right) / len(right) if right else 0.0
    out["joint_accuracy"] = (sum(item_correct("joint", g, gf, p) for g, gf, p in zip(gold, gold_fields, preds))
                             / len(preds) if preds else 0.0)
    per_tier = {}
    for name in tier_names:
        idx = [i for i, p in enumerate(preds) if p.tier == name]
        if idx:
            s = span_scores([gold_fields[i] for i in idx], [preds[i].fields for i in idx])
            per_tier[name] = {"span_f1": s["span_f1"], "exact_match": s["exact_match"],
                              "score": sum(right[i] for i in idx) / len(idx)}
    out["tiers"] = per_tier
    return out


def evaluate(cascade: Cascade, config: CascadeConfig, texts: list[str], gold: list[str],
             oos_label: str | None = None, batch_size: int = 256, ids: list[str] | None = None,
             progress: bool = False, desc: str = "eval", gold_fields: list[dict] | None = None,
             field_names: list[str] = ()) -> tuple[dict, list[dict]]:
    """Route `texts` in batches of `batch_size` and score the answers against `gold` (and, for
    an extraction task, `gold_fields`: the report gains "extraction", `extraction_report`).

    Returns:
        The report (the keys of `cascade.metrics.classification_report`, per-tier counters,
        failures) and the per-item rows (`item_rows`).
    """
    with Progress(len(texts), desc, "item", enabled=progress) as bar:
        answers, seconds = predict_timed(cascade, texts, batch_size, bar)
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
    metric = config.task.target_metric
    if gold_fields is not None:
        report["extraction"] = extraction_report(gold, gold_fields, preds, names, metric, list(field_names))
        for row in report["tiers"]:
            row.update({k: v for k, v in report["extraction"]["tiers"].get(row["name"], {}).items()})
    return report, item_rows(texts, gold, answers, ids, gold_fields, metric)


def run_eval(config_path: str | Path, data_dir: str | Path, split: str = "test",
             baseline: bool = False, batch_size: int = 256, limit: int | None = None, progress: bool = False,
             seed: int = 0) -> tuple[dict, list[dict]]:
    """Evaluate the configured cascade; with `baseline`, also its last tier alone (its report
    under "baseline"). `limit`: at most that many items, a seeded sample (`seed`). Returns the
    report and the cascade's per-item rows."""
    config_path = Path(config_path)
    config = load_config(config_path)
    examples = seeded_sample(load_split(data_dir, split), limit, seed)
    label_set = load_labels(data_dir)
    texts = [ex.text for ex in examples]
    gold = [ex.label or "" for ex in examples]
    extract = config.task.kind != "classify"
    if extract and label_set.task == "classify":
        raise ValueError(f"{config_path}: task.kind is {config.task.kind!r} but {data_dir} is a classify "
                         "dataset (no fields in labels.json)")
    gold_fields = [ex.fields or {} for ex in examples] if extract else None
    ext = {"gold_fields": gold_fields, "field_names": label_set.fields}
    cascade = build_cascade(config, config_path.parent)
    report, items = evaluate(cascade, config, texts, gold, label_set.oos_label, batch_size,
                             [ex.id for ex in examples], progress=progress, desc=f"eval {split}", **ext)
    report.update({"task": config.task.name, "split": split, "data": str(data_dir), "config": str(config_path)})
    if baseline:
        last = cascade.tiers[-1]
        alone = Cascade([last], [0.0])
        report["baseline"], _ = evaluate(alone, config, texts, gold, label_set.oos_label, batch_size,
                                         progress=progress, desc=f"eval {split}, {last.name} alone", **ext)
        report["baseline"]["tier"] = last.name
    return report, items


# --- the report files ----------------------------------------------------------------------


def report_paths(json_path: str | Path) -> dict[str, Path]:
    """The files written beside `--json PATH`: eval.json -> eval.md, eval.items.jsonl,
    eval.confusion.png, eval.reliability.png."""
    json_path = Path(json_path)
    stem = json_path.with_suffix("") if json_path.suffix == ".json" else json_path
    return {"json": json_path, "markdown": stem.with_name(stem.name + ".md"),
            "items": stem.with_name(stem.name + ".items.jsonl"),
            "confusion_png": stem.with_name(stem.name + ".confusion.png"),
            "reliability_png": stem.with_name(stem.name + ".reliability.png")}


def write_reports(report: dict, items: list[dict], json_path: str | Path, top_labels: int = 20
                  ) -> dict[str, Path | None]:
    """Write the JSON report and everything beside it (`report_paths`): the per-item JSONL, the
    two figures (None where skipped: no matplotlib, or nothing to draw) and the Markdown, whose
    per-label table shows the `top_labels` worst (the JSON has them all). The JSON gets a
    "files" key naming what was written, relative to it."""
    from cascade import plots
    from cascade.report import markdown_report

    paths = report_paths(json_path)
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    with paths["items"].open("w", encoding="utf-8") as f:
        for row in items:
            f.write(json.dumps(row) + "\n")  # ASCII escapes: a lone surrogate in a text still writes
    title = report_title(report)
    written: dict[str, Path | None] = dict(paths)
    written["confusion_png"] = plots.confusion_png(
        report["confusion"], paths["confusion_png"],
        f"Most-confused labels ({len(report['confusion']['labels'])}): {title}")
    written["reliability_png"] = plots.reliability_png(report["tiers"], paths["reliability_png"],
                                                       f"Reliability per tier: {title}")
    for key in ("confusion_png", "reliability_png"):  # a stale figure from an earlier run would mislead
        if written[key] is None:
            paths[key].unlink(missing_ok=True)
    report["files"] = {k: (None if p is None else p.name) for k, p in written.items() if k != "json"}
    paths["json"].write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    markdown_report(report, paths["markdown"])
    with paths["markdown"].open("a", encoding="utf-8") as f:
        f.write("\n".join(["", *detail_markdown(report, written, top_labels)]) + "\n")
    return written


def report_title(report: dict) -> str:
    """"<task> <split>, n=<items>" for the figures' titles (the dataset dir's name without a task)."""
    name = report.get("task") or (Path(report["data"]).name if report.get("data") else "?")
    return f"{name} {report.get('split', '?')}, n={report['n']}"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def detail_markdown(report: dict, files: dict[str, Path | None], top_labels: int = 20) -> list[str]:
    """The Markdown sections after `cascade.report.markdown_report`'s: latency and calibration
    per tier, the worst labels, the two figures and where the per-item rows are."""
    lines = ["## Latency and calibration per tier", "",
             "Latency: each answered item's milliseconds across every tier it went through (a batch's "
             "time shared among its items), by the tier that answered it. ECE: expected calibration "
             "error of that tier's confidence on its answers (10 bins).", "",
             "| tier | answered | p50 ms | p95 ms | p99 ms | ECE |", "|---|---:|---:|---:|---:|---:|"]
    for row in report["tiers"]:
        lat = row.get("latency_ms") or {}
        ece = "-" if row.get("ece") is None else f"{row['ece']:.3f}"
        lines.append(f"| {row['name']} | {row['answered']} | {_ms(lat.get('p50'))} | {_ms(lat.get('p95'))} | "
                     f"{_ms(lat.get('p99'))} | {ece} |")
    per_label = report["per_label"]
    shown = per_label[:top_labels]
    lines += ["", f"## Per label, worst F1 first ({len(shown)} of {len(per_label)}"
              + (f"; all in {files['json'].name} under per_label)" if len(shown) < len(per_label) else ")"), "",
              "| label | precision | recall | F1 | support | predicted |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['label']} | {r['precision']:.4f} | {r['recall']:.4f} | {r['f1']:.4f} | {r['support']} | "
              f"{r['predicted']} |" for r in shown]
    for key, heading, alt in (("confusion_png", "Confusion matrix", "confusion among the most-confused labels"),
                              ("reliability_png", "Reliability diagrams", "accuracy against confidence per tier")):
        lines += ["", f"## {heading}", ""]
        if files[key] is not None:
            lines.append(f"![{alt}]({files[key].name})")
        elif key == "confusion_png" and not report["confusion"]["labels"]:
            lines.append("(no errors to show)")
        elif key == "reliability_png" and not any(row["answered"] for row in report["tiers"]):
            lines.append("(no answers to show)")
        else:
            lines.append("(not drawn: matplotlib is not installed; `pip install 'cascade[plots]'`)")
    lines += ["", f"Every item's answer, tier, confidence and latency: `{files['items'].name}` (JSON lines, "
              "in the split's order; items without an answer carry their error)."]
    return lines


def format_report(report: dict) -> str:
    """A plain-text table for the terminal."""
    lines = [
        f"{report['n']} items  accuracy {report['accuracy']:.4f}  macro-F1 {report['macro_f1']:.4f}  "
        f"llm share {report['llm_share']:.3f}  {report['items_per_s']:.0f} items/s",
    ]
    if "oos_recall" in report:
        lines.append(f"out-of-scope precision {report['oos_precision']:.4f}  recall {report['oos_recall']:.4f}")
    if "extraction" in report:
        lines.append(extraction_line(report["extraction"]))
    lines.append(f"{'tier':<16}{'share':>8}{'accuracy':>10}{'mean ms':>10}")
    for row in report["tiers"]:
        acc = "-" if row["accuracy"] is None else f"{row['accuracy']:.4f}"
        lines.append(f"{row['name']:<16}{row['share']:>8.3f}{acc:>10}{row['mean_ms']:>10.3f}")
    if "baseline" in report:
        b = report["baseline"]
        lines.append(f"baseline ({b['tier']} alone): accuracy {b['accuracy']:.4f}  macro-F1 {b['macro_f1']:.4f}  "
                     f"{b['items_per_s']:.0f} items/s")
        if "extraction" in b:
            lines.append(f"baseline {extraction_line(b['extraction'])}")
    return "\n".join(lines)


def extraction_line(ext: dict) -> str:
    return (f"fields: span P {ext['span_precision']:.4f}  R {ext['span_recall']:.4f}  F1 {ext['span_f1']:.4f}  "
            f"exact match {ext['exact_match']:.4f}  {ext['metric']} {ext['score']:.4f}")
