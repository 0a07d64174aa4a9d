"""`cascade rules mine`: induce readable, high-precision phrase rules from labelled data.

Candidates are word n-grams (1..3 words) that, in the training split, occur almost only with
one label. Each becomes the pattern `\\bw1\\W+w2\\b` (case-insensitive), which matches exactly
when the text's `\\w+` tokens contain the n-gram, so counting n-grams is counting matches.
Candidates are kept only if they reach the precision bar on the training *and* the
validation split, then a greedy cover per label picks the few that explain most of its
training texts. The pack written is plain TOML with each rule's evidence in `note`, meant to be
read and edited by a person.

On an extraction dataset (task `extract` or `joint`, see `mine_template_pack`) the miner
writes *template* rules instead: each train text with its field values replaced by
placeholders ("add {entity_name} to {playlist_owner} {playlist} playlist"), counted per label;
a template seen often enough becomes an anchored pattern whose placeholders are named groups,
kept only if its answers (label and fields) reach the precision bar on train and val.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import regex
import tomli_w

from cascade.data import Example
from cascade.fields import normalize_value
from cascade.metrics import answer_key, default_metric
from cascade.rules.check import check_pack
from cascade.rules.pack import match_fields, parse_pack

TOKEN = re.compile(r"\w+")


@dataclass
class MineConfig:
    """Knobs of the miner; the defaults give a pack of a few rules per label."""

    min_precision: float = 0.99  # on train and on val
    min_train_support: int = 8  # texts the phrase must match in train (templates: texts that have it)
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
    # Extraction templates (`mine_template_pack`): a field with at most `max_field_values`
    # distinct train values, each seen `min_value_repeats` times on average (rating_unit,
    # music_item, service), is matched from that value list; any other field by a generic span.
    max_field_values: int = 100
    min_value_repeats: float = 5.0


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


# --- extraction: template rules ---------------------------------------------------------------
# A template is a tuple of pieces, ("lit", words) or ("slot", field name). Literals are
# lower-cased with whitespace runs as one space; the end punctuation of the text is dropped (the
# pattern accepts any), so "find {object_name}." and "find {object_name}" are one template.

EXTRACT_LABEL = "extract"  # the label of rules for an extract-only task, whose gold has none
GENERIC_SPAN = r"\S(?:.*?\S)?"  # lazy: the literal that follows decides where a value ends
_SPACES = re.compile(r"\s+")
_END = re.compile(r"[\s.!?]+$")


def _place(text: str, value: str, taken: list[tuple[int, int, str]]) -> tuple[int, int] | None:
    """Where `value` sits in `text`, clear of the spans already `taken`: the first occurrence on
    word boundaries, else the first anywhere."""
    for pat in (r"(?<!\w)" + re.escape(value) + r"(?!\w)", re.escape(value)):
        for m in re.finditer(pat, text):
            a, b = m.span()
            if all(b <= s or a >= e for s, e, _ in taken):
                return a, b
    return None


def delexicalise(ex: Example) -> tuple | None:
    """The template of a text (its field values as slots), or None when a value cannot be placed
    (not in the text, or overlapping another value)."""
    text = ex.text
    values = sorted(((n, v) for n, vs in (ex.fields or {}).items() for v in vs if v.strip()),
                    key=lambda nv: -len(nv[1]))
    taken: list[tuple[int, int, str]] = []
    for name, value in values:
        span = _place(text, value, taken)
        if span is None:
            return None
        taken.append((*span, name))
    taken.sort()
    pieces: list[tuple[str, str]] = []
    pos = 0
    for a, b, name in taken:
        pieces += [("lit", text[pos:a]), ("slot", name)]
        pos = b
    pieces.append(("lit", text[pos:]))
    pieces[0] = ("lit", pieces[0][1].lstrip())
    pieces[-1] = ("lit", _END.sub("", pieces[-1][1]))
    return tuple((k, _SPACES.sub(" ", x.lower()) if k == "lit" else x) for k, x in pieces if x)


def template_text(pieces: tuple) -> str:
    return "".join(x if k == "lit" else "{" + x + "}" for k, x in pieces)


def _literal_pattern(lit: str) -> str:
    return r"\s+".join(re.escape(w) for w in lit.split(" "))


def value_lists(train: list[Example], cfg: MineConfig) -> dict[str, list[str]]:
    """The enumerable fields and their train values (longest first, so "current location" is
    tried before "current"); see `MineConfig.max_field_values`."""
    seen: dict[str, Counter] = defaultdict(Counter)
    for ex in train:
        for name, vs in (ex.fields or {}).items():
            for v in vs:
                if v.strip():
                    seen[name][_SPACES.sub(" ", v.strip().lower())] += 1
    out = {}
    for name, counts in seen.items():
        distinct = {normalize_value(v) for v in counts}
        if len(distinct) <= cfg.max_field_values and sum(counts.values()) >= cfg.min_value_repeats * len(distinct):
            out[name] = sorted(counts, key=lambda v: (-len(v), v))
    return out


def template_pattern(pieces: tuple, lists: dict[str, list[str]]) -> str | None:
    """The anchored pattern of a template, or None when it cannot be matched reliably: two
    generic slots with only whitespace between them (where would one value end?), no literal
    nor value list to anchor it, or a field name that is not a regex group name."""
    out = [r"^\s*"]
    anchored = False
    prev_generic = False
    for kind, x in pieces:
        if kind == "lit":
            out.append(_literal_pattern(x))
            anchored |= bool(x.strip())
            prev_generic = prev_generic and not x.strip()
            continue
        if not x.isidentifier():
            return None
        if x in lists:
            out.append(f"(?P<{x}>" + "|".join(_literal_pattern(v) for v in lists[x]) + ")")
            anchored, prev_generic = True, False
        else:
            if prev_generic:
                return None
            out.append(f"(?P<{x}>{GENERIC_SPAN})")
            prev_generic = True
    return "".join(out) + r"[\s.!?]*$" if anchored else None


@dataclass
class TemplateCandidate:
    label: str
    pieces: tuple
    pattern: str
    seen: int  # train texts with exactly this template
    train_support: int = 0  # train texts the pattern matches
    train_correct: int = 0  # ...answered right under the metric
    val_support: int = 0
    val_correct: int = 0
    names: list[str] = field(default_factory=list)

    def specificity(self, lists: dict[str, list[str]]) -> tuple:
        """Sort key, most specific first: literal words and value-list slots, fewer generic slots."""
        lit = sum(len(x.split()) for k, x in self.pieces if k == "lit")
        enum = sum(1 for k, x in self.pieces if k == "slot" and x in lists)
        generic = sum(1 for k, x in self.pieces if k == "slot" and x not in lists)
        return (-(lit + enum), generic, -self.seen, self.pattern)


def _score(cands: list[TemplateCandidate], examples: list[Example], metric: str, split: str,
           timeout_s: float = 0.02) -> None:
    """Fill each candidate's support/correct on `examples` with the real regex engine. Texts are
    bucketed by first word so a pattern that starts with a literal word tries only its bucket."""
    by_first: dict[str, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        words = ex.text.lower().split()
        by_first[words[0] if words else ""].append(i)
    everyone = list(range(len(examples)))
    gold = [answer_key(metric, ex.label, ex.fields) for ex in examples]
    for c in cands:
        compiled = regex.compile(c.pattern, regex.IGNORECASE)
        rule = _AsRule(c.names)
        kind, first = c.pieces[0]
        rows = by_first.get(first.split(" ")[0], []) if kind == "lit" and " " in first else everyone
        support = correct = 0
        for i in rows:
            try:
                m = compiled.match(examples[i].text, timeout=timeout_s)
            except TimeoutError:
                continue
            if m is None:
                continue
            support += 1
            label = None if c.label == EXTRACT_LABEL else c.label
            correct += answer_key(metric, label, match_fields(rule, m)) == gold[i]
        setattr(c, f"{split}_support", support)
        setattr(c, f"{split}_correct", correct)


@dataclass
class _AsRule:  # what `match_fields` reads of a rule
    fields: list[str]


def template_candidates(train: list[Example], cfg: MineConfig) -> tuple[list[TemplateCandidate], dict, Counter]:
    """Templates seen at least `min_train_support` times, as patterns. Returns (candidates,
    value lists, counts of templates skipped by reason)."""
    lists = value_lists(train, cfg)
    seen: Counter = Counter()
    skipped: Counter = Counter()
    for ex in train:
        pieces = delexicalise(ex)
        if pieces is None:
            skipped["texts with a value not in the text"] += 1
            continue
        seen[(ex.label or EXTRACT_LABEL, pieces)] += 1
    out = []
    for (label, pieces), n in seen.items():
        if n < cfg.min_train_support:
            continue
        pattern = template_pattern(pieces, lists)
        if pattern is None:
            skipped["templates with adjacent generic slots or no anchor"] += 1
            continue
        names = list(dict.fromkeys(x for k, x in pieces if k == "slot"))
        out.append(TemplateCandidate(label, pieces, pattern, n, names=names))
    return out, lists, skipped


def mine_template_pack(train: list[Example], val: list[Example], name: str, cfg: MineConfig,
                       task: str = "joint", metric: str | None = None) -> tuple[dict, dict]:
    """Mine template rules for an extraction task; see the module docstring.

    Each candidate is matched against every train and val text: it is kept when it matches at
    least `min_val_support` val texts and its answers are right (under `metric`, by default the
    task's) on at least `min_precision` of its matches on both splits. Kept rules get distinct
    priorities, most specific template first, so a text is answered by one template, never by
    a merge of two. Returns (pack dict ready for TOML, val check report)."""
    metric = metric or default_metric(task)
    cands, lists, skipped = template_candidates(train, cfg)
    n_templates = len(cands)
    _score(cands, train, metric, "train")
    cands = [c for c in cands if c.train_support and c.train_correct / c.train_support >= cfg.min_precision]
    _score(cands, val, metric, "val")
    # (`--min-val-support 0` keeps templates val never saw: train precision alone then.)
    kept = [c for c in cands if c.val_support >= cfg.min_val_support
            and c.val_correct >= cfg.min_precision * c.val_support]
    kept.sort(key=lambda c: c.specificity(lists))
    rules = []
    for rank, c in enumerate(kept):
        rules.append({
            "label": c.label,
            "pattern": c.pattern,
            "flags": ["IGNORECASE"],
            "priority": len(kept) - rank,
            "fields": c.names,
            # As for phrase rules: held-out precision with add-one smoothing.
            "confidence": round((c.val_correct + 1) / (c.val_support + 2), 4),
            "note": (f'template "{template_text(c.pieces)}" seen {c.seen}x; {metric}: train '
                     f"{c.train_correct}/{c.train_support}, val {c.val_correct}/{c.val_support}"),
        })
    enum = ", ".join(sorted(lists)) or "none"
    description = (f"Mined by `cascade rules mine` ({task} task): utterance templates seen >= "
                   f"{cfg.min_train_support} times in train, {metric} precision >= {cfg.min_precision} on train "
                   f"and on >= {cfg.min_val_support} val matches. Value-list fields: {enum}. "
                   "Edit freely; `cascade rules check` re-measures it.")
    data = {"name": name, "description": description, "rule": rules}
    field_names = sorted({n for ex in train for n in (ex.fields or {})})
    report = check_pack(parse_pack(data, f"<mined {name}>", name), val, task=task, field_names=field_names,
                        metric=metric)
    # Parity with the real pack (its prefilter and time budget): drop what fails there.
    bad = {r["index"] for r in report["rules"] if r["task_precision"] is not None
           and r["task_precision"] < cfg.min_precision}
    if bad:
        data["rule"] = [r for i, r in enumerate(data["rule"], start=1) if i not in bad]
        report = check_pack(parse_pack(data, f"<mined {name}>", name), val, task=task, field_names=field_names,
                            metric=metric)
    report["mining"] = {"templates": n_templates, "passed_train": len(cands), "kept": len(data["rule"]),
                        "skipped": dict(skipped), "value_list_fields": sorted(lists)}
    return data, report


def mine_for_task(train: list[Example], val: list[Example], name: str, task: str = "classify",
                  oos_label: str | None = None, toy: bool = False) -> dict:
    """The pack the quickstart and the benchmark mine: phrase rules for a classify task (out of
    scope weighted as 20% of traffic), templates with named groups for extract/joint. `toy`:
    the low supports of toy-scale runs, where a few rows are all there is."""
    if task == "classify":
        cfg = MineConfig(min_train_support=2 if toy else 8, min_val_support=1 if toy else 3, oos_label=oos_label,
                         oos_weight=oos_weight_for(train, oos_label, 0.2))
        return mine_pack(train, val, name, cfg)[0]
    cfg = MineConfig(min_train_support=2 if toy else 3, min_val_support=1)
    return mine_template_pack(train, val, name, cfg, task=task)[0]


def _toml_str(s: str) -> str:
    # Literal strings keep regexes readable ('\bcredit\W+score\b', no doubled backslashes).
    if "'" not in s and "\n" not in s:
        return f"'{s}'"
    if "'''" not in s and not s.endswith("'") and "\n" not in s:  # e.g. a value list with "alex's"
        return "'''" + s + "'''"
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
