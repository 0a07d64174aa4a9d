"""What thresholds do, replayed on measured tiers, and the search for the cheapest (no guarantee).

Each tier is first run on *every* validation text (not only the ones earlier tiers leave
open; `cascade.calibrate.measure_tiers`), so any combination of thresholds can be simulated
exactly without running a model again (`simulate`): an item is answered by the first tier whose
prediction clears its threshold, else by the last tier, and it costs the mean milliseconds of
every tier it passed through. This replay is what both the search here and the guarantee
(`cascade.certify`) stand on.

Candidate thresholds per tier are quantiles of that tier's own confidences (RouteLLM's
threshold-by-quantile), plus "never answer"; the search is the full product over the non-last
tiers, so thresholds are chosen jointly, not one tier at a time (`frontier`). The result is a
frontier of (accuracy, large-model share, cost) points; the chosen point (`choose`) is the
cheapest that reaches the accuracy target on these items, or the most accurate within a
large-model share. By selection it is likely to miss the target on new data: `cascade.certify`
is what keeps a promise after the search.

With an out-of-scope label (labels.json's `oos_label`), a tier that answers it gets a second
threshold, searched jointly with the others, for those answers only: a low top probability on
"none of the intents" does not mean the tier is unsure the way it does between two intents, and
the large model is often no better on them.

Traffic weights (`oos_share`): validation sets rarely hold out-of-scope requests in the share
live traffic does (CLINC150: 3% of val, 18% of test). Weighting the validation items so that
out-of-scope ones count as that share of traffic makes every figure of the search (accuracy,
shares, cost, the target itself) an estimate for that traffic, the way rule mining weights its
out-of-scope matches (`cascade rules mine --oos-share`).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import numpy as np

NEVER = 1.000001  # a threshold no confidence reaches: the tier never answers


class CalibrationError(ValueError):
    """No thresholds meet the request; the message says what the best reachable point is."""


@dataclass
class TierRun:
    """One tier measured on the validation split."""

    name: str
    labels: list[str | None]  # None: abstained
    confidences: np.ndarray  # 0 where abstained
    mean_ms: float
    is_llm: bool = False


@dataclass
class Point:
    thresholds: tuple[float, ...]  # one per tier; the last tier's is unused (0.0)
    accuracy: float
    llm_share: float
    cost_ms: float  # expected ms per item
    shares: tuple[float, ...]  # share answered by each tier
    # per tier: the threshold for answers of the special (out-of-scope) label; None: `thresholds`
    label_thresholds: tuple[float | None, ...] = ()

    def to_json(self) -> dict:
        return asdict(self)


def subset(runs: list[TierRun], idx: np.ndarray) -> list[TierRun]:
    """The same tiers' measurements on the items `idx` only."""
    return [TierRun(r.name, [r.labels[i] for i in idx], r.confidences[idx], r.mean_ms, r.is_llm) for r in runs]


def candidate_thresholds(confidences: np.ndarray, answered: np.ndarray, n: int,
                         extra: tuple[float, ...] = ()) -> list[float]:
    """Up to `n` quantiles of the confidences of the items the tier answered, plus NEVER and the
    values in `extra`."""
    conf = confidences[answered]
    if conf.size == 0:
        return [NEVER]
    qs = {float(q) for q in np.unique(np.quantile(conf, np.linspace(0.0, 1.0, n)))}
    qs |= {float(t) for t in extra}
    return sorted(qs) + [NEVER]


def traffic_weights(gold: list[str], oos_label: str | None, oos_share: float | None) -> np.ndarray | None:
    """Per-item weights (mean 1) under which `oos_label` items are `oos_share` of the traffic;
    None (unweighted) when there is no such label, no share asked, or no such item."""
    if oos_label is None or oos_share is None:
        return None
    if not 0.0 < oos_share < 1.0:
        raise CalibrationError(f"--oos-share {oos_share}: must be in (0, 1)")
    is_oos = np.array([g == oos_label for g in gold])
    p = float(is_oos.mean()) if len(gold) else 0.0
    if p in (0.0, 1.0):
        return None
    return np.where(is_oos, oos_share / p, (1.0 - oos_share) / (1.0 - p))


def weighted_mean(x: np.ndarray, weights: np.ndarray | None) -> float:
    """The mean of `x` under `weights` (None: every item counts the same); 0 for no items."""
    if x.size == 0:
        return 0.0
    return float(np.average(x, weights=weights))


def _simulate_items(runs: list[TierRun], gold: list[str], thresholds: tuple[float, ...],
                    correct: list[np.ndarray], answered: list[np.ndarray],
                    label_thresholds: tuple[float | None, ...] = (), is_label: list[np.ndarray] | None = None,
                    weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, list, float]:
    """Per item: right or wrong, and cost; per tier: share answered; and the large-model share
    (shares weighted by `weights` when given)."""
    right, cost, shares, llm, _ = route_items(runs, len(gold), thresholds, correct, answered, label_thresholds,
                                              is_label, weights)
    return right, cost, shares, llm


def route_items(runs: list[TierRun], n: int, thresholds: tuple[float, ...], correct: list[np.ndarray],
                answered: list[np.ndarray], label_thresholds: tuple[float | None, ...] = (),
                is_label: list[np.ndarray] | None = None, weights: np.ndarray | None = None):
    """`_simulate_items`, plus per item the index of the tier that answers it."""
    open_mask = np.ones(n, dtype=bool)
    right = np.zeros(n, dtype=bool)
    cost = np.zeros(n)
    by = np.full(n, len(runs) - 1)
    shares, llm = [], 0.0
    last = len(runs) - 1
    for k, run in enumerate(runs):
        cost[open_mask] += run.mean_ms
        thr = thresholds[k]
        if k < len(label_thresholds) and label_thresholds[k] is not None and is_label is not None:
            thr = np.where(is_label[k], label_thresholds[k], thr)
        takes = open_mask if k == last else open_mask & answered[k] & (run.confidences >= thr)
        right |= takes & correct[k]
        by[takes] = k
        share = weighted_mean(takes, weights)
        shares.append(share)
        if run.is_llm:
            llm += share
        open_mask = open_mask & ~takes
    return right, cost, shares, llm, by


def correct_and_answered(runs: list[TierRun], gold: list[str]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per tier, the masks of the items it gets right and of those it answers (does not abstain on)."""
    correct = [np.array([p == g for p, g in zip(r.labels, gold)]) for r in runs]
    answered = [np.array([lab is not None for lab in r.labels]) for r in runs]
    return correct, answered


def label_masks(runs: list[TierRun], label: str | None) -> list[np.ndarray] | None:
    """Per tier, the mask of the items it answers `label` on (the `is_label` of `simulate`); None without one."""
    return None if label is None else [np.array([lab == label for lab in r.labels]) for r in runs]


def simulate(runs: list[TierRun], gold: list[str], thresholds: tuple[float, ...],
             correct: list[np.ndarray] | None = None, answered: list[np.ndarray] | None = None,
             label_thresholds: tuple[float | None, ...] = (), is_label: list[np.ndarray] | None = None,
             weights: np.ndarray | None = None) -> Point:
    """The cascade's accuracy, large-model share and cost at these thresholds (`label_thresholds`:
    per tier, the threshold for answers where `is_label` is set, None for the tier's own), as
    means over the items under `weights` (None: every item counts the same)."""
    if correct is None or answered is None:
        correct, answered = correct_and_answered(runs, gold)
    right, cost, shares, llm = _simulate_items(runs, gold, thresholds, correct, answered, label_thresholds, is_label,
                                               weights)
    return Point(tuple(thresholds), weighted_mean(right, weights), llm, weighted_mean(cost, weights), tuple(shares),
                 tuple(label_thresholds))


def confidence_of(runs: list[TierRun], gold: list[str], point: Point, target: float,
                  against_last: bool = False, label: str | None = None, weights: np.ndarray | None = None,
                  max_loss: float = 0.0) -> float:
    """One-sided confidence that the cascade at `point` reaches `target` beyond this sample
    (normal approximation): of accuracy >= target, or with `against_last`, of accuracy >= the
    last tier's alone minus `max_loss`, from the paired per-item difference (the two share their
    errors, so the paired bound is much tighter than two separate ones). With `weights`, weighted
    means and Kish's effective sample size (sum w)^2 / sum w^2.

    This was the pre-Learn-then-Test guarantee: a bound on one point, so applied to the point a
    search picked it overstates the confidence (tests/test_calibrate.py shows by how much). It
    stays for reports and that comparison; `certify` is what `--confidence` runs."""
    from statistics import NormalDist

    correct, answered = correct_and_answered(runs, gold)
    right = _simulate_items(runs, gold, point.thresholds, correct, answered, point.label_thresholds,
                            label_masks(runs, label), weights)[0].astype(float)
    w = np.ones(len(gold)) if weights is None else weights
    n = float(w.sum() ** 2 / (w ** 2).sum()) if len(gold) else 0.0
    if against_last:
        diff = right - correct[-1].astype(float)
        centre = weighted_mean(diff, w)
        se = np.sqrt(weighted_mean((diff - centre) ** 2, w) * n / (n - 1) / n) if n > 1 else 0.0
        mean = centre + max_loss
    else:
        p = weighted_mean(right, w)
        mean = p - target
        se = np.sqrt(max(p * (1 - p), 1e-12) / n)
    if se == 0:
        return 1.0 if mean >= 0 else 0.0
    return NormalDist().cdf(mean / se)


def frontier(runs: list[TierRun], gold: list[str], candidates: int = 24, label: str | None = None,
             min_label_answers: int = 10, weights: np.ndarray | None = None,
             extra: tuple[float, ...] = ()) -> list[Point]:
    """Every joint threshold combination on the candidate grid, simulated. With `label`, every
    non-last tier that gives that answer at least `min_label_answers` times gets a second grid
    for those answers (None in the grid: the tier's own threshold)."""
    if not runs:
        raise CalibrationError("no tiers to calibrate")
    correct, answered = correct_and_answered(runs, gold)
    is_label = label_masks(runs, label)
    grids = [candidate_thresholds(run.confidences, mask, candidates, extra) for run, mask in zip(runs[:-1], answered)]
    label_grids: list[list[float | None]] = []
    for k, run in enumerate(runs[:-1]):
        if is_label is not None and int((answered[k] & is_label[k]).sum()) >= min_label_answers:
            label_grids.append([None] + candidate_thresholds(run.confidences, answered[k] & is_label[k],
                                                              max(4, candidates // 2)))
        else:
            label_grids.append([None])
    points = []
    for combo in itertools.product(*grids):
        for label_combo in itertools.product(*label_grids):
            lt = tuple(label_combo) + (None,) if any(t is not None for t in label_combo) else ()
            points.append(simulate(runs, gold, tuple(combo) + (0.0,), correct, answered, lt, is_label, weights))
    return points


def pareto(points: list[Point], cost_key: str = "cost_ms") -> list[Point]:
    """Points not beaten by another that is at least as accurate and cheaper (by `cost_key`)."""
    best: list[Point] = []
    for p in sorted(points, key=lambda p: (getattr(p, cost_key), -p.accuracy)):
        if not best or p.accuracy > best[-1].accuracy:
            best.append(p)
    return best


def choose(points: list[Point], target_accuracy: float | None = None, max_llm_share: float | None = None,
           confident=None) -> Point:
    """The cheapest point reaching `target_accuracy`, or the most accurate within `max_llm_share`.

    `confident(point) -> bool`, when given, must also hold for a `target_accuracy` point: the
    cheapest point that just reaches the target on validation data is, by selection, likely to
    miss it on new data; a confidence bound asks for a margin the data supports."""
    if (target_accuracy is None) == (max_llm_share is None):
        raise CalibrationError("give exactly one of --target-accuracy and --max-llm-share")
    if target_accuracy is not None:
        ok = [p for p in points if p.accuracy >= target_accuracy - 1e-12]
        if not ok:
            best = max(points, key=lambda p: p.accuracy)
            raise CalibrationError(f"--target-accuracy {target_accuracy:.4f} is not reachable on this data: the "
                                   f"best combination reaches {best.accuracy:.4f} (llm share {best.llm_share:.3f})")
        ok.sort(key=lambda p: (p.cost_ms, p.llm_share, -p.accuracy))
        if confident is None:
            return ok[0]
        for p in ok:
            if confident(p):
                return p
        raise CalibrationError(f"--target-accuracy {target_accuracy:.4f}: points reach it on this data, but none "
                               "with the asked confidence; lower --confidence or use more validation data")
    ok = [p for p in points if p.llm_share <= max_llm_share + 1e-12]
    if not ok:
        least = min(points, key=lambda p: p.llm_share)
        raise CalibrationError(f"--max-llm-share {max_llm_share:.3f} is not reachable: at least "
                               f"{least.llm_share:.3f} of the items reach the large model")
    return max(ok, key=lambda p: (p.accuracy, -p.cost_ms))
