"""BIO tags over a student's tokens: from fields to per-token tags and back, torch-free.

A tagging student labels each token O, B-name or I-name (`tag_set`). Training needs the gold
tags of a text's tokens (`locate_spans` then `encode_tags`); serving turns the argmax tags back
into fields (`decode_tags`) and scores the whole answer (`item_confidence`). Numpy only: the
student tier runs without torch.

Offsets are the tokenizer's (start, end) character offsets. Byte-level BPE gives a word's
token the space before it ("Ġhello" is (4, 10) in "play hello"), so a token's range is
trimmed of leading/trailing whitespace before it is compared with a span; a token that is
whitespace alone is inside a span only when it lies strictly within it (two spaces inside a
value), never at its edge. A character split over several byte tokens gives each the whole
character's range, so they all take the span's tags.

Decoding: B-x starts a span of x; I-x continues the open span when it is an x span and starts
one otherwise (an I without a B is a span, not noise); O closes it. A span's value is the text
from its first token's start to its last token's end, whitespace stripped and widened to whole
words (`snap_to_words`: a value is made of whole words even when a subword tokenizer tags half
of one), spans that then overlap merged into the first; values of each name in text order,
names in the order of their first value.
"""

from __future__ import annotations

import numpy as np

Fields = dict[str, list[str]]
Span = tuple[int, int, str]  # (start, end, field name): text[start:end] is the value
CONFIDENCE_METHODS = ("product", "min", "mean")


def tag_set(field_names: list[str]) -> list[str]:
    """["O", "B-f", "I-f", ...] for each field name, in the given order: tag id = index."""
    return ["O"] + [f"{p}-{name}" for name in field_names for p in ("B", "I")]


def _word_aligned(text: str, start: int, end: int) -> bool:
    return (start == 0 or not text[start - 1].isalnum()) and (end == len(text) or not text[end].isalnum())


def _occurrences(text: str, value: str) -> list[int]:
    out, i = [], text.find(value)
    while i >= 0:
        out.append(i)
        i = text.find(value, i + 1)
    return out


def locate_spans(text: str, fields: Fields | None) -> tuple[list[Span], list[tuple[str, str]]]:
    """Character spans of a row's field values, and the (name, value) pairs not found.

    Each name's values are taken in order, each after the previous one of that name; among all
    names the earliest next occurrence is placed first, and a placed span is never overlapped,
    so "love" as a track and "love" as a playlist in "play love from my love list" go to the
    first and second "love" (ties go to the name listed first: fields are in text order). An
    occurrence on word boundaries is preferred to one inside a word ("art" not in "party").
    """
    queues = {name: list(values) for name, values in (fields or {}).items() if values}
    cursor = {name: 0 for name in queues}
    placed: list[Span] = []
    missing: list[tuple[str, str]] = []

    def free(s: int, e: int) -> bool:
        return all(e <= ps or s >= pe for ps, pe, _ in placed)

    def next_occurrence(name: str) -> int | None:
        value = queues[name][0]
        starts = [s for s in _occurrences(text, value) if s >= cursor[name] and free(s, s + len(value))]
        aligned = [s for s in starts if _word_aligned(text, s, s + len(value))]
        return (aligned or starts or [None])[0]

    while queues:
        best: tuple[int, int, str] | None = None  # (start, rank of the name, name)
        for rank, name in enumerate(queues):
            s = next_occurrence(name)
            if s is None:
                missing.append((name, queues[name].pop(0)))
                continue
            if best is None or (s, rank) < best[:2]:
                best = (s, rank, name)
        if best is not None:
            s, _, name = best
            value = queues[name].pop(0)
            placed.append((s, s + len(value), name))
            cursor[name] = s + len(value)
        queues = {n: q for n, q in queues.items() if q}
    return sorted(placed), missing


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def encode_tags(text: str, offsets: list[tuple[int, int]], spans: list[Span], tags: list[str]) -> list[int]:
    """Gold tag id per token: B- on a span's first overlapping token, I- on the rest, O elsewhere.

    Args:
        offsets: per token (start, end) in `text` (truncated tokens simply are not there).
        spans: from `locate_spans`, non-overlapping.
        tags: `tag_set(...)`.
    """
    index = {t: i for i, t in enumerate(tags)}
    out = [0] * len(offsets)
    for s, e, name in spans:
        first = True
        for k, (ts, te) in enumerate(offsets):
            a, b = _trim(text, ts, te)
            inside = (a < e and b > s) if a < b else (ts > s and te < e)  # whitespace-only: strictly within
            if inside and out[k] == 0:
                out[k] = index[("B-" if first else "I-") + name]
                first = False
    return out


def tag_spans(tag_ids, tags: list[str]) -> list[tuple[int, int, str]]:
    """Token spans (first, last inclusive, name) of a tag sequence (see the module docstring)."""
    spans: list[list] = []
    open_name = None
    for k, t in enumerate(tag_ids):
        tag = tags[int(t)]
        if tag == "O":
            open_name = None
            continue
        prefix, name = tag.split("-", 1)
        if prefix == "I" and open_name == name:
            spans[-1][1] = k
        else:
            spans.append([k, k, name])
            open_name = name
    return [tuple(s) for s in spans]


def snap_to_words(text: str, start: int, end: int) -> tuple[int, int]:
    """Widen a span that starts or ends inside a word to the whole word: a subword tokenizer
    can tag "beat" of "beatles" apart from "les", but a value is made of whole words."""
    while 0 < start < len(text) and text[start - 1].isalnum() and text[start].isalnum():
        start -= 1
    while 0 < end < len(text) and text[end - 1].isalnum() and text[end].isalnum():
        end += 1
    return start, end


def decode_tags(text: str, offsets: list[tuple[int, int]], tag_ids, tags: list[str]) -> Fields:
    """Fields from per-token tag ids: each span the substring of `text` its tokens cover,
    widened to whole words (`snap_to_words`); spans that then overlap are one value, of the
    first one's field."""
    spans: list[list] = []  # [start, end, name], in text order
    n = len(offsets)
    for first, last, name in tag_spans(list(tag_ids)[:n], tags):
        start, end = _trim(text, offsets[first][0], offsets[last][1])
        if start >= end:
            continue
        start, end = snap_to_words(text, start, end)
        if spans and start < spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], end)
        else:
            spans.append([start, end, name])
    out: Fields = {}
    for start, end, name in spans:
        out.setdefault(name, []).append(text[start:end])
    return out


def softmax(x: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = x.astype(np.float64) / temperature
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def item_confidence(tag_probs: np.ndarray, method: str, label_prob: float | None = None) -> float:
    """One answer's confidence from its tokens' (T, K) tag probabilities.

    `method`: "product" of each token's top tag probability (the probability of the whole tag
    sequence under independent tokens), "min" (the weakest token), or "mean". For a joint
    answer, times the label's probability. A text without tokens has tag confidence 1.
    """
    if method not in CONFIDENCE_METHODS:
        raise ValueError(f"confidence method {method!r}: expected one of {', '.join(CONFIDENCE_METHODS)}")
    top = tag_probs.max(-1) if len(tag_probs) else np.ones(1)
    conf = {"product": lambda: float(np.exp(np.log(top).sum())), "min": lambda: float(top.min()),
            "mean": lambda: float(top.mean())}[method]()
    return conf * (1.0 if label_prob is None else float(label_prob))


def auroc(confidence, correct) -> float | None:
    """Area under the ROC curve of `confidence` as a detector of correct items (ties count
    half): the chance that a random right answer is more confident than a random wrong one.
    None when all items are right or all wrong."""
    conf = np.asarray(confidence, dtype=np.float64)
    hit = np.asarray(correct, dtype=bool)
    n_pos, n_neg = int(hit.sum()), int((~hit).sum())
    if not n_pos or not n_neg:
        return None
    order = np.argsort(conf, kind="mergesort")
    ranks = np.empty(len(conf))
    sorted_conf = conf[order]
    i = 0
    while i < len(conf):  # average ranks over ties
        j = i
        while j + 1 < len(conf) and sorted_conf[j + 1] == sorted_conf[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[hit].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def risk_coverage_area(confidence, correct) -> float | None:
    """Area under the risk-coverage curve (lower is better): the mean error rate of the most
    confident k items, averaged over k = 1..N."""
    conf = np.asarray(confidence, dtype=np.float64)
    if not len(conf):
        return None
    wrong = ~np.asarray(correct, dtype=bool)[np.argsort(-conf, kind="mergesort")]
    return float((np.cumsum(wrong) / np.arange(1, len(conf) + 1)).mean())
