"""`cascade rules mine`: induce readable, high-precision phrase rules from labelled data.

Candidates are word n-grams (1..3 words) that, in the training split, occur almost only with
one label. Each becomes the pattern `\\bw1\\W+w2\\b` (case-insensitive), which matches exactly
when the text's `\\w+` tokens contain the n-gram, so counting n-grams is counting matches.
Candidates are kept only if they reach the precision bar on the training *and* the
validation split, then a greedy cover per label picks the few that explain most of its
training texts. The pack written is plain TOML with each rule's evidence in `note`, meant to be
read and edited by a person.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from cascade.data import Example
from cascade.rules.check import check_pack
from cascade.rules.pack import parse_pack

TOKEN = re.compile(r"\w+")


@dataclass
class MineConfig:
    """Knobs of the miner; the defaults give a pack of a few rules per label."""

    min_precision: float = 0.99  # on train and on val
    min_train_support: int = 8  # texts the phrase must match in train
    min_val_support: int = 3  # ...and in val, so the val precision means something
    # Phrases of one word are often topics ("text", "speech") that out-of-scope requests share;
    # two or more words carry intent ("text message to", "credit score").
    min_ngram: int = 2
    max_ngram: int = 3
    max_rules_per_label: int = 5
    min_new_cover: int = 3  # a rule must explain this many train texts no earlier rule did
    # The out-of-scope label: no phrase defines it, and it is usually under-sampled in the
    # training data (CLINC150: 0.7% of train, 18% of test), so a phrase seen once on an
    # out-of-scope text counts as `oos_weight` wrong matches (see `oos_weight_for`).
    oos_label: str | None = None
    oos_weight: float = 1.0


def _ngrams(text: str, max_n: int) -> set[tuple[str, ...]]:
    tokens = TOKEN.findall(text.lower())
    return {tuple(tokens[i:i + n]) for n in range(1, max_n + 1) for i in range(len(tokens) - n + 1)}


def phrase_pattern(ngram: tuple[str, ...]) -> str:
    return r"\b" + r"\W+".join(re.escape(tok) for tok in ngram) + r"\b"


def oos_weight_for(train: list[Example], oos_label: str | None, expected_share: float) -> float:
    """Weight that makes out-of-scope matches count as if `expected_share` of traffic were oos."""
    if oos_label is None:
        return 1.0
    n_oos = sum(ex.label == oos_label for ex in train)
    n_in = len(train) - n_oos
    if n_oos == 0 or n_in == 0 or not 0.0 < expected_share < 1.0:
        return 1.0
    return max(1.0, (expected_share / (1.0 - expected_share)) / (n_oos / n_in))


@dataclass
class Candidate:
    ngram: tuple[str, ...]
    label: str
    train_support: int
    train_correct: int
    val_support: int = 0
    val_correct: int = 0


def _count(examples: list[Example], max_n: int) -> tuple[dict[tuple, Counter], list[set]]:
    per_ngram: dict[tuple, Counter] = defaultdict(Counter)
    grams_of = []
    for ex in examples:
        grams = _ngrams(ex.text, max_n)
        grams_of.append(grams)
        for g in grams:
            per_ngram[g][ex.label] += 1
    return per_ngram, grams_of


def weighted_precision(counts: Counter, label: str, cfg: MineConfig) -> float:
    correct = counts.get(label, 0)
    wrong = sum(n * (cfg.oos_weight if lab == cfg.oos_label else 1.0) for lab, n in counts.items() if lab != label)
    return correct / (correct + wrong) if correct + wrong else 0.0


def mine_candidates(train: list[Example], val: list[Example], cfg: MineConfig) -> list[Candidate]:
    """Every n-gram that passes the precision bar on both splits (before the greedy cover)."""
    train_counts, _ = _count(train, cfg.max_ngram)
    val_counts, _ = _count(val, cfg.max_ngram)
    out = []
    for gram, counts in train_counts.items():
        support = sum(counts.values())
        if support < cfg.min_train_support or len(gram) < cfg.min_ngram:
            continue
        label, correct = counts.most_common(1)[0]
        if label == cfg.oos_label or weighted_precision(counts, label, cfg) < cfg.min_precision:
            continue
        vc = val_counts.get(gram, Counter())
        if sum(vc.values()) < cfg.min_val_support or weighted_precision(vc, label, cfg) < cfg.min_precision:
            continue
        out.append(Candidate(gram, label, support, correct, sum(vc.values()), vc.get(label, 0)))
    return out


def select_rules(candidates: list[Candidate], train: list[Example], cfg: MineConfig) -> list[Candidate]:
    """Greedy cover per label: take the phrase that explains most still-unexplained texts."""
    _, grams_of = _count(train, cfg.max_ngram)
    by_label: dict[str, list[Candidate]] = defaultdict(list)
    for c in candidates:
        by_label[c.label].append(c)
    chosen = []
    for label in sorted(by_label):
        rows = [i for i, ex in enumerate(train) if ex.label == label]
        covers = {c.ngram: {i for i in rows if c.ngram in grams_of[i]} for c in by_label[label]}
        covered: set[int] = set()
        pool = list(by_label[label])
        while pool and sum(1 for c in chosen if c.label == label) < cfg.max_rules_per_label:
            # Most new texts first; then shorter phrases (more general, easier to read); then name.
            best = max(pool, key=lambda c: (len(covers[c.ngram] - covered), -len(c.ngram), c.ngram))
            if len(covers[best.ngram] - covered) < cfg.min_new_cover:
                break
            chosen.append(best)
            covered |= covers[best.ngram]
            pool.remove(best)
    return chosen


def candidates_to_pack_dict(name: str, chosen: list[Candidate], description: str = "") -> dict:
    rules = []
    for c in sorted(chosen, key=lambda c: (c.label, -c.train_support)):
        rules.append({
            "label": c.label,
            "pattern": phrase_pattern(c.ngram),
            "flags": ["IGNORECASE"],
            # Held-out precision with add-one smoothing: a rule seen right 3/3 times is not
            # certain, one seen right 40/40 times nearly is.
            "confidence": round((c.val_correct + 1) / (c.val_support + 2), 4),
            "note": f"mined: train {c.train_correct}/{c.train_support}, val {c.val_correct}/{c.val_support}",
        })
    return {"name": name, "description": description, "rule": rules}


def mine_pack(train: list[Example], val: list[Example], name: str, cfg: MineConfig) -> tuple[dict, dict]:
    """Mine, then re-check the pack with the real regex engine on val and drop any rule below
    the bar there. Returns (pack dict ready for TOML, val check report)."""
    chosen = select_rules(mine_candidates(train, val, cfg), train, cfg)
    description = (f"Mined by `cascade rules mine`: {cfg.min_ngram}-{cfg.max_ngram} word phrases, "
                   f"precision >= {cfg.min_precision} on train and val (out-of-scope matches weighted "
                   f"x{cfg.oos_weight:.1f}), at least {cfg.min_train_support} train / {cfg.min_val_support} "
                   "val matches. Edit freely; `cascade rules check` re-measures it.")
    data = candidates_to_pack_dict(name, chosen, description)
    pack = parse_pack(data, f"<mined {name}>", name)
    report = check_pack(pack, val)
    bad = {r["index"] for r in report["rules"] if r["precision"] is not None and r["precision"] < cfg.min_precision}
    if bad:
        data["rule"] = [r for i, r in enumerate(data["rule"], start=1) if i not in bad]
        report = check_pack(parse_pack(data, f"<mined {name}>", name), val)
    return data, report


def _toml_str(s: str) -> str:
    # Literal strings keep regexes readable ('\bcredit\W+score\b', no doubled backslashes).
    if "'" not in s and "\n" not in s:
        return f"'{s}'"
    return tomli_w.dumps({"x": s})[4:].strip()


def write_pack(data: dict, out: str | Path) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# Rule pack {data['name']!r}: regex rules answered by the rules tier.\n"
              "# Fields per [[rule]]: label, pattern (regex module syntax), flags, priority, fields,\n"
              "# confidence (probability of being right), note. See cascade/rules/pack.py.\n\n")
    body = [f"name = {_toml_str(data['name'])}", f"description = {_toml_str(data.get('description', ''))}", ""]
    for rule in data["rule"]:
        body.append("[[rule]]")
        for key, value in rule.items():
            if isinstance(value, list):
                value = "[" + ", ".join(_toml_str(v) for v in value) + "]"
            elif isinstance(value, str):
                value = _toml_str(value)
            body.append(f"{key} = {value}")
        body.append("")
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(header + "\n".join(body), encoding="utf-8")
    tmp.replace(out)
