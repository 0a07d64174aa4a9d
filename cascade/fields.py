"""Fields: what an extraction answer is, and the checks and spans every tier shares.

An answer's fields are `{name: [value, ...]}`: each value is a span of the text (a field may
repeat: SNIPS has utterances with two `artist`s), values in the order they occur in the text.
Names come from the task's schema (`labels.json` "fields", the large model's `cascade.json`).

Comparison (span metrics, exact match, agreement between tiers) goes through `normalize_value`:
case-folded, Unicode NFKC, runs of whitespace made one space, and punctuation at either end
stripped — so "Paris," and "paris" are the same value, but "New York" and "York" are not.

Candidate spans (`candidate_spans`) are the word-aligned substrings of a text up to
`max_words` words: the set the large model's constrained decoder chooses each value from, so it
cannot write a value that is not in the text.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

Fields = dict[str, list[str]]
# What the large model reads before it writes the fields' JSON (training.task learns it, the
# large-model tier prompts with it): here so both sides, one with torch and one without, share it.
FIELDS_CUE = "\nFields:"

# A "word" for span boundaries: a run of non-space characters with punctuation at its ends
# split off, so "(Paris)," gives "(", "Paris", ")", "," — a value may start or end at either.
_WORD = re.compile(r"[^\W_]+(?:['’\-:./][^\W_]+)*|[^\w\s]|_")
_EDGE_PUNCT = re.compile(r"^[\W_]+|[\W_]+$")
_SPACES = re.compile(r"\s+")


def normalize_value(value: str) -> str:
    """The comparison form of a field value (see the module docstring)."""
    value = unicodedata.normalize("NFKC", value).casefold()
    value = _SPACES.sub(" ", value).strip()
    stripped = _EDGE_PUNCT.sub("", value)
    return stripped or value  # a value that is all punctuation compares as itself


def value_multiset(fields: Fields | None) -> Counter:
    """(name, normalised value) pairs with their counts: what span metrics compare."""
    out: Counter = Counter()
    for name, values in (fields or {}).items():
        for v in values:
            out[(name, normalize_value(v))] += 1
    return out


def same_fields(a: Fields | None, b: Fields | None) -> bool:
    """Whole-item exact match after normalisation (order of values does not matter)."""
    return value_multiset(a) == value_multiset(b)


def word_offsets(text: str) -> list[tuple[int, int]]:
    """(start, end) character offsets of the words of `text` (see `_WORD`)."""
    return [m.span() for m in _WORD.finditer(text)]


def candidate_spans(text: str, max_words: int = 12) -> list[str]:
    """Distinct word-aligned substrings of `text` of 1..max_words words, in text order."""
    words = word_offsets(text)
    seen: dict[str, None] = {}
    for i in range(len(words)):
        for j in range(i, min(len(words), i + max_words)):
            seen.setdefault(text[words[i][0]:words[j][1]], None)
    return list(seen)


def check_fields(text: str, fields, schema: list[str] | None = None) -> str | None:
    """Why `fields` is not a valid answer for `text` (None when it is): a JSON object of
    name -> list of non-empty strings, every name in `schema` (when given), every value found
    in the text (exactly, as written)."""
    if not isinstance(fields, dict):
        return f"fields: expected an object of name -> [values], got {type(fields).__name__}"
    for name, values in fields.items():
        if schema is not None and name not in schema:
            return f"fields.{name}: not a field of the task (fields: {', '.join(schema)})"
        if isinstance(values, str):
            values = [values]
        if not isinstance(values, list) or not values:
            return f"fields.{name}: expected a non-empty list of strings"
        for i, v in enumerate(values):
            if not isinstance(v, str) or not v.strip():
                return f"fields.{name}[{i}]: expected a non-empty string, got {v!r:.60}"
            if v not in text:
                return f"fields.{name}[{i}]: {v!r:.60} does not occur in the text"
    return None


def as_fields(raw) -> Fields:
    """A checked `fields` value in its canonical form: every value a list, empty names gone."""
    return {name: ([values] if isinstance(values, str) else list(values)) for name, values in raw.items()
            if values}


def order_by_text(text: str, fields: Fields) -> Fields:
    """The same fields, each name's values (and the names) in the order they occur in `text`."""
    def pos(v: str) -> int:
        i = text.find(v)
        return i if i >= 0 else len(text)
    items = sorted(((name, sorted(vals, key=pos)) for name, vals in fields.items() if vals),
                   key=lambda kv: pos(kv[1][0]))
    return dict(items)


def fields_json_schema(text: str, names: list[str], max_words: int = 12) -> dict:
    """The JSON schema of one text's answer: an object of the present fields (keys from `names`
    only, none required), each a non-empty array of spans of `text` (`candidate_spans`), so a
    decoder held to it writes valid JSON and cannot invent a value."""
    spans = candidate_spans(text, max_words) or [text.strip() or text]
    return {
        "type": "object",
        "properties": {n: {"type": "array", "items": {"$ref": "#/$defs/span"}, "minItems": 1} for n in names},
        "additionalProperties": False,
        "$defs": {"span": {"enum": spans}},
    }


def fields_from_json(text: str, value, names: list[str]) -> Fields:
    """The fields of a decoded answer, kept to the schema (unknown names and values not in the
    text dropped: a backend that ignored the constraint cannot put them in an answer)."""
    if not isinstance(value, dict):
        return {}
    out: Fields = {}
    for name in names:
        vals = value.get(name)
        if isinstance(vals, str):
            vals = [vals]
        if isinstance(vals, list):
            kept = [v for v in vals if isinstance(v, str) and v.strip() and v in text]
            if kept:
                out[name] = kept
    return order_by_text(text, out)


def schema_violation(value, schema: dict) -> str | None:
    """Why `value` is not valid under a `fields_json_schema` schema (None when it is)."""
    if not isinstance(value, dict):
        return f"expected an object, got {type(value).__name__}"
    spans = set(schema["$defs"]["span"]["enum"])
    for name, vals in value.items():
        if name not in schema["properties"]:
            return f"{name}: not a field of the schema"
        if not isinstance(vals, list) or not vals:
            return f"{name}: expected a non-empty array"
        bad = next((v for v in vals if v not in spans), None)
        if bad is not None:
            return f"{name}: {bad!r:.60} is not a span of the text"
    return None
