"""`cascade rules check`: how precise each rule is, how much the pack covers, where rules clash.

On an extraction dataset (task `extract` or `joint`) a rule's answer is its label *and* the
fields its named groups capture, so the report adds, per rule and for the pack, the precision
under the task's metric (`cascade.metrics.answer_key`: for joint, label and fields both right
after normalisation; for extract, fields exact match), and per field the span precision/recall
of the pack's extractions on the items it answered, plus the recall over all items.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

from cascade.data import Example
from cascade.metrics import answer_key, default_metric, span_scores
from cascade.rules.pack import RulePack, decide, match_text


@dataclass
class RuleRow:
    index: int
    label: str
    pattern: str
    support: int = 0  # texts the rule matches
    correct: int = 0  # ...whose gold label is the rule's label
    task_correct: int = 0  # ...where its whole answer is right under the task's metric

    @property
    def precision(self) -> float | None:
        return self.correct / self.support if self.support else None


def check_pack(pack: RulePack, examples: list[Example], timeout_s: float = 0.02, task: str = "classify",
               field_names: list[str] | tuple[str, ...] = (), metric: str | None = None) -> dict:
    """Score every rule and the pack as a whole on labelled examples.

    Args:
        task: the dataset's kind (labels.json "task"); `extract`/`joint` add the extraction keys.
        field_names: the task's fields, so that fields the pack never extracts are reported too.
        metric: what a right answer is (default: the task's, `cascade.metrics.default_metric`).

    Returns a JSON-ready dict: `precision` (label precision over the texts the pack answers),
    `coverage` (share answered), `answered`, `n`, `timeouts`, `conflict_texts` (texts left
    unanswered because equal-priority rules disagree), `rules` (per-rule support/precision/top
    wrong labels) and `conflicts` (pairs of rules with different labels matching the same
    texts). For an extraction task also `task`, `metric`, `task_precision` (answers right under
    `metric`), per rule `task_precision` and `label_precision`, and `fields`: micro and per-field
    span precision/recall/f1 on the answered texts, with `recall_all`/`support_all` over every
    text (a text the pack leaves alone extracts nothing). On an extract task, whose gold has no
    label, the label precisions are None.
    """
    extract = task != "classify"
    metric = metric or default_metric(task)
    rows = {r.index: RuleRow(r.index, r.label, r.pattern) for r in pack.rules}
    answered_task_correct = 0
    pred_fields: list[dict | None] = []  # per text: the pack's extraction ({} when it abstains)
    wrong: dict[int, Counter] = defaultdict(Counter)
    pair_counts: Counter = Counter()
    pair_same_priority: dict[tuple[int, int], bool] = {}
    outcomes: Counter = Counter()
    answered_correct = 0
    for ex in examples:
        matches = match_text(pack, ex.text, timeout_s)
        decision = decide(matches)
        outcomes[decision.outcome] += 1
        if decision.match is not None and decision.match.rule.label == ex.label:
            answered_correct += 1
        if extract:
            gold_key = answer_key(metric, ex.label, ex.fields)
            won = decision.match
            pred_fields.append(won.fields if won is not None else None)
            if won is not None and answer_key(metric, won.rule.label, won.fields) == gold_key:
                answered_task_correct += 1
        for m in matches.matches:
            row = rows[m.rule.index]
            row.support += 1
            if m.rule.label == ex.label:
                row.correct += 1
            else:
                wrong[m.rule.index][ex.label] += 1
            if extract and answer_key(metric, m.rule.label, m.fields) == gold_key:
                row.task_correct += 1
        for a in range(len(matches.matches)):
            for b in range(a + 1, len(matches.matches)):
                ra, rb = matches.matches[a].rule, matches.matches[b].rule
                if ra.label != rb.label:
                    key = (ra.index, rb.index)
                    pair_counts[key] += 1
                    pair_same_priority[key] = ra.priority == rb.priority
    n = len(examples)
    answered = outcomes["answered"]
    by_index = {r.index: r for r in pack.rules}
    report = {
        "pack": pack.name,
        "n": n,
        "answered": answered,
        "coverage": answered / n if n else 0.0,
        "precision": answered_correct / answered if answered else None,
        "timeouts": outcomes["timeout"],
        "conflict_texts": outcomes["conflict"],
        "rules": [
            {
                "index": row.index,
                "label": row.label,
                "pattern": row.pattern,
                "support": row.support,
                "precision": row.precision,
                "wrong_labels": dict(wrong[row.index].most_common(3)),
            }
            for row in rows.values()
        ],
        "conflicts": [
            {
                "rules": list(key),
                "labels": [by_index[key[0]].label, by_index[key[1]].label],
                "texts": count,
                # Equal priority: the pack abstains on these texts; otherwise priority decides.
                "same_priority": pair_same_priority[key],
            }
            for key, count in pair_counts.most_common()
        ],
    }
    if extract:
        labelled = task != "extract"
        report.update(task=task, metric=metric,
                      task_precision=answered_task_correct / answered if answered else None,
                      fields=field_report(examples, pred_fields, list(field_names)))
        if not labelled:
            report["precision"] = None
        for r in report["rules"]:
            row = rows[r["index"]]
            r["label_precision"] = r["precision"] if labelled else None
            r["task_precision"] = row.task_correct / row.support if row.support else None
            if not labelled:
                r["precision"], r["wrong_labels"] = None, {}
    return report


def field_report(examples: list[Example], pred_fields: list[dict | None], names: list[str]) -> dict:
    """Span scores of a pack's extractions: precision and recall on the texts it answered
    (`pred_fields[i]` not None), and recall over every text."""
    answered = [i for i, p in enumerate(pred_fields) if p is not None]
    on = span_scores([examples[i].fields for i in answered], [pred_fields[i] for i in answered], names)
    every = span_scores([ex.fields for ex in examples], [p or {} for p in pred_fields], names)
    per_field = {}
    for name, s in every["per_field"].items():
        a = on["per_field"].get(name, {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0, "predicted": 0})
        per_field[name] = {"precision": a["precision"] if a["predicted"] else None, "recall": a["recall"],
                           "f1": a["f1"], "predicted": a["predicted"], "support": a["support"],
                           "recall_all": s["recall"], "support_all": s["support"]}
    return {"span_precision": on["span_precision"] if any(p for p in pred_fields if p) else None,
            "span_recall": on["span_recall"], "span_f1": on["span_f1"], "span_recall_all": every["span_recall"],
            "exact_match": on["exact_match"] if answered else None, "per_field": per_field}


def _num(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def format_check(report: dict, max_rows: int = 40) -> str:
    if "metric" in report:
        return format_extraction_check(report, max_rows)
    prec = "-" if report["precision"] is None else f"{report['precision']:.4f}"
    lines = [
        f"pack {report['pack']}: {report['n']} texts, answered {report['answered']} "
        f"(coverage {report['coverage']:.3f}), precision {prec}, "
        f"timeouts {report['timeouts']}, conflicting texts {report['conflict_texts']}",
        f"{'rule':>5}  {'label':<28}{'support':>8}{'precision':>10}  pattern",
    ]
    # Worst rules first: they are the ones to review.
    rows = sorted(report["rules"], key=lambda r: (r["precision"] if r["precision"] is not None else 2.0, -r["support"]))
    for r in rows[:max_rows]:
        p = "-" if r["precision"] is None else f"{r['precision']:.3f}"
        lines.append(f"{r['index']:>5}  {r['label'][:27]:<28}{r['support']:>8}{p:>10}  {r['pattern']}")
    lines += _more_and_conflicts(report, len(rows), max_rows)
    return "\n".join(lines)


def format_extraction_check(report: dict, max_rows: int = 40) -> str:
    f = report["fields"]
    lines = [
        f"pack {report['pack']}: {report['n']} texts ({report['task']}), answered {report['answered']} "
        f"(coverage {report['coverage']:.3f}), {report['metric']} precision {_num(report['task_precision'], 4)}, "
        f"label precision {_num(report['precision'], 4)}, timeouts {report['timeouts']}, "
        f"conflicting texts {report['conflict_texts']}",
        f"fields on answered texts: span precision {_num(f['span_precision'], 4)}, recall {_num(f['span_recall'], 4)}; "
        f"recall over all texts {_num(f['span_recall_all'], 4)}",
        f"{'rule':>5}  {'label':<24}{'support':>8}{report['metric']:>12}{'label':>7}  pattern",
    ]
    # Worst rules first, under the task's metric.
    rows = sorted(report["rules"], key=lambda r: (2.0 if r["task_precision"] is None else r["task_precision"],
                                                  -r["support"]))
    for r in rows[:max_rows]:
        lines.append(f"{r['index']:>5}  {r['label'][:23]:<24}{r['support']:>8}{_num(r['task_precision']):>12}"
                     f"{_num(r['label_precision']):>7}  {_short(r['pattern'])}")
    lines += _more_and_conflicts(report, len(rows), max_rows)
    lines.append(f"{'field':<28}{'predicted':>10}{'precision':>10}{'recall':>8}{'support':>8}"
                 f"{'recall_all':>11}{'support_all':>12}")
    for name, s in f["per_field"].items():
        lines.append(f"{name[:27]:<28}{s['predicted']:>10}{_num(s['precision']):>10}{s['recall']:>8.3f}"
                     f"{s['support']:>8}{s['recall_all']:>11.3f}{s['support_all']:>12}")
    return "\n".join(lines)


def _short(pattern: str, width: int = 100) -> str:
    # Template patterns carry value lists hundreds of characters long: the JSON has them whole.
    return pattern if len(pattern) <= width else pattern[:width - 3] + "..."


def _more_and_conflicts(report: dict, n_rows: int, max_rows: int) -> list[str]:
    lines = []
    if n_rows > max_rows:
        lines.append(f"  ... {n_rows - max_rows} more rules (all in --json)")
    if report["conflicts"]:
        lines.append("conflicts (rules with different labels matching the same texts):")
        for c in report["conflicts"][:20]:
            how = "abstains" if c["same_priority"] else "priority decides"
            lines.append(f"  rules {c['rules'][0]} ({c['labels'][0]}) vs {c['rules'][1]} ({c['labels'][1]}): "
                         f"{c['texts']} texts, {how}")
    return lines
