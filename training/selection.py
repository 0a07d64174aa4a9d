"""Which logged texts are worth a large-model label, and which training points can go.

Pure functions of numpy arrays (no cascade types, no torch), one per strategy, each returning
indices into the candidate pool, best first. The flywheel (`training/flywheel.py`) calls them
on the texts the cheap tiers answered, with the current student's probabilities (`probs`, rows
sum to 1) and its embeddings (`emb`: the pooled hidden state the label head reads):

- `pick_random`: the baseline every other strategy must beat at equal budget; seeded, uniform.
- `pick_uncertainty`: the smallest margin between the student's two most likely labels (or the
  highest entropy): the texts nearest its decision boundary (Lewis & Gale 1994; Scheffer 2001).
- `pick_diversity`: farthest-first traversal (k-center greedy; Gonzalez 1985, Sener & Savarese
  2018's core-set): each pick is the point farthest from every centre so far — the centres the
  caller gives (texts already labelled) and the earlier picks — so the picks cover the space
  instead of crowding one confusing region. It is k-means++ seeding with the D^2 draw replaced
  by its argmax: deterministic, and a cluster no centre covers is always visited before a
  second point of a covered one (what `tests/test_flywheel.py` checks on three blobs).
- `pick_importance`: uncertainty weighted by density (Settles & Craven 2008's information
  density): score = (1 - max p) x density, density = the mean cosine similarity, mapped to
  [0, 1], to the point's k nearest neighbours in the pool. Why this and not per-example loss:
  the loss needs the label we have not paid for yet, and the student's loss against its own
  prediction is -log max p, i.e. uncertainty again. What the flywheel buys is escalations
  avoided, and a label teaches the student about every similar request; an uncertain text in a
  dense region stands for many requests, an uncertain outlier for one, which plain uncertainty
  sampling over-picks.

`prune_easy` is the other direction (data pruning): from the distillation set, drop the points
nearest to what the student already says (lowest EL2N, the L2 distance between its
distribution and the target's: right and as sure as the large model, so least to learn),
keeping a floor per label so no class is forgotten. `normalize_text` is the dedupe key.
"""

from __future__ import annotations

import re
import unicodedata

import numpy as np

STRATEGIES = ("random", "uncertainty", "diversity", "importance")


def normalize_text(text: str) -> str:
    """The dedupe key: NFKC, case-folded, whitespace runs to one space, trimmed ("Where's  MY
    refund?" and "where's my refund?" are one text; punctuation still counts)."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text).casefold()).strip()


def _check_k(k: int, n: int) -> int:
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    return min(k, n)


def pick_random(n: int, k: int, seed: int = 0) -> np.ndarray:
    """k of `n` indices uniformly at random without replacement, seeded.

    Args:
        n: pool size. k: picks (at most n). seed: the generator's seed (same seed, same picks).

    Returns:
        (min(k, n),) int64 indices, in draw order.
    """
    k = _check_k(k, n)
    return np.random.default_rng(seed).choice(n, size=k, replace=False).astype(np.int64)


def margin(probs: np.ndarray) -> np.ndarray:
    """(N,) top-1 minus top-2 probability per row: 0 = a tie between two labels, 1 = certain."""
    if probs.shape[1] < 2:
        return np.ones(len(probs))
    top2 = np.partition(probs, -2, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def entropy(probs: np.ndarray) -> np.ndarray:
    """(N,) Shannon entropy in nats per row (0 for a one-hot row)."""
    p = np.clip(probs, 1e-12, 1.0)
    return -(probs * np.log(p)).sum(1)


def pick_uncertainty(probs: np.ndarray, k: int, measure: str = "margin") -> np.ndarray:
    """The k rows the student is least sure of.

    Args:
        probs: (N, L) the student's probabilities. k: picks.
        measure: "margin" (smallest top-1 minus top-2 first) or "entropy" (largest first).

    Returns:
        (min(k, N),) indices, least certain first; ties keep pool order (stable sort).
    """
    k = _check_k(k, len(probs))
    if measure == "margin":
        key = margin(probs)
    elif measure == "entropy":
        key = -entropy(probs)
    else:
        raise ValueError(f"measure {measure!r}: 'margin' or 'entropy'")
    return np.argsort(key, kind="stable")[:k].astype(np.int64)


def _sq_dist(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """(N,) squared distance of each row of x to the single point c."""
    d = x - c
    return np.einsum("ij,ij->i", d, d)


def pick_diversity(emb: np.ndarray, k: int, centres: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """Farthest-first traversal: each pick maximises its distance to the nearest centre so far.

    Args:
        emb: (N, D) embeddings of the pool. k: picks.
        centres: (M, D) points already covered (e.g. the embeddings of texts already labelled);
            None or empty: the first pick is a seeded random point.
        seed: only for that first pick.

    Returns:
        (min(k, N),) indices in pick order. Cost O(k N D) time, O(N) extra memory.
    """
    emb = np.asarray(emb, dtype=np.float64)
    k = _check_k(k, len(emb))
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    nearest = np.full(len(emb), np.inf)  # squared distance to the nearest centre so far
    if centres is not None and len(centres):
        for c in np.asarray(centres, dtype=np.float64):
            np.minimum(nearest, _sq_dist(emb, c), out=nearest)
        first = int(np.argmax(nearest))
    else:
        first = int(np.random.default_rng(seed).integers(len(emb)))
    picks = [first]
    np.minimum(nearest, _sq_dist(emb, emb[first]), out=nearest)
    nearest[first] = -1.0  # never again
    while len(picks) < k:
        i = int(np.argmax(nearest))
        picks.append(i)
        np.minimum(nearest, _sq_dist(emb, emb[i]), out=nearest)
        nearest[picks] = -1.0
    return np.array(picks, dtype=np.int64)


def knn_density(emb: np.ndarray, neighbours: int = 10, chunk: int = 1024) -> np.ndarray:
    """(N,) mean similarity of each point to its `neighbours` nearest others, in [0, 1]
    ((1 + cosine) / 2); 1 where N == 1. Chunked: O(N^2 D) time, O(chunk N) memory."""
    x = np.asarray(emb, dtype=np.float64)
    n = len(x)
    if n <= 1:
        return np.ones(n)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    m = min(neighbours, n - 1)
    out = np.empty(n)
    for s in range(0, n, chunk):
        sim = x[s:s + chunk] @ x.T  # (c, N)
        sim[np.arange(len(sim)), np.arange(s, s + len(sim))] = -np.inf  # not itself
        top = np.partition(sim, -m, axis=1)[:, -m:]
        out[s:s + chunk] = (1.0 + top.mean(1)) / 2.0
    return out


def importance_scores(probs: np.ndarray, emb: np.ndarray, neighbours: int = 10, beta: float = 1.0) -> np.ndarray:
    """(N,) (1 - max p) x knn_density^beta: uncertain texts in dense regions of the pool first."""
    return (1.0 - probs.max(1)) * knn_density(emb, neighbours) ** beta


def pick_importance(probs: np.ndarray, emb: np.ndarray, k: int, neighbours: int = 10, beta: float = 1.0
                    ) -> np.ndarray:
    """The k highest `importance_scores`.

    Args:
        probs: (N, L) the student's probabilities. emb: (N, D) its embeddings of the same rows.
        k: picks. neighbours: the density's k nearest neighbours. beta: the density's weight
            (0: plain least-confidence sampling).

    Returns:
        (min(k, N),) indices, highest score first; ties keep pool order.
    """
    k = _check_k(k, len(probs))
    return np.argsort(-importance_scores(probs, emb, neighbours, beta), kind="stable")[:k].astype(np.int64)


def select(strategy: str, k: int, probs: np.ndarray, emb: np.ndarray, *, seed: int = 0,
           centres: np.ndarray | None = None, measure: str = "margin") -> np.ndarray:
    """Dispatch by name (`STRATEGIES`); the arguments a strategy does not use are ignored."""
    if strategy == "random":
        return pick_random(len(probs), k, seed)
    if strategy == "uncertainty":
        return pick_uncertainty(probs, k, measure)
    if strategy == "diversity":
        return pick_diversity(emb, k, centres, seed)
    if strategy == "importance":
        return pick_importance(probs, emb, k)
    raise ValueError(f"strategy {strategy!r}: one of {', '.join(STRATEGIES)}")


def el2n(student_probs: np.ndarray, target_probs: np.ndarray) -> np.ndarray:
    """(N,) the error L2 norm ||p_student - target||_2 per row (Paul, Ganguli & Dziugaite 2021,
    "Deep Learning on a Data Diet"): near 0 where the student already gives the target's answer
    with the target's confidence, up to sqrt(2) where it is sure of another label."""
    return np.linalg.norm(student_probs - target_probs, axis=1)


def prune_easy(student_probs: np.ndarray, target_probs: np.ndarray, keep: int, floor: int | None = None
               ) -> np.ndarray:
    """Data pruning: the `keep` rows worth training on, dropping the easiest first.

    Easiness is a low `el2n`: the rows the current student already answers as the large model
    does, as surely, have least to teach (Paul et al. 2021 kept CIFAR-10 accuracy with half the
    data pruned this way; not measured here); a confident disagreement is far, so it goes last.
    Each target label (its argmax) keeps at least min(its rows, `floor`) of its hardest rows
    (default keep // (2 x labels)), so pruning cannot wipe out a class the student already knows
    well (it would then forget it).

    Args:
        student_probs, target_probs: (N, L), the current student's and the targets' (the large
            model's soft labels, or the teacher's) distributions on the same rows.
        keep: rows to keep. floor: the least rows per label (see above).

    Returns:
        The kept row indices, sorted ascending (all rows when keep >= N).
    """
    n, n_labels = target_probs.shape
    if keep >= n:
        return np.arange(n, dtype=np.int64)
    if keep < 0:
        raise ValueError(f"keep must be >= 0, got {keep}")
    target = target_probs.argmax(1)
    hardness = el2n(student_probs, target_probs)
    floor = keep // (2 * n_labels) if floor is None else floor
    protected = np.zeros(n, dtype=bool)
    for label in range(n_labels):
        rows = np.flatnonzero(target == label)
        protected[rows[np.argsort(-hardness[rows], kind="stable")[:floor]]] = True
    # hardest first among the rest, until `keep` rows in all
    rest = np.flatnonzero(~protected)
    room = max(0, keep - int(protected.sum()))
    kept = np.concatenate([np.flatnonzero(protected), rest[np.argsort(-hardness[rest], kind="stable")[:room]]])
    return np.sort(kept).astype(np.int64)
