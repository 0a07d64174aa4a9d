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
- `stratified_rate_pvalue`: the exact test of a traffic-weighted rate over two strata (the
  out-of-scope items and the rest, `traffic_weights`), each stratum's count binomial;
  `betting_pvalue`: testing by betting (Waudby-Smith & Ramdas), for weighted losses where no
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


def trinomial_outcomes(n: int, p_worse: float, p_better: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The outcomes (worse, better) of n i.i.d. items, each worse with probability `p_worse`,
    better with `p_better`, neither otherwise, as broadcastable grids, and each one's log
    probability (-inf where worse + better > n). Those more than 9 standard deviations out,
    < 1e-15 together, are left out."""
    p_worse, p_better = min(max(p_worse, 0.0), 1.0), min(max(p_better, 0.0), 1.0)  # rounding at a bound
    log_f = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1)))])

    def span(p: float) -> np.ndarray:
        sd = np.sqrt(n * p * (1.0 - p))
        return np.arange(max(0, int(n * p - 9 * sd - 9)), min(n, int(n * p + 9 * sd + 9)) + 1)

    w, b = span(p_worse)[:, None], span(p_better)[None, :]
    rest = n - w - b
    log_pmf = (log_f[n] - log_f[w] - log_f[b] - log_f[np.maximum(rest, 0)]
               + _xlogy(w, p_worse) + _xlogy(b, p_better) + _xlogy(rest, 1.0 - p_worse - p_better))
    return w, b, np.where(rest >= 0, log_pmf, -np.inf)


def paired_tail(z: float, n: int, p_worse: float, p_better: float, max_loss: float) -> float:
    """P(paired_statistic <= z) for n i.i.d. items, each worse with probability `p_worse`, better
    with `p_better`, neither otherwise (summed over the trinomial's outcomes, `trinomial_outcomes`)."""
    w, b, log_pmf = trinomial_outcomes(n, p_worse, p_better)
    keep = paired_statistic(w, b, n, max_loss) <= z + 1e-9
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


def _binom_pmf(n: int, p: float) -> np.ndarray:
    """P(Binomial(n, p) = k) for k = 0..n, in log space."""
    if p <= 0.0 or p >= 1.0:
        out = np.zeros(n + 1)
        out[0 if p <= 0.0 else n] = 1.0
        return out
    k = np.arange(n + 1, dtype=float)
    log_choose = np.concatenate([[0.0], np.cumsum(np.log((n - k[:-1]) / (k[:-1] + 1.0)))])
    log_pmf = log_choose + k * np.log(p) + (n - k) * np.log1p(-p)
    return np.exp(log_pmf - log_pmf.max()) / np.exp(log_pmf - log_pmf.max()).sum()


def stratified_tail(t: float, counts_n: tuple[int, int], shares: tuple[float, float],
                    rates: tuple[float, float]) -> float:
    """P(shares[0] X0 / n0 + shares[1] X1 / n1 <= t) for independent X_s ~ Binomial(n_s, rates[s])."""
    (n0, n1), (s0, s1) = counts_n, shares
    pmf0, cdf1 = _binom_pmf(n0, rates[0]), np.cumsum(_binom_pmf(n1, rates[1]))
    # the largest x1 with s1 x1 / n1 <= t - s0 x0 / n0, for each x0 (1e-9: ties count as at or below)
    room = (t - s0 * np.arange(n0 + 1) / n0) * n1 / s1
    x1 = np.floor(room + 1e-9).astype(int)
    return float(min(1.0, (pmf0 * np.where(x1 < 0, 0.0, cdf1[np.clip(x1, 0, n1)])).sum()))


def stratified_rate_pvalue(counts: tuple[int, int], counts_n: tuple[int, int], shares: tuple[float, float],
                           level: float, grid: int = 48) -> float:
    """Exact p-value of H0 "shares[0] q0 + shares[1] q1 >= level", q_s being stratum s's rate of an
    event seen `counts[s]` times in its `counts_n[s]` i.i.d. items (the shares fixed beforehand:
    the traffic's, not the sample's).

    Why: traffic weights (`traffic_weights`) give two strata very different weights (CLINC150's
    100 out-of-scope val items each count 6.2 at a 20% share), and a betting test on the weighted
    per-item loss pays for that range: it could not reject a step with no loss at all (p 0.29 on
    3,100 items). Stratified, the target is a fixed mix of two binomial rates, so the test is
    exact: the statistic is the weighted estimate shares . counts / n; its tail falls as either
    rate rises, so the sup over H0 lies on the boundary shares . q = level, one free parameter (how
    the level splits between the strata), taken on `grid` + 1 values and refined around the
    largest. Conditional on how many val items fall in each stratum the items of a stratum are
    i.i.d., so the test holds conditionally and hence unconditionally. For the loss against the
    large model the event is "worse" (the large model right, the cascade wrong), which bounds the
    loss from above: items where the cascade is the better one get no credit (what it costs is
    in docs/calibration.md)."""
    (k0, k1), (n0, n1), (s0, s1) = counts, counts_n, shares
    if min(n0, n1) < 1 or min(s0, s1) <= 0.0:
        raise ValueError("stratified_rate_pvalue: two strata, each with items and a share > 0")
    if level <= 0.0:
        return 1.0  # a rate is never below 0
    t = s0 * k0 / n0 + s1 * k1 / n1

    def tail(q0: float) -> float:
        return stratified_tail(t, (n0, n1), (s0, s1), (q0, (level - s0 * q0) / s1))

    lo, hi = max(0.0, (level - s1) / s0), min(1.0, level / s0)  # q1 = (level - s0 q0) / s1 in [0, 1]
    if lo > hi:
        return 0.0  # no rates in [0, 1] reach the level
    qs = np.linspace(lo, hi, grid + 1)
    tails = [tail(q) for q in qs]
    k = int(np.argmax(tails))
    fine = np.linspace(qs[max(0, k - 1)], qs[min(grid, k + 1)], 17)
    return min(1.0, max(tails + [tail(q) for q in fine]))


def _trinomial_y(n: int, p_worse: float, p_better: float, credit2: int) -> tuple[np.ndarray, int]:
    """The pmf of y = 2 worse - credit2 better over n i.i.d. items (`trinomial_outcomes`), as
    (probabilities, the y of index 0)."""
    w, b, log_pmf = trinomial_outcomes(n, p_worse, p_better)
    y = 2 * w - credit2 * b
    y0 = int(y.min())
    return np.bincount((y - y0).ravel(), weights=np.exp(log_pmf).ravel()), y0


def stratified_loss_pvalue(worse: tuple[int, int], better: tuple[int, int], counts_n: tuple[int, int],
                           shares: tuple[float, float], max_loss: float, nuisance: float, credit: float = 0.5,
                           grid: int = 12) -> float:
    """Exact p-value of H0 "shares[0] L0 + shares[1] L1 >= max_loss" for the paired loss against
    the large model, L_s = P(worse) - P(better) in stratum s, from each stratum's counts of
    `worse` and `better` items among its `counts_n` i.i.d. ones (the shares fixed beforehand).

    The statistic is linear, T = sum_s shares[s] (worse_s - credit better_s) / n_s, so its law is
    the convolution of the two strata's (`_trinomial_y`, `stratified_tail`'s cdf trick) and each
    evaluation is cheap. Why `credit` 1/2 and not 1 (the unbiased estimate): where no pair is
    discordant (the walk's first steps), H0's worst case with credit 1 has many better pairs
    offsetting worse ones, which makes "none seen" likely (p 0.2-0.3 on CLINC150's val); with 1/2
    the worst case is almost no better pairs, as for credit 0 (`stratified_rate_pvalue`), while a
    cascade that is the better one on many items (CLINC150's out-of-scope ones) still gets half of
    them. The tail falls as either stratum's loss rises at fixed discordance, so the sup lies on
    H0's boundary, over three free parameters: how the loss splits between the strata and each
    stratum's discordance D_s. As in `paired_loss_pvalue`, each D_s is restricted to its
    Clopper-Pearson upper bound at level nuisance / 2 and `nuisance` is added (Berger & Boos); the
    sup is taken on a grid and refined around the largest."""
    (w0, w1), (b0, b1), (n0, n1), (s0, s1) = worse, better, counts_n, shares
    credit2 = int(round(2 * credit))
    if credit2 not in (0, 1, 2) or abs(credit2 / 2 - credit) > 1e-12:
        raise ValueError(f"credit {credit}: must be 0, 0.5 or 1")
    if min(n0, n1) < 1 or min(s0, s1) <= 0.0:
        raise ValueError("stratified_loss_pvalue: two strata, each with items and a share > 0")
    u0 = binom_upper(w0 + b0, n0, nuisance / 2)
    u1 = binom_upper(w1 + b1, n1, nuisance / 2)
    # T <= t  <=>  (s0 / n0) y0 + (s1 / n1) y1 <= (s0 / n0) y0_obs + (s1 / n1) y1_obs, y = 2 worse - 2 credit better
    c0, c1 = s0 / n0, s1 / n1
    t = c0 * (2 * w0 - credit2 * b0) + c1 * (2 * w1 - credit2 * b1)

    def tail(law0: tuple[np.ndarray, int], law1: tuple[np.ndarray, int]) -> float:
        (p0, y0), (p1, y1) = law0, law1
        cdf1 = np.cumsum(p1)
        room = np.floor((t - c0 * (y0 + np.arange(p0.size))) / c1 + 1e-9).astype(int) - y1
        return float((p0 * np.where(room < 0, 0.0, cdf1[np.clip(room, 0, cdf1.size - 1)])).sum())

    # l0 with |l0| <= u0 and |l1| <= u1 (a stratum's loss is within its discordance)
    lo = max(-u0, (max_loss - s1 * u1) / s0)
    hi = min(u0, (max_loss + s1 * u1) / s0)
    if lo > hi:
        return min(1.0, nuisance)  # no distribution within the bounds carries that loss

    def best(ls: np.ndarray) -> tuple[float, float]:  # (the largest tail, its l0)
        top = (-1.0, 0.0)
        for l0 in ls:
            l1 = (max_loss - s0 * l0) / s1
            laws0 = [_trinomial_y(n0, (d + l0) / 2, (d - l0) / 2, credit2) for d in np.linspace(abs(l0), u0, 5)]
            laws1 = [_trinomial_y(n1, (d + l1) / 2, (d - l1) / 2, credit2) for d in np.linspace(abs(l1), u1, 5)]
            top = max([top] + [(tail(a, b), l0) for a in laws0 for b in laws1])
        return top

    value, l0 = best(np.linspace(lo, hi, grid + 1))
    step = (hi - lo) / grid
    value = max(value, best(np.linspace(max(lo, l0 - step), min(hi, l0 + step), 5))[0])
    return min(1.0, value + nuisance)


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


def least_rejected(pvalue, alpha: float, lo: float, hi: float, steps: int = 22) -> float:
    """The least level in [lo, hi] whose H0 a p-value falling in the level rejects at `alpha`, by
    bisection in `steps` halvings (22: ~1e-6 on [-1, 1]; 14: ~1e-4, for the slower tests): the
    confidence bound the test implies (`hi` when even that is not rejected)."""
    if pvalue(hi) > alpha:
        return hi
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if pvalue(mid) <= alpha else (mid, hi)
    return hi


def paired_loss_bound(worse: int, better: int, n: int, alpha: float, nuisance: float) -> float:
    """Upper confidence bound at 1 - alpha on the loss against the large model (the least max_loss
    whose H0 `paired_loss_pvalue` rejects)."""
    return least_rejected(lambda e: paired_loss_pvalue(worse, better, n, e, nuisance), alpha, -1.0, 1.0)
