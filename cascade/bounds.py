"""Exact tests and confidence bounds: the p-values the calibration guarantee rests on.

Pure functions of counts and arrays (numpy and math only, nothing of the cascade), so the
validity of `cascade.certify`'s promise can be read and tested here alone: each p-value's level
holds at every sample size, not only asymptotically, and the tests check that by enumerating
outcomes (tests/test_calibrate.py). The core has no scipy, so the binomial is summed by hand.

- `binom_cdf`, `binom_upper`, `binom_lower`: the binomial tail and Clopper-Pearson bounds;
  `accuracy_pvalue`: the exact binomial test of an accuracy (an absolute target).
- `paired_loss_pvalue` (with `paired_statistic`, `paired_tail`): the exact unconditional test of
  the paired loss against the large model, l = correct_llm - correct_cascade in {-1, 0, 1}, on
  the trinomial of worse, better and neither; `paired_loss_bound`: the bound it implies.
- `betting_pvalue`: testing by betting (Waudby-Smith & Ramdas), for weighted losses where no
  binomial applies; `bonferroni_pvalue`: two p-values combined by a split of the level
  fixed beforehand (a weak source costs at most its share, not the test).
- `least_rejected`: any such p-value turned into its confidence bound, by bisection.
"""

from __future__ import annotations

import numpy as np


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


def bonferroni_pvalue(p_a: float, p_b: float, share_b: float) -> float:
    """Two p-values of one hypothesis combined by weighted Bonferroni: `share_b` of the level goes
    to `p_b`, the rest to `p_a`, so P(min(p_a / (1 - share_b), p_b / share_b) <= alpha) <= alpha
    with no assumption on their dependence. Fisher's combination (which needs independence) is
    stronger when both are small but weaker than `p_a` alone when `p_b` is near 1, which is what
    disagreement evidence gives where a student answers much (docs/calibration.md)."""
    if not 0.0 < share_b < 1.0:
        raise ValueError(f"share_b {share_b}: must be in (0, 1)")
    return float(min(1.0, p_a / (1.0 - share_b), p_b / share_b))


def least_rejected(pvalue, alpha: float, lo: float, hi: float) -> float:
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
    return least_rejected(lambda e: paired_loss_pvalue(worse, better, n, e, nuisance), alpha, -1.0, 1.0)
