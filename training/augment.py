"""Perturbed copies of the training texts, for distillation (Tang et al. 2019, "Distilling
task-specific knowledge from BERT into simple neural networks", §3: masking, n-gram sampling).

The teacher labels every copy with its full label distribution, so the student learns what the
teacher says *around* the training texts, not only at them: a dropped keyword, a fragment, two
requests spliced together. That neighbourhood is where a cascade's routing decisions are made
(the student's confidence on texts it has not seen), so matching the teacher there is what
lets the student answer more of the traffic itself. No label is attached: the copies learn from
the teacher's term of the loss alone.
"""

from __future__ import annotations

import random


def _drop_words(words: list[str], rng: random.Random, p: float = 0.15) -> list[str]:
    kept = [w for w in words if rng.random() >= p]
    return kept or [rng.choice(words)]


def _swap_adjacent(words: list[str], rng: random.Random) -> list[str]:
    if len(words) < 2:
        return words
    out = list(words)
    i = rng.randrange(len(out) - 1)
    out[i], out[i + 1] = out[i + 1], out[i]
    return out


def _span(words: list[str], rng: random.Random) -> list[str]:
    """A contiguous n-gram of 1 to all-but-one words."""
    if len(words) < 3:
        return words
    n = rng.randint(max(1, len(words) // 2), len(words) - 1)
    start = rng.randrange(len(words) - n + 1)
    return words[start:start + n]


def _splice(words: list[str], other: list[str], rng: random.Random) -> list[str]:
    """The start of one request and the end of another: a text between two intents."""
    cut_a = rng.randint(1, max(1, len(words) - 1))
    cut_b = rng.randint(0, max(0, len(other) - 1))
    return words[:cut_a] + other[cut_b:]


OPS = ("drop", "swap", "span", "splice")


def augment_texts(texts: list[str], per_text: int = 1, seed: int = 0) -> list[str]:
    """`per_text` perturbed copies of every text (one operation each, chosen at random),
    leaving out copies equal to a training text or to each other. Seeded: the same call gives
    the same texts, so the teacher's label cache is reused across runs."""
    if per_text < 0:
        raise ValueError(f"per_text must be >= 0, got {per_text}")
    rng = random.Random(seed)
    seen = {t.strip().lower() for t in texts}
    split = [t.split() for t in texts]
    out: list[str] = []
    for words in split:
        if not words:
            continue
        for _ in range(per_text):
            op = rng.choice(OPS)
            if op == "drop":
                new = _drop_words(words, rng)
            elif op == "swap":
                new = _swap_adjacent(words, rng)
            elif op == "span":
                new = _span(words, rng)
            else:
                new = _splice(words, rng.choice(split) or words, rng)
            text = " ".join(new)
            key = text.strip().lower()
            if key and key not in seen:
                seen.add(key)
                out.append(text)
    return out
