"""The Markdown report `cascade eval` writes beside its JSON: the summary, the per-tier table,
the most confused labels, and the calibration frontier plot when `cascade calibrate` made one."""

from __future__ import annotations

import os
from pathlib import Path


def _f(x, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def markdown_report(report: dict, out: str | Path) -> Path:
    out = Path(out)
    lines = [f"# Cascade evaluation: {Path(report.get('config', '')).name or 'cascade'} on "
             f"{report.get('split', '?')}", "",
             f"- items: {report['n']}", f"- accuracy: {report['accuracy']:.4f} (macro-F1 {report['macro_f1']:.4f})",
             f"- large-model share: {report['llm_share']:.3f}", f"- throughput: {report['items_per_s']:.0f} items/s",
             f"- degraded answers: {report.get('degraded', 0)}"]
    if "oos_recall" in report:
        lines.append(f"- out-of-scope precision {report['oos_precision']:.4f}, recall {report['oos_recall']:.4f}")
    ext = report.get("extraction")
    if ext:
        lines.append(f"- fields: span precision {ext['span_precision']:.4f}, recall {ext['span_recall']:.4f}, "
                     f"F1 {ext['span_f1']:.4f}; exact match {ext['exact_match']:.4f}; "
                     f"{ext['metric']} (calibration's metric) {ext['score']:.4f}")
    if "baseline" in report:
        b = report["baseline"]
        lines.append(f"- **{b['tier']} alone**: accuracy {b['accuracy']:.4f}, {b['items_per_s']:.0f} items/s "
                     f"(the cascade: {report['items_per_s'] / max(b['items_per_s'], 1e-9):.1f}x the throughput)"
                     + (f"; span F1 {b['extraction']['span_f1']:.4f}, exact match "
                        f"{b['extraction']['exact_match']:.4f}" if b.get("extraction") else ""))
    if ext:
        lines += ["", "## Tiers", "", "| tier | share | accuracy on its answers | span F1 | exact match | "
                  "mean ms per item seen |", "|---|---:|---:|---:|---:|---:|"]
        for row in report["tiers"]:
            lines.append(f"| {row['name']} | {row['share']:.3f} | {_f(row['accuracy'])} | {_f(row.get('span_f1'))} | "
                         f"{_f(row.get('exact_match'))} | {row['mean_ms']:.3f} |")
        lines += ["", "## Fields", "", "| field | precision | recall | F1 | support | predicted |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {name} | {r['precision']:.4f} | {r['recall']:.4f} | {r['f1']:.4f} | {r['support']} | "
                  f"{r['predicted']} |" for name, r in sorted(ext["per_field"].items(), key=lambda kv: kv[1]["f1"])]
    else:
        lines += ["", "## Tiers", "", "| tier | share | accuracy on its answers | mean ms per item seen |",
                  "|---|---:|---:|---:|"]
        for row in report["tiers"]:
            lines.append(f"| {row['name']} | {row['share']:.3f} | {_f(row['accuracy'])} | {row['mean_ms']:.3f} |")
    pairs = report.get("confused_pairs") or []
    if pairs:
        lines += ["", "## Most confused labels", "", "| gold | predicted | count |", "|---|---|---:|"]
        lines += [f"| {p['gold']} | {p['pred']} | {p['count']} |" for p in pairs]
    config = report.get("config")
    if config:
        plot = Path(config).with_suffix("").as_posix() + ".frontier.png"
        if Path(plot).exists():
            rel = os.path.relpath(plot, out.parent)
            lines += ["", "## Calibration frontier", "", f"![accuracy against large-model share and cost]({rel})"]
        else:
            lines += ["", "## Calibration frontier", "",
                      f"(none yet: `cascade calibrate --config {config} --data DIR --target-accuracy llm` draws it)"]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out
