"""`cascade rules check`: how precise each rule is, how much the pack covers, where rules clash."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

from cascade.data import Example
from cascade.rules.pack import RulePack, decide, match_text


@dataclass
class RuleRow:
    index: int
    label: str
    pattern: str
    support: int = 0  # texts the rule matches
    correct: int = 0  # ...whose gold label is the rule's label

    @property
    def precision(self) -> float | None:
        return self.correct / self.support if self.support else None


def check_pack(pack: RulePack, examples: list[Example], timeout_s: float = 0.02) -> dict:
    """Score every rule and the pack as a whole on labelled examples.

    Returns a JSON-ready dict: `precision` (over the texts the pack answers), `coverage` (share
    answered), `answered`, `n`, `timeouts`, `conflict_texts` (texts left unanswered because
    equal-priority rules disagree), `rules` (per-rule support/precision/top wrong labels) and
    `conflicts` (pairs of rules with different labels matching the same texts).
    """
    rows = {r.index: RuleRow(r.index, r.label, r.pattern) for r in pack.rules}
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
        for m in matches.matches:
            row = rows[m.rule.index]
            row.support += 1
            if m.rule.label == ex.label:
                row.correct += 1
            else:
                wrong[m.rule.index][ex.label] += 1
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
    return {
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


def format_check(report: dict, max_rows: int = 40) -> str:
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
    if len(rows) > max_rows:
        lines.append(f"  ... {len(rows) - max_rows} more rules (all in --json)")
    if report["conflicts"]:
        lines.append("conflicts (rules with different labels matching the same texts):")
        for c in report["conflicts"][:20]:
            how = "abstains" if c["same_priority"] else "priority decides"
            lines.append(f"  rules {c['rules'][0]} ({c['labels'][0]}) vs {c['rules'][1]} ({c['labels'][1]}): "
                         f"{c['texts']} texts, {how}")
    return "\n".join(lines)
