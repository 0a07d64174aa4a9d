"""Rule packs: regex rules in TOML, validated on load, matched with a per-text time budget.

A pack file (`rules/NAME.toml`):

    name = "clinc150"
    [[rule]]
    label = "credit_score"
    pattern = '\\bcredit score\\b'
    flags = ["IGNORECASE"]       # optional
    priority = 0                 # optional; higher wins over lower
    fields = ["amount"]          # optional; named groups to extract
    confidence = 0.99            # optional; probability the rule is right (mined: val precision)

Matching uses the `regex` package, whose `timeout` stops a catastrophic pattern (`(a+)+$` on a
long input) mid-search; a text that runs out of time gets no answer (an abstention), counted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import regex
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cascade.tomlfile import read_toml

# The flags a rule may name; the rest of the regex module's flags change semantics in ways a
# rule author is unlikely to want (e.g. POSIX leftmost-longest).
ALLOWED_FLAGS = ("IGNORECASE", "MULTILINE", "DOTALL", "VERBOSE", "ASCII", "WORD", "FULLCASE")


class RuleError(ValueError):
    """A rule pack that cannot be loaded; the message names `file:rule N` and the field."""


class RuleSpec(BaseModel):
    """One `[[rule]]` table as written in the file."""

    model_config = ConfigDict(extra="forbid")

    label: str = Field(min_length=1)
    pattern: str = Field(min_length=1)
    flags: list[str] = Field(default_factory=list)
    priority: int = 0
    fields: list[str] = Field(default_factory=list)
    confidence: float = Field(default=1.0, ge=0.0, le=1.0)
    note: str = ""

    @field_validator("flags")
    @classmethod
    def _known_flags(cls, flags: list[str]) -> list[str]:
        for flag in flags:
            if flag.upper() not in ALLOWED_FLAGS:
                raise ValueError(f"unknown flag {flag!r}; allowed: {', '.join(ALLOWED_FLAGS)}")
        return [f.upper() for f in flags]


@dataclass
class Rule:
    index: int  # 1-based position in the file, as reported in errors
    label: str
    pattern: str
    compiled: regex.Pattern
    priority: int = 0
    fields: list[str] = field(default_factory=list)
    confidence: float = 1.0
    flags: list[str] = field(default_factory=list)
    note: str = ""


# Patterns that refer to groups by number or name cannot be glued into one alternation.
_BACKREF = regex.compile(r"\\[1-9]|\\g<|\(\?P=|\(\?&|\(\?R|\(\?[0-9+-]")


@dataclass
class RulePack:
    """A loaded pack. `prefilters` groups rules under one alternation of their patterns, so a
    text that matches none of them (most texts) costs one search instead of one per rule."""

    name: str
    rules: list[Rule]
    path: Path | None = None
    prefilters: list[tuple[regex.Pattern | None, list[Rule]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.prefilters:
            self.prefilters = build_prefilters(self.rules)


def build_prefilters(rules: list[Rule]) -> list[tuple[regex.Pattern | None, list[Rule]]]:
    by_flags: dict[tuple[str, ...], list[Rule]] = {}
    loose: list[Rule] = []
    for rule in rules:
        if _BACKREF.search(rule.pattern):
            loose.append(rule)
        else:
            by_flags.setdefault(tuple(sorted(rule.flags)), []).append(rule)
    out: list[tuple[regex.Pattern | None, list[Rule]]] = []
    for flags, group in by_flags.items():
        union = "|".join(f"(?:{r.pattern})" for r in group)
        try:
            out.append((regex.compile(union, sum(getattr(regex, f) for f in flags)), group))
        except regex.error:  # e.g. an inline global flag inside one pattern: check one by one
            out.append((None, group))
    if loose:
        out.append((None, loose))
    return out


def compile_rule(spec: RuleSpec, index: int, where: str) -> Rule:
    flags = 0
    for flag in spec.flags:
        flags |= getattr(regex, flag)
    try:
        compiled = regex.compile(spec.pattern, flags)
    except regex.error as exc:
        raise RuleError(f"{where}: pattern: invalid regex ({exc}): {spec.pattern!r}") from exc
    missing = [f for f in spec.fields if f not in compiled.groupindex]
    if missing:
        raise RuleError(
            f"{where}: fields: {missing} are not named groups of the pattern "
            f"(named groups: {sorted(compiled.groupindex) or 'none'})"
        )
    return Rule(index, spec.label, spec.pattern, compiled, spec.priority, list(spec.fields),
                spec.confidence, list(spec.flags), spec.note)


def parse_pack(data: dict, where: str, name: str = "") -> RulePack:
    """Validate a parsed TOML document as a rule pack; `where` prefixes every error."""
    unknown = set(data) - {"name", "description", "rule"}
    if unknown:
        raise RuleError(f"{where}: unknown top-level keys {sorted(unknown)}; expected name, description, [[rule]]")
    raw_rules = data.get("rule", [])
    if not isinstance(raw_rules, list):
        raise RuleError(f"{where}: `rule` must be an array of tables ([[rule]])")
    rules = []
    for i, raw in enumerate(raw_rules, start=1):
        at = f"{where}:rule {i}"
        if not isinstance(raw, dict):
            raise RuleError(f"{at}: expected a [[rule]] table")
        try:
            spec = RuleSpec.model_validate(raw)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"]) or "rule"
            label = f" (label {raw.get('label')!r})" if raw.get("label") else ""
            raise RuleError(f"{at}{label}: {loc}: {err['msg']}") from exc
        rules.append(compile_rule(spec, i, f"{at} (label {spec.label!r})"))
    return RulePack(str(data.get("name", name)), rules)


def load_pack(path: str | Path) -> RulePack:
    path = Path(path)
    pack = parse_pack(read_toml(path, RuleError, "rule pack"), str(path), name=path.stem)
    pack.path = path
    return pack


@dataclass
class RuleMatch:
    rule: Rule
    fields: dict[str, list[str]]  # name -> every capture of that group (a group may repeat)


@dataclass
class TextMatches:
    """Every rule that matched one text, or `timed_out` if its budget ran out first."""

    matches: list[RuleMatch]
    timed_out: bool = False


def match_text(pack: RulePack, text: str, timeout_s: float) -> TextMatches:
    """Run every rule on `text` within `timeout_s` in total.

    The whole text gets one budget (not each rule) so that a pack of many slow rules cannot
    add up to a hang either.
    """
    deadline = time.perf_counter() + timeout_s
    candidates: list[Rule] = []
    for union, group in pack.prefilters:
        if union is None:
            candidates.extend(group)
            continue
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            return TextMatches([], timed_out=True)
        try:
            if union.search(text, timeout=remaining) is not None:
                candidates.extend(group)
        except TimeoutError:
            return TextMatches([], timed_out=True)
    candidates.sort(key=lambda r: r.index)
    found = []
    for rule in candidates:
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            return TextMatches(found, timed_out=True)
        try:
            m = rule.compiled.search(text, timeout=remaining)
        except TimeoutError:
            return TextMatches(found, timed_out=True)
        if m is not None:
            found.append(RuleMatch(rule, match_fields(rule, m)))
    return TextMatches(found)


def match_fields(rule: Rule, m: regex.Match) -> dict[str, list[str]]:
    """The fields a match of `rule` extracts: every non-blank capture of each named group."""
    fields = {f: [v for v in m.captures(f) if v.strip()] for f in rule.fields}
    return {f: vs for f, vs in fields.items() if vs}


@dataclass
class Decision:
    """The pack's answer for one text: a winning match, or why there is none."""

    match: RuleMatch | None
    outcome: str  # "answered" | "no_match" | "conflict" | "timeout"


def decide(matches: TextMatches) -> Decision:
    """Pick the answer: the highest-priority matches must agree on one label, else abstain."""
    if matches.timed_out:
        return Decision(None, "timeout")
    if not matches.matches:
        return Decision(None, "no_match")
    top = max(m.rule.priority for m in matches.matches)
    winners = [m for m in matches.matches if m.rule.priority == top]
    if len({m.rule.label for m in winners}) > 1:
        return Decision(None, "conflict")
    best = max(winners, key=lambda m: m.rule.confidence)
    merged: dict[str, list[str]] = {}
    for m in winners:
        for name, values in m.fields.items():
            merged.setdefault(name, []).extend(v for v in values if v not in merged.get(name, []))
    return Decision(RuleMatch(best.rule, merged), "answered")
