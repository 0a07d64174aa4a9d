"""Threshold calibration: pick every tier's confidence threshold jointly, on validation data.

Each tier is first run on *every* validation text (not only the ones earlier tiers leave
open), so any combination of thresholds can be simulated exactly without running a model
again: an item is answered by the first tier whose prediction clears its threshold, else by the
last tier, and it costs the mean milliseconds of every tier it passed through.

Candidate thresholds per tier are quantiles of that tier's own confidences (RouteLLM's
threshold-by-quantile), plus "never answer"; the search is the full product over the non-last
tiers, so thresholds are chosen jointly, not one tier at a time. The result is a frontier of
(accuracy, large-model share, cost) points; the chosen point is the cheapest that reaches the
accuracy target, or the most accurate within a large-model share.

With an out-of-scope label (labels.json's `oos_label`), a tier that answers it gets a second
threshold, searched jointly with the others, for those answers only: a low top probability on
"none of the intents" does not mean the tier is unsure the way it does between two intents, and
the large model is often no better on them.

Traffic weights (`oos_share`): validation sets rarely hold out-of-scope requests in the share
live traffic does (CLINC150: 3% of val, 18% of test). Weighting the validation items so that
out-of-scope ones count as that share of traffic makes every figure of the search (accuracy,
shares, cost, the target itself) an estimate for that traffic, the way rule mining weights its
out-of-scope matches (`cascade rules mine --oos-share`).

The guarantee (`--confidence C`, `certify`; docs/calibration.md). Picking the cheapest of
hundreds of grid points that pass a bound on the same data is a search: the winner is, by
selection, one whose sample was lucky. Learn then Test (Angelopoulos, Bates, Candes, Jordan,
Lei 2021) turns the choice into multiple testing with a fixed-sequence order:
1. learn a 1-D path through the joint grid on items that are not tested: the train split,
   where only the cheap tiers run (`path_from_other_items`; `cascade calibrate`'s default), or a
   random `learn_share` of the validation items (the rest are then the test items). The path
   (`greedy_path`) starts at "everything to the large model", whose loss is 0 by definition,
   and lowers one tier's threshold one grid step at a time, the move adding the fewest errors
   per item first, so the answered sets are nested and the steps small;
2. on the test items, walk the path and test each point's null hypothesis "its loss exceeds the
   tolerance" at level delta = 1 - C with an exact p-value; stop at the first point not
   rejected; the last rejected point is the answer.
Why not one split of val: 0.5 pt at 90% needs about 470 test items even when the cascade and
the large model never disagree ((1 - 0.005)^n <= 0.1), so a 500-item val cut in two certifies
nothing; the path needs only independence from the tested items, not unbiased data.
Fixed-sequence testing controls the family-wise error at delta without splitting it (a
point is only tested when every earlier one was rejected), so P(the chosen point's
loss > tolerance) <= delta holds *after* the selection, whatever the path looks like. The loss:
against the large model, the paired per-item loss l = correct_llm - correct_cascade in
{-1, 0, 1} (`paired_loss_pvalue`: the exact unconditional test on the trinomial of worse,
better and neither); for an absolute target, the error rate (`accuracy_pvalue`: exact
binomial). With traffic weights:
a betting test on the weighted loss (`betting_pvalue`). Label-free evidence (`certify`'s
`unlabelled`): the loss against the large model is at most how often a cheap tier answers and
disagrees with it, which needs no gold label.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field

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


# Thresholds tried besides the quantiles when the path is learnt on other items (`certify`'s
# `path_runs`): a student's confidences on its own training texts crowd near 1, so their
# quantiles alone would leave the range validation needs untried.
FIXED_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.985, 0.99, 0.995, 0.998,
                    0.999)


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


def _mean(x: np.ndarray, weights: np.ndarray | None) -> float:
    if x.size == 0:
        return 0.0
    return float(np.average(x, weights=weights))


def _simulate_items(runs: list[TierRun], gold: list[str], thresholds: tuple[float, ...],
                    correct: list[np.ndarray], answered: list[np.ndarray],
                    label_thresholds: tuple[float | None, ...] = (), is_label: list[np.ndarray] | None = None,
                    weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, list, float]:
    """Per item: right or wrong, and cost; per tier: share answered; and the large-model share
    (shares weighted by `weights` when given)."""
    right, cost, shares, llm, _ = _route_items(runs, len(gold), thresholds, correct, answered, label_thresholds,
                                               is_label, weights)
    return right, cost, shares, llm


def _route_items(runs: list[TierRun], n: int, thresholds: tuple[float, ...], correct: list[np.ndarray],
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
        share = _mean(takes, weights)
        shares.append(share)
        if run.is_llm:
            llm += share
        open_mask = open_mask & ~takes
    return right, cost, shares, llm, by


def _masks(runs: list[TierRun], gold: list[str]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    correct = [np.array([p == g for p, g in zip(r.labels, gold)]) for r in runs]
    answered = [np.array([lab is not None for lab in r.labels]) for r in runs]
    return correct, answered


def _label_masks(runs: list[TierRun], label: str | None) -> list[np.ndarray] | None:
    return None if label is None else [np.array([lab == label for lab in r.labels]) for r in runs]


def simulate(runs: list[TierRun], gold: list[str], thresholds: tuple[float, ...],
             correct: list[np.ndarray] | None = None, answered: list[np.ndarray] | None = None,
             label_thresholds: tuple[float | None, ...] = (), is_label: list[np.ndarray] | None = None,
             weights: np.ndarray | None = None) -> Point:
    """The cascade's accuracy, large-model share and cost at these thresholds (`label_thresholds`:
    per tier, the threshold for answers where `is_label` is set, None for the tier's own), as
    means over the items under `weights` (None: every item counts the same)."""
    if correct is None or answered is None:
        correct, answered = _masks(runs, gold)
    right, cost, shares, llm = _simulate_items(runs, gold, thresholds, correct, answered, label_thresholds, is_label,
                                               weights)
    return Point(tuple(thresholds), _mean(right, weights), llm, _mean(cost, weights), tuple(shares),
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

    correct, answered = _masks(runs, gold)
    right = _simulate_items(runs, gold, point.thresholds, correct, answered, point.label_thresholds,
                            _label_masks(runs, label), weights)[0].astype(float)
    w = np.ones(len(gold)) if weights is None else weights
    n = float(w.sum() ** 2 / (w ** 2).sum()) if len(gold) else 0.0
    if against_last:
        diff = right - correct[-1].astype(float)
        centre = _mean(diff, w)
        se = np.sqrt(_mean((diff - centre) ** 2, w) * n / (n - 1) / n) if n > 1 else 0.0
        mean = centre + max_loss
    else:
        p = _mean(right, w)
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
    correct, answered = _masks(runs, gold)
    is_label = _label_masks(runs, label)
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


# --- exact tests: p-values whose level holds at every sample size (pure functions) ---------


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), summed exactly in log space (the core has no scipy)."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    i = np.arange(k + 1, dtype=float)
    log_choose = np.concatenate([[0.0], np.cumsum(np.log((n - i[:-1]) / (i[:-1] + 1.0)))])
    log_pmf = log_choose + i * np.log(p) + (n - i) * np.log1p(-p)
    top = log_pmf.max()
    return float(min(1.0, np.exp(top) * np.exp(log_pmf - top).sum()))


def binom_upper(k: int, n: int, alpha: float) -> float:
    """Clopper-Pearson upper bound: the p where P(Binomial(n, p) <= k) = alpha, so a proportion
    seen k times in n is <= it with confidence 1 - alpha."""
    if k >= n:
        return 1.0
    lo, hi = k / n, 1.0
    for _ in range(40):  # bisection to ~1e-12; the cdf falls as p grows
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if binom_cdf(k, n, mid) > alpha else (lo, mid)
    return hi


def binom_lower(k: int, n: int, alpha: float) -> float:
    """Clopper-Pearson lower bound: the p where P(Binomial(n, p) >= k) = alpha."""
    return 0.0 if k <= 0 else 1.0 - binom_upper(n - k, n, alpha)


def accuracy_pvalue(errors: int, n: int, min_accuracy: float) -> float:
    """Exact p-value of H0 "accuracy < min_accuracy" from `errors` wrong answers in n i.i.d.
    items: P(Binomial(n, 1 - min_accuracy) <= errors), the largest it is under H0."""
    return binom_cdf(int(errors), int(n), 1.0 - min_accuracy)


def _xlogy(x: np.ndarray, y: float) -> np.ndarray:
    """x * log(y), 0 where x is 0 (also for y = 0)."""
    return np.where(x == 0, 0.0, x * np.log(y if y > 0 else 1e-300))


def paired_statistic(worse, better, n: int, max_loss: float):
    """How far below H0's boundary an outcome lies, in standard errors: (worse - better -
    n max_loss) / sqrt(max(worse + better, n |max_loss| / 2) + 1). Any statistic gives a valid
    exact test (`paired_loss_pvalue`); this one orders outcomes for power. Studentized, so that
    an outcome with few discordant pairs counts as the strong evidence it is (the raw difference
    would rank 0 - 0 with 20 - 20); the variance is floored at half of H0's least, n |max_loss|
    (no distribution of H0 has fewer discordant pairs on average), so that among outcomes with
    few discordant pairs, one more better pair makes it more extreme. Compared on typical outcomes
    (0-0 ... 20-30 at n = 500 and 1000), no floor and a floor at n |max_loss| were each worse
    somewhere and never better."""
    w, b = np.asarray(worse), np.asarray(better)
    return (w - b - n * max_loss) / np.sqrt(np.maximum(w + b, n * abs(max_loss) / 2) + 1.0)


def paired_tail(z: float, n: int, p_worse: float, p_better: float, max_loss: float) -> float:
    """P(paired_statistic <= z) for n i.i.d. items, each worse with probability `p_worse`, better
    with `p_better`, neither otherwise (summed over the trinomial's outcomes; those more than 9
    standard deviations out, < 1e-15 together, are left out)."""
    log_f = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1)))])

    def span(p: float) -> np.ndarray:
        sd = np.sqrt(n * p * (1.0 - p))
        return np.arange(max(0, int(n * p - 9 * sd - 9)), min(n, int(n * p + 9 * sd + 9)) + 1)

    w, b = span(p_worse)[:, None], span(p_better)[None, :]
    rest = n - w - b
    log_pmf = (log_f[n] - log_f[w] - log_f[b] - log_f[np.maximum(rest, 0)]
               + _xlogy(w, p_worse) + _xlogy(b, p_better) + _xlogy(rest, 1.0 - p_worse - p_better))
    keep = (rest >= 0) & (paired_statistic(w, b, n, max_loss) <= z + 1e-9)
    return float(min(1.0, np.exp(np.where(keep, log_pmf, -np.inf)).sum()))


def paired_loss_pvalue(worse: int, better: int, n: int, max_loss: float, nuisance: float, grid: int = 12) -> float:
    """Exact p-value of H0 "loss >= max_loss", the loss being P(worse) - P(better) over n i.i.d.
    paired items: `worse` where the large model is right and the cascade wrong, `better` the
    reverse (the per-item loss l = correct_llm - correct_cascade is 1, -1, or 0 on the rest).

    Why this test: l is 0 on most items (the cascade answers what the large model would, or the
    item reaches the large model), so a bound on l's range (Hoeffding on l shifted to [0, 1])
    wastes nearly all of the sample, and a betting or Bernstein bound pays a Markov/Chernoff
    factor that is large at the usual delta = 0.1; conditioning on the discordant pairs
    (McNemar) has no power when there are none, which is where the path starts. So: the exact
    unconditional test, p = sup over H0 of P(statistic <= observed) with the studentized
    `paired_statistic`, computed exactly on the trinomial (`paired_tail`). On H0's boundary
    P(worse) = (D + max_loss) / 2, P(better) = (D - max_loss) / 2 (for D >= |max_loss|; below,
    H0's least loss is -D), with the discordance D the nuisance parameter. As Berger & Boos (1994)
    do, D is restricted to its Clopper-Pearson upper bound at level `nuisance`, which is added to
    the p-value (valid: outside that event, probability <= nuisance; inside it the sup covers the
    truth); it keeps the sum small and drops only the far tail. The sup over D is taken on
    `grid` + 1 values, then refined around the largest (the tail is smooth in D). For a
    max_loss > 0 no D below it can carry that loss: a bound below the tolerance leaves only
    `nuisance`."""
    z = float(paired_statistic(int(worse), int(better), n, max_loss))
    upper = binom_upper(int(worse) + int(better), n, nuisance)
    low = max(0.0, max_loss)
    if upper <= low:
        return min(1.0, nuisance)

    def tail(disc: float) -> float:
        loss = max(max_loss, -disc)
        return paired_tail(z, n, (disc + loss) / 2, (disc - loss) / 2, max_loss)

    ds = np.linspace(low, upper, grid + 1)
    tails = [tail(d) for d in ds]
    k = int(np.argmax(tails))
    fine = np.linspace(ds[max(0, k - 1)], ds[min(grid, k + 1)], 9)
    return min(1.0, max(tails + [tail(d) for d in fine]) + nuisance)


def betting_pvalue(x: np.ndarray, max_mean: float, hi: float, prior_mean: float = 0.0, prior_var: float = 0.25,
                   prior_n: float = 20.0, orders: int = 8, seed: int = 0) -> float:
    """p-value of H0 "E[x] >= max_mean" for i.i.d. x_i <= hi (Waudby-Smith & Ramdas's testing by
    betting), for weighted losses, where no binomial applies.

    A gambler starts with 1 and stakes lam_i of it on each item against H0: wealth
    K = prod_i (1 + lam_i (max_mean - x_i)). Under H0 each factor has mean <= 1 whatever lam_i is,
    as long as lam_i depends only on the items before i, so K is a nonnegative supermartingale
    and P(K >= 1/alpha) <= alpha (Markov); the mean of K over a few random orders is still an
    e-value, so p = 1 / mean K. lam_i is aGRAPA's growth-rate bet (gap / (variance + gap^2)) from
    the running mean and variance, seeded with `prior_*` (the learn split's figures, worth
    `prior_n` items), capped at half of 1 / (hi - max_mean) so no factor falls below 1/2. The
    price of needing no distribution: about 2 ln(1/alpha) / z_alpha^2 (2.8x at alpha = 0.1) more
    items than an exact binomial test for the same margin."""
    x = np.asarray(x, dtype=float)
    if x.size == 0:
        return 1.0
    if max_mean >= hi:
        return 0.0 if (x < hi).any() else 1.0
    cap = 0.5 / (hi - max_mean)
    rng = np.random.default_rng(seed)
    count = prior_n + np.arange(x.size)
    log_wealth = []
    for _ in range(orders):
        xs = rng.permutation(x)
        s1 = np.concatenate([[0.0], np.cumsum(xs)[:-1]])  # sums of the items before each
        s2 = np.concatenate([[0.0], np.cumsum(xs * xs)[:-1]])
        mean = (prior_n * prior_mean + s1) / count
        var = np.maximum((prior_n * (prior_var + prior_mean ** 2) + s2) / count - mean ** 2, 1e-6)
        gap = max_mean - mean
        lam = np.clip(gap / (var + gap * gap), 0.0, cap)
        log_wealth.append(float(np.log1p(lam * (max_mean - xs)).sum()))
    top = max(log_wealth)  # 1 / mean(K), in log space: K can pass 1e308
    return float(min(1.0, np.exp(-top - np.log(np.mean(np.exp(np.array(log_wealth) - top))))))


def fisher_pvalue(p1: float, p2: float) -> float:
    """Fisher's combination of two independent p-values: P(chi2_4 >= -2 ln(p1 p2))."""
    t = p1 * p2
    return 0.0 if t <= 0 else float(min(1.0, t * (1.0 - np.log(t))))


def _least_rejected(pvalue, alpha: float, lo: float, hi: float) -> float:
    """The least level in [lo, hi] whose H0 a p-value falling in the level rejects at `alpha`, by
    bisection: the confidence bound the test implies (`hi` when even that is not rejected)."""
    if pvalue(hi) > alpha:
        return hi
    for _ in range(22):  # to ~1e-6 on [-1, 1]
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if pvalue(mid) <= alpha else (mid, hi)
    return hi


def paired_loss_bound(worse: int, better: int, n: int, alpha: float, nuisance: float) -> float:
    """Upper confidence bound at 1 - alpha on the loss against the large model (the least max_loss
    whose H0 `paired_loss_pvalue` rejects)."""
    return _least_rejected(lambda e: paired_loss_pvalue(worse, better, n, e, nuisance), alpha, -1.0, 1.0)


# --- Learn then Test: the thresholds that keep their promise after the search ---------------


def subset(runs: list[TierRun], idx: np.ndarray) -> list[TierRun]:
    """The same tiers' measurements on the items `idx` only."""
    return [TierRun(r.name, [r.labels[i] for i in idx], r.confidences[idx], r.mean_ms, r.is_llm) for r in runs]


@dataclass
class Step:
    """One point of the fixed sequence: thresholds found on learn, tested on test."""

    point: Point  # its figures where the path was learnt
    tested: bool = False
    p_value: float | None = None
    certified: bool = False
    source: str = ""  # "val", "unlabelled", "val+unlabelled" (Fisher), "definition" (the large model alone)
    test: dict = field(default_factory=dict)  # its figures on the test split (and the unlabelled items)

    def to_json(self) -> dict:
        return {"point": self.point.to_json(), "tested": self.tested, "p_value": self.p_value,
                "certified": self.certified, "source": self.source, "test": self.test}


@dataclass
class Certificate:
    """What `certify` tested and found: with probability >= `confidence` over the validation
    sample, the chosen point's loss (goal "llm") is <= `level`, or its accuracy (goal "accuracy")
    is >= `level`, on the distribution the items were drawn from (under the traffic weights)."""

    goal: str  # "llm" | "accuracy"
    level: float  # the tolerated loss against the large model, or the least accuracy
    confidence: float
    method: str  # the p-value used on the test split
    path_from: str  # "learn split" of the validation items, or "other items" (`certify`'s path_runs)
    learn_n: int  # items the path was learnt on
    test_n: int
    unlabelled_n: int
    seed: int
    steps: list[Step]
    chosen: int | None  # index in `steps` of the cheapest certified point

    @property
    def point(self) -> Point | None:
        return None if self.chosen is None else self.steps[self.chosen].point

    def to_json(self) -> dict:
        return {"goal": self.goal, "level": self.level, "confidence": self.confidence, "method": self.method,
                "path_from": self.path_from, "learn_n": self.learn_n, "test_n": self.test_n,
                "unlabelled_n": self.unlabelled_n,
                "seed": self.seed, "chosen": self.chosen, "steps": [s.to_json() for s in self.steps]}


class _Split:
    """Precomputed masks of one set of items, to route any point over them fast."""

    def __init__(self, runs: list[TierRun], gold: list[str] | None, label: str | None,
                 weights: np.ndarray | None = None):
        self.runs, self.n, self.weights = runs, len(runs[0].labels), weights
        self.answered = [np.array([lab is not None for lab in r.labels]) for r in runs]
        if gold is None:  # unlabelled: only agreement with the large model's answers is known
            self.correct = [np.zeros(self.n, dtype=bool) for _ in runs]
        else:
            self.correct = [np.array([p == g for p, g in zip(r.labels, gold)]) for r in runs]
        self.is_label = _label_masks(runs, label)
        reference = np.array(runs[-1].labels, dtype=object)  # the large model's answers
        self.agrees = [np.array(r.labels, dtype=object) == reference for r in runs]

    def route(self, point: Point):
        right, _, _, llm_share, by = _route_items(self.runs, self.n, point.thresholds, self.correct, self.answered,
                                                  point.label_thresholds, self.is_label, self.weights)
        agrees = np.choose(by, self.agrees) if len(self.runs) > 1 else np.ones(self.n, dtype=bool)
        return right, llm_share, by, agrees

    def mean(self, x: np.ndarray) -> float:
        return _mean(x.astype(float), self.weights)


def greedy_path(runs: list[TierRun], gold: list[str], candidates: int = 24, label: str | None = None,
                extra: tuple[float, ...] = (), weights: np.ndarray | None = None,
                min_label_answers: int = 10) -> list[Point]:
    """The order fixed-sequence testing walks: from "everything to the last tier", lower one
    threshold by one grid step at a time, taking each time the move whose newly answered items
    are the least often wrong here (smoothed: (errors added + kappa (1 - threshold)) / (items
    added + kappa), kappa = 1, so a move these items say nothing about counts as its threshold's
    nominal error rate), until every threshold is at its lowest.

    Why this shape: the walk stops at its first failure, so (1) the answered sets must be nested
    (a path that zigzags between tiers' thresholds, as a Pareto front of a few hundred items
    does, lets a risky item in at some step and stops there although later steps would drop it
    again), and (2) the steps must be small (a jump from a safe point straight to a risky one
    ends the walk where the loss is still far below the tolerance). Tiers with a label grid
    (`frontier`'s out-of-scope thresholds) get it as one more coordinate, starting at never."""
    if not runs:
        raise CalibrationError("no tiers to calibrate")
    last = len(runs) - 1
    n = len(gold)
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=float)
    correct, answered = _masks(runs, gold)
    is_label = _label_masks(runs, label)
    # coordinates: (tier, is label threshold, ascending grid ending in NEVER); position starts at NEVER
    coords = [(k, False, candidate_thresholds(runs[k].confidences, answered[k], candidates, extra))
              for k in range(last)]
    for k in range(last):
        if is_label is not None and int((answered[k] & is_label[k]).sum()) >= min_label_answers:
            coords.append((k, True, candidate_thresholds(runs[k].confidences, answered[k] & is_label[k],
                                                         max(4, candidates // 2), extra)))
    has_label = any(is_lab for _, is_lab, _ in coords)
    pos = [len(grid) - 1 for _, _, grid in coords]

    def at(pos: list[int]) -> tuple[tuple, tuple]:
        thr = [NEVER] * last + [0.0]
        lab: list[float | None] = [None] * len(runs)
        for (k, is_lab, grid), i in zip(coords, pos):
            if is_lab:
                lab[k] = grid[i]
            else:
                thr[k] = grid[i]
        return tuple(thr), (tuple(lab) if has_label else ())

    def state(pos: list[int]) -> tuple[float, float]:  # (weighted errors, weighted items at the last tier)
        thr, lab = at(pos)
        right, _, _, _, by = _route_items(runs, n, thr, correct, answered, lab, is_label)
        return float(w[~right].sum()), float(w[by == last].sum())

    def point(pos: list[int]) -> Point:
        thr, lab = at(pos)
        return simulate(runs, gold, thr, correct, answered, lab, is_label, weights)

    path = [point(pos)]
    errors, at_last = state(pos)
    while True:
        best = None
        for c, (k, _, grid) in enumerate(coords):
            if pos[c] == 0:
                continue
            trial = pos.copy()
            trial[c] -= 1
            e, a = state(trial)
            score = ((e - errors) + (1.0 - min(grid[trial[c]], 1.0))) / (max(0.0, at_last - a) + 1.0)
            if best is None or (score, at_last - a) < best[0]:
                best = ((score, at_last - a), trial, e, a)
        if best is None:
            return path
        _, pos, errors, at_last = best
        path.append(point(pos))


def path_from_other_items(path_runs: list[TierRun], path_gold: list[str], runs: list[TierRun], candidates: int = 24,
                          label: str | None = None) -> list[Point]:
    """`greedy_path` learnt on other labelled items than the validation ones (`certify`'s
    `path_runs`): the non-last tiers measured there, the large model counted as right (it was not
    run there), each tier's cost taken from `runs` (the validation measurement), and the fixed
    thresholds tried too (`FIXED_THRESHOLDS`: where these items hold no confidences, a student
    being surer on its own training texts, validation may)."""
    last = len(runs) - 1
    if len(path_runs) < last or [r.name for r in path_runs[:last]] != [r.name for r in runs[:last]]:
        raise CalibrationError("path_runs: the non-last tiers, in order")
    cheap = [TierRun(r.name, r.labels, r.confidences, m.mean_ms, m.is_llm) for r, m in zip(path_runs, runs)]
    perfect = TierRun(runs[-1].name, list(path_gold), np.ones(len(path_gold)), runs[-1].mean_ms, runs[-1].is_llm)
    return greedy_path(cheap[:last] + [perfect], list(path_gold), candidates, label, extra=FIXED_THRESHOLDS)


def certify(runs: list[TierRun], gold: list[str], confidence: float, *, max_loss: float | None = None,
            min_accuracy: float | None = None, candidates: int = 24, label: str | None = None,
            weights: np.ndarray | None = None, path_runs: list[TierRun] | None = None,
            path_gold: list[str] | None = None, path: list[Point] | None = None, learn_share: float = 0.3,
            seed: int = 0, unlabelled: list[TierRun] | None = None, nuisance_share: float = 0.05,
            bounds: bool = True) -> Certificate:
    """Learn then Test (module docstring): the cheapest point whose loss against the large model
    is <= `max_loss`, or whose accuracy is >= `min_accuracy`, with probability >= `confidence`.

    Args:
        runs, gold: the tiers measured on the validation items, and their gold labels.
        confidence: 1 - delta, the probability over the validation sample that the promise holds.
        max_loss / min_accuracy: exactly one; the tolerance below the large model's accuracy, or
            the least accuracy.
        candidates, label: the grid of `frontier`, where the path is learnt.
        weights: traffic weights (`traffic_weights`) for every item of `gold`. Their test is a
            betting test on the weighted loss, exact for weights that are the true ratio of traffic
            to validation shares; the ratio is estimated from the sample's own out-of-scope share,
            which is the approximation (a relative error of about sqrt((1 - p) / (n p)) in the
            out-of-scope items' weight, p their share of val).
        path_runs, path_gold: where the path is learnt when given: the non-last tiers measured on
            other labelled items than `gold` (the train split: cheap, no large model needed; on
            them it counts as right, so within a share bucket the path takes the combination with
            the fewest cheap-tier errors). Then every validation item tests. The path needs only
            to be independent of the tested items, not unbiased: tiers fit to those texts make it
            worse, not invalid.
        path: the sequence itself, learnt beforehand (`path_from_other_items`): as `path_runs`.
        learn_share, seed: without `path_runs`, the share of the validation items, drawn at random
            with `seed`, that learns the path (the rest tests it).
        unlabelled: label-free evidence: the same tiers measured on items with no gold label,
            the last run's labels being the large model's answers (its teacher-label cache, or
            audited traffic). On them the loss against the large model is at most how often a
            cheap tier answers and disagrees with it (that count is binomial: an exact test of
            "disagreement >= max_loss", which H0 implies). With a learn split, per point the learn
            items pick the evidence expected to give the smaller p-value: val alone, unlabelled
            alone, or both by Fisher's combination; with `path_runs` there is nothing to predict
            from and Fisher's combination is used (valid: the two sets are independent). The
            guarantee then holds for the tiers that produced those predictions: a student's own
            training texts need cross-fitted (out-of-fold) predictions, and their thresholds must
            mean what the deployed student's do. Only with `max_loss`, without weights.
        nuisance_share: the share of delta that bounds the discordance (`paired_loss_pvalue`).
        bounds: also compute each tested point's confidence bound (for reports; slower).

    Returns: the `Certificate`, `chosen` None when no point passed (only possible for an
    absolute target: with `max_loss` the large model alone passes by definition)."""
    if (max_loss is None) == (min_accuracy is None):
        raise CalibrationError("certify: give exactly one of max_loss and min_accuracy")
    if not 0.0 < confidence < 1.0:
        raise CalibrationError(f"--confidence {confidence}: must be in (0, 1)")
    if max_loss is not None and not 0.0 <= max_loss < 1.0:
        raise CalibrationError(f"--max-loss {max_loss}: must be in [0, 1)")
    if unlabelled is not None:
        if max_loss is None:
            raise CalibrationError("label-free evidence bounds the loss against the large model only: "
                                   "use --target-accuracy llm")
        if weights is not None:
            raise CalibrationError("label-free evidence with traffic weights: the weights need gold labels")
        if [r.name for r in unlabelled] != [r.name for r in runs]:
            raise CalibrationError("the unlabelled evidence must measure the same tiers, in the same order")
    delta = 1.0 - confidence
    nuisance = nuisance_share * delta
    n, last = len(gold), len(runs) - 1
    if path is None and path_runs is not None:
        if path_gold is None:
            raise CalibrationError("path_runs need path_gold")
        path = path_from_other_items(path_runs, path_gold, runs, candidates, label)
    if path is not None:
        learn, test_idx = None, np.arange(n)
        learn_n = len(path_gold) if path_gold is not None else 0
        path = list(path)
    else:
        if not 0.0 < learn_share < 1.0:
            raise CalibrationError(f"learn_share {learn_share}: must be in (0, 1)")
        n_learn = int(round(learn_share * n))
        if n_learn < 1 or n - n_learn < 1:
            raise CalibrationError(f"{n} validation items are too few to split into learn and test")
        order = np.random.default_rng(seed).permutation(n)
        learn_idx, test_idx = np.sort(order[:n_learn]), np.sort(order[n_learn:])
        w_learn = None if weights is None else weights[learn_idx]
        learn_runs, learn_gold = subset(runs, learn_idx), [gold[i] for i in learn_idx]
        learn = _Split(learn_runs, learn_gold, label, w_learn)
        learn_n = n_learn
        path = greedy_path(learn_runs, learn_gold, candidates, label, weights=w_learn)
    extra = None if unlabelled is None else _Split(unlabelled, None, label)
    w_max = None if weights is None else float(np.max(weights))

    w_test = None if weights is None else weights[test_idx]
    test = _Split(subset(runs, test_idx), [gold[i] for i in test_idx], label, w_test)
    if max_loss is not None and not (path and path[0].thresholds[:last] == (NEVER,) * last
                                     and not path[0].label_thresholds):
        # fixed a priori, so its figures may come from the test items
        alone = simulate(test.runs, [gold[i] for i in test_idx], (NEVER,) * last + (0.0,), weights=w_test)
        path = [alone] + [p for p in path if (p.thresholds, p.label_thresholds) != (alone.thresholds, ())]
    steps = [Step(p) for p in path]
    method = ("betting on the weighted loss" if weights is not None else
              "exact unconditional test on the paired loss" if max_loss is not None else "binomial on the errors")
    if unlabelled is not None:
        method += "; binomial on the disagreements of the unlabelled items"

    def prior(x_of) -> tuple[float, float, float]:
        """The betting test's prior (mean, variance, weight in items): the learn split's, else vague."""
        if learn is None:
            return 0.0, 0.05, 5.0
        xl = x_of(learn)
        return float(xl.mean()), float(xl.var()), 20.0

    chosen = None
    for k, step in enumerate(steps):
        step.tested = True
        right, share, by, _ = test.route(step.point)
        llm_right = test.correct[-1]
        step.test = {"n": test.n, "llm_share": share, "accuracy": test.mean(right),
                     "llm_accuracy": test.mean(llm_right)}
        if max_loss is not None:
            worse, better = llm_right & ~right, right & ~llm_right
            step.test["loss"] = test.mean(worse) - test.mean(better)

            def paired_x(split: _Split, point=step.point) -> np.ndarray:
                r = split.route(point)[0]
                x = (split.correct[-1] & ~r).astype(float) - (r & ~split.correct[-1])
                return x if split.weights is None else split.weights * x

            if k == 0:  # everything to the large model: the cascade is the large model
                step.p_value, step.source = 0.0, "definition"
            elif weights is not None:
                x, (m0, v0, n0) = paired_x(test), prior(paired_x)
                step.p_value = betting_pvalue(x, max_loss, w_max, m0, v0, n0, seed=seed)
                step.source = "val"
                if bounds:
                    step.test["loss_bound"] = _least_rejected(
                        lambda e: betting_pvalue(x, e, w_max, m0, v0, n0, seed=seed), delta, -w_max, w_max)
            else:
                nw, nb = int(worse.sum()), int(better.sum())
                p_val = paired_loss_pvalue(nw, nb, test.n, max_loss, nuisance)
                step.p_value, step.source = p_val, "val"
                if bounds:
                    step.test["loss_bound"] = paired_loss_bound(nw, nb, test.n, delta, nuisance)
                if extra is not None:
                    _, u_share, u_by, u_agrees = extra.route(step.point)
                    disagree = int(((u_by < last) & ~u_agrees).sum())
                    p_unl = binom_cdf(disagree, extra.n, max_loss)
                    step.test.update({"unlabelled_n": extra.n, "unlabelled_llm_share": u_share,
                                      "disagreement": disagree / max(1, extra.n)})
                    if bounds:
                        step.test["disagreement_bound"] = binom_upper(disagree, extra.n, delta)
                    step.source = "val+unlabelled"
                    if learn is not None:  # which evidence to use, from the p-values the learn rates predict
                        l_right, _, l_by, l_agrees = learn.route(step.point)
                        lw = float((learn.correct[-1] & ~l_right).mean()) * test.n
                        lb = float((l_right & ~learn.correct[-1]).mean()) * test.n
                        ld = float(((l_by < last) & ~l_agrees).mean()) * extra.n
                        guess = {"val": paired_loss_pvalue(round(lw), round(lb), test.n, max_loss, nuisance),
                                 "unlabelled": binom_cdf(round(ld), extra.n, max_loss)}
                        guess["val+unlabelled"] = fisher_pvalue(guess["val"], guess["unlabelled"])
                        step.source = min(guess, key=guess.get)
                    step.p_value = {"val": p_val, "unlabelled": p_unl,
                                    "val+unlabelled": fisher_pvalue(p_val, p_unl)}[step.source]
        else:
            errors = ~right
            step.source = "val"
            if weights is not None:
                def error_x(split: _Split, point=step.point) -> np.ndarray:
                    return split.weights * ~split.route(point)[0]

                x, (m0, v0, n0) = error_x(test), prior(error_x)
                step.p_value = betting_pvalue(x, 1.0 - min_accuracy, w_max, m0, v0, n0, seed=seed)
                if bounds:
                    step.test["accuracy_bound"] = 1.0 - _least_rejected(
                        lambda e: betting_pvalue(x, e, w_max, m0, v0, n0, seed=seed), delta, 0.0, w_max)
            else:
                step.p_value = accuracy_pvalue(int(errors.sum()), test.n, min_accuracy)
                if bounds:
                    step.test["accuracy_bound"] = 1.0 - binom_upper(int(errors.sum()), test.n, delta)
        step.certified = step.p_value <= delta
        if not step.certified:
            break
        chosen = k
    return Certificate("llm" if max_loss is not None else "accuracy",
                       max_loss if max_loss is not None else min_accuracy, confidence, method,
                       "other items" if learn is None else "learn split", learn_n, len(test_idx),
                       0 if extra is None else extra.n, seed, steps, chosen)


# --- running tiers and writing results (the `cascade calibrate` command) -------------------


def measure_tiers(cascade, is_llm: list[bool], texts: list[str], batch_size: int = 256,
                  progress=None, tiers: int | None = None) -> list[TierRun]:
    """Run every tier (or the first `tiers`) on every text (batched) and time it."""
    import time

    runs = []
    for tier, llm in list(zip(cascade.tiers, is_llm))[:tiers]:
        labels: list[str | None] = []
        conf: list[float] = []
        t0 = time.perf_counter()
        for start in range(0, len(texts), batch_size):
            for pred in tier.predict_batch(texts[start:start + batch_size]):
                labels.append(None if pred is None else pred.label)
                conf.append(0.0 if pred is None else float(pred.confidence))
            if progress:
                progress(tier.name, min(len(texts), start + batch_size), len(texts))
        ms = 1000.0 * (time.perf_counter() - t0) / max(1, len(texts))
        runs.append(TierRun(tier.name, labels, np.array(conf), ms, llm))
    return runs


def format_frontier(points: list[Point], names: list[str], chosen: Point, label: str | None = None) -> str:
    def fmt(t: float | None) -> str:
        return "-" if t is None else "never" if t >= NEVER else f"{t:.4f}"

    # a column per tier that has a label threshold somewhere in the table
    label_cols = [k for k in range(len(names) - 1)
                  if any(k < len(p.label_thresholds) and p.label_thresholds[k] is not None for p in points)]
    head = "  ".join([f"{'thr ' + n:>12}" for n in names[:-1]] + [f"{f'{names[k]}:{label}':>16}" for k in label_cols])
    lines = [f"{head}  {'accuracy':>9}  {'llm share':>9}  {'ms/item':>8}"]
    for p in points:
        mark = "  <- chosen" if p == chosen else ""
        lt = lambda k: p.label_thresholds[k] if k < len(p.label_thresholds) else None  # noqa: E731
        thr = "  ".join([f"{fmt(t):>12}" for t in p.thresholds[:-1]] + [f"{fmt(lt(k)):>16}" for k in label_cols])
        lines.append(f"{thr}  {p.accuracy:>9.4f}  {p.llm_share:>9.3f}  {p.cost_ms:>8.3f}{mark}")
    return "\n".join(lines)


def plot_frontier(points: list[Point], chosen: Point, path, llm_accuracy: float | None = None,
                  title: str | None = None, certificate: Certificate | None = None) -> None:
    """Accuracy against large-model share and against cost, every grid point and the Pareto
    fronts, the chosen point marked; with a `certificate`, a third panel shows why it is there:
    the tested sequence on the test items, each point's confidence bound against the tolerance,
    the certified ones, and the first that was not."""
    from cascade.plots import pyplot

    if (plt := pyplot()) is None:  # matplotlib is the optional `plots` extra
        return
    panels = 3 if certificate is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.4))
    for ax, key, xlabel in ((axes[0], "llm_share", "large-model share"), (axes[1], "cost_ms", "ms per item")):
        ax.scatter([getattr(p, key) for p in points], [p.accuracy for p in points], s=6, c="0.75", label="grid")
        front = pareto(points, key)
        ax.plot([getattr(p, key) for p in front], [p.accuracy for p in front], "-o", ms=3, label="frontier")
        ax.scatter([getattr(chosen, key)], [chosen.accuracy], s=90, marker="*", c="red", zorder=5, label="chosen")
        if llm_accuracy is not None:
            ax.axhline(llm_accuracy, ls="--", c="0.4", lw=1, label="last tier alone")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    if certificate is not None:
        _plot_certificate(axes[2], certificate)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_certificate(ax, cert: Certificate) -> None:
    """The fixed sequence on the test items: x its large-model share there, y its loss against
    the large model (or its accuracy) with the confidence bound the test implies."""
    paired = cert.goal == "llm"
    key, bound = ("loss", "loss_bound") if paired else ("accuracy", "accuracy_bound")
    tested = [s for s in cert.steps if s.tested and key in s.test]
    for s in tested:
        x, y = s.test["llm_share"], s.test[key]
        b = s.test.get(bound)
        colour = "tab:green" if s.certified else "tab:red"
        if b is not None and s.source != "definition":
            ax.plot([x, x], [y, b], c=colour, lw=1, alpha=0.7)
            ax.scatter([x], [b], marker="_", s=60, c=colour)
        ax.scatter([x], [y], s=22, c=colour, marker="o" if s.certified else "x", zorder=4)
    ax.axhline(cert.level, ls="--", c="0.3", lw=1, label=("tolerance" if paired else "target"))
    if cert.chosen is not None:
        s = cert.steps[cert.chosen]
        ax.scatter([s.test["llm_share"]], [s.test[key]], s=110, marker="*", c="red", zorder=5, label="chosen")
    ax.scatter([], [], c="tab:green", s=22, label="certified (H0 rejected)")
    ax.scatter([], [], c="tab:red", marker="x", s=22, label="first not rejected: the walk stops")
    ax.set_xlabel("large-model share (the tested items)")
    ax.set_ylabel("loss against the large model" if paired else "accuracy")
    ax.set_title(f"fixed-sequence test: {len(tested)} of {len(cert.steps)} points tested, "
                 f"{cert.confidence:.0%} bounds", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=7)


def format_certificate(cert: Certificate, names: list[str]) -> str:
    """The tested sequence as a table: thresholds, test figures, bound, p-value, verdict."""
    paired = cert.goal == "llm"
    fmt = lambda t: "never" if t >= NEVER else f"{t:.4f}"  # noqa: E731
    head = "  ".join(f"{'thr ' + n:>12}" for n in names[:-1])
    col = "loss" if paired else "accuracy"
    lines = [f"{head}  {'llm share':>9}  {col:>9}  {'bound':>8}  {'p-value':>8}  {'source':>14}"]
    for k, s in enumerate(cert.steps):
        if not s.tested:
            lines.append(f"  ... {len(cert.steps) - k} cheaper points not tested (the walk stopped)")
            break
        t = s.test
        value = t.get("loss" if paired else "accuracy", float("nan"))
        b = t.get("loss_bound" if paired else "accuracy_bound")
        verdict = ("  <- chosen" if k == cert.chosen else "" if s.certified else "  <- not rejected: stop")
        lines.append("  ".join(f"{fmt(x):>12}" for x in s.point.thresholds[:-1])
                     + f"  {t['llm_share']:>9.3f}  {value:>+9.4f}  {'' if b is None else f'{b:+.4f}':>8}"
                     f"  {s.p_value:>8.4f}  {s.source:>14}{verdict}")
    return "\n".join(lines)


def calibrate_runs(runs: list[TierRun], gold: list[str], target_accuracy: float | str | None = None,
                   max_llm_share: float | None = None, *, confidence: float | None = None, max_loss: float = 0.0,
                   candidates: int = 24, label: str | None = None, weights: np.ndarray | None = None,
                   path_runs: list[TierRun] | None = None, path_gold: list[str] | None = None,
                   learn_share: float = 0.3, seed: int = 0, unlabelled: list[TierRun] | None = None) -> dict:
    """The decision of `cascade calibrate` on measured tiers, no model run: `target_accuracy` (a
    number, or "llm" for the large model's own minus `max_loss`) at the least cost — with
    `confidence`, certified by `certify`; without, the cheapest point reaching it on these items
    (no guarantee) — or the most accurate point within `max_llm_share`.

    Returns: {"points": the grid on all items, "chosen": the chosen point's figures on all items,
    "certificate": the `Certificate` or None, "target_accuracy", "last_accuracy", "against_last"}."""
    last_accuracy = _mean(np.array([p == g for p, g in zip(runs[-1].labels, gold)]), weights)
    against_last = target_accuracy == "llm"
    if max_loss and not against_last:
        raise CalibrationError("--max-loss is a tolerance below the large model: it goes with --target-accuracy llm")
    if against_last:
        target_accuracy = last_accuracy - max_loss
    elif isinstance(target_accuracy, str):
        try:
            target_accuracy = float(target_accuracy)
        except ValueError:
            raise CalibrationError(f"--target-accuracy {target_accuracy!r}: a number in (0, 1] or 'llm'") from None
    points = frontier(runs, gold, candidates, label, weights=weights)
    cert = None
    if confidence is not None and target_accuracy is not None and max_llm_share is None:
        cert = certify(runs, gold, confidence, max_loss=max_loss if against_last else None,
                       min_accuracy=None if against_last else target_accuracy, candidates=candidates, label=label,
                       weights=weights, path_runs=path_runs, path_gold=path_gold, learn_share=learn_share,
                       seed=seed, unlabelled=unlabelled)
        if cert.point is None:
            first = cert.steps[0].test if cert.steps else {}
            raise CalibrationError(
                f"--target-accuracy {target_accuracy:.4f} with confidence {confidence}: no point passed the test "
                f"(the most accurate on the path: {first.get('accuracy', float('nan')):.4f} on the "
                f"{cert.test_n} test items, at least {first.get('accuracy_bound', float('nan')):.4f} with that "
                "confidence); lower the target or --confidence, or use more validation data")
        p = cert.point
        is_label = _label_masks(runs, label)
        chosen = simulate(runs, gold, p.thresholds, label_thresholds=p.label_thresholds, is_label=is_label,
                          weights=weights)
    else:
        chosen = choose(points, target_accuracy if max_llm_share is None else None, max_llm_share)
    return {"points": points, "chosen": chosen, "certificate": cert, "target_accuracy": target_accuracy,
            "last_accuracy": last_accuracy, "against_last": against_last}


def run_calibration(config_path, data_dir, target_accuracy: float | str | None = None,
                    max_llm_share: float | None = None, split: str = "val", candidates: int = 24,
                    limit: int | None = None, write: bool = True, progress=None,
                    confidence: float | None = None, oos_threshold: bool = True,
                    oos_share: float | None = None, max_loss: float = 0.0, path_split: str | None = "train",
                    path_limit: int = 3000, learn_share: float = 0.3, seed: int = 0,
                    unlabelled: list[TierRun] | None = None) -> dict:
    """Measure the configured tiers on `split`, choose thresholds (`calibrate_runs`), and (with
    `write`) store them in the config; the frontier goes beside it as `NAME.frontier.json` and
    `NAME.frontier.png`. `oos_share`: weight the items so the dataset's out-of-scope label is that
    share of traffic. With `confidence`, the certified path is learnt on up to `path_limit` items
    of `path_split` (the cheap tiers only; a seeded sample), else, when that split is absent or
    None, on a `learn_share` of `split`. `unlabelled`: label-free evidence (`certify`)."""
    import json
    from pathlib import Path

    from cascade.config import build_cascade, dump_config, load_config
    from cascade.data import load_labels, load_split
    from cascade.evaluate import LLM_KINDS

    config_path = Path(config_path)
    config = load_config(config_path)
    examples = load_split(data_dir, split)[:limit]
    texts, gold = [ex.text for ex in examples], [ex.label for ex in examples]
    use_path = (confidence is not None and max_llm_share is None and path_split not in (None, split)
                and (Path(data_dir) / f"{path_split}.jsonl").exists() and len(config.tiers) > 1)
    path_runs = path_gold = None
    cascade = build_cascade(config, config_path.parent)
    try:
        is_llm = [spec.kind in LLM_KINDS for spec in config.tiers]
        runs = measure_tiers(cascade, is_llm, texts, progress=progress)
        if use_path:
            path_examples = load_split(data_dir, path_split)
            if len(path_examples) > path_limit:
                keep = np.sort(np.random.default_rng(seed).choice(len(path_examples), path_limit, replace=False))
                path_examples = [path_examples[i] for i in keep]
            path_gold = [ex.label for ex in path_examples]
            path_runs = measure_tiers(cascade, is_llm, [ex.text for ex in path_examples], progress=progress,
                                      tiers=len(config.tiers) - 1)
    finally:
        cascade.close()
    oos_label = load_labels(data_dir).oos_label
    weights = traffic_weights(gold, oos_label, oos_share)
    label = oos_label if oos_threshold else None
    decision = calibrate_runs(runs, gold, target_accuracy, max_llm_share, confidence=confidence, max_loss=max_loss,
                              candidates=candidates, label=label, weights=weights, path_runs=path_runs,
                              path_gold=path_gold, learn_share=learn_share, seed=seed, unlabelled=unlabelled)
    points, chosen, cert = decision["points"], decision["chosen"], decision["certificate"]
    target_accuracy, last_accuracy = decision["target_accuracy"], decision["last_accuracy"]
    names = [r.name for r in runs]
    report = {
        "split": split, "n": len(gold), "tiers": names,
        "tier_accuracy_alone": {r.name: _mean(np.array([p == g for p, g in zip(r.labels, gold)]), weights)
                                for r in runs},
        "oos_share": oos_share if weights is not None else None,
        "split_oos_share": (float(np.mean([g == oos_label for g in gold])) if oos_label is not None else None),
        "tier_mean_ms": {r.name: r.mean_ms for r in runs},
        "target_accuracy": target_accuracy, "max_loss": max_loss if decision["against_last"] else None,
        "max_llm_share": max_llm_share, "confidence": confidence,
        "label_threshold_label": label,
        "chosen": chosen.to_json(), "last_tier_accuracy": last_accuracy,
        # the pre-Learn-then-Test normal figure, for comparison only (it ignores the search)
        "chosen_normal_confidence": (confidence_of(runs, gold, chosen, target_accuracy, decision["against_last"],
                                                   label, weights, max_loss) if target_accuracy is not None else None),
        "guarantee": None if cert is None else cert.to_json(),
        "frontier_by_cost": [p.to_json() for p in pareto(points, "cost_ms")],
        "frontier_by_llm_share": [p.to_json() for p in pareto(points, "llm_share")],
        "grid_points": len(points),
    }
    # The chosen point is shown even when it is not on this grid (a certified one is learnt elsewhere).
    rows = pareto(points, "cost_ms")
    rows = sorted(rows + ([chosen] if chosen not in rows else []), key=lambda p: p.cost_ms)
    report["table"] = format_frontier(rows, names, chosen, label)
    if cert is not None:
        report["certificate_table"] = format_certificate(cert, names)
    stem = config_path.with_suffix("")
    report["plot"] = str(stem) + ".frontier.png"
    title = f"{config.task.name}: {Path(data_dir).name}/{split}, n={len(gold)}"
    if cert is not None:
        title += (f"; certified on {cert.test_n} items (path from {cert.path_from}, {cert.learn_n} items): "
                  + (f"loss <= {max_loss:g} vs the large model" if cert.goal == "llm" else
                     f"accuracy >= {cert.level:.4f}") + f" with {cert.confidence:.0%} confidence")
    plot_frontier(points, chosen, report["plot"], last_accuracy, title=title, certificate=cert)
    Path(str(stem) + ".frontier.json").write_text(json.dumps(
        {k: v for k, v in report.items() if k not in ("table", "certificate_table")}, indent=1) + "\n")
    if write:
        for k, (spec, thr) in enumerate(zip(config.tiers[:-1], chosen.thresholds[:-1])):
            spec.threshold = thr  # NEVER (> 1) is stored as is: that tier never answers
            # the simulation knew only these label thresholds: any other stored one would route
            # differently from what was calibrated
            spec.label_thresholds = {}
            if label is not None and k < len(chosen.label_thresholds) and chosen.label_thresholds[k] is not None:
                spec.label_thresholds[label] = chosen.label_thresholds[k]
        dump_config(config, config_path)
    return report
