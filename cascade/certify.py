"""The guarantee (`--confidence C`; docs/calibration.md): Learn then Test with fixed-sequence testing.

Picking the cheapest of hundreds of grid points that pass a bound on the same data is a search:
the winner is, by selection, one whose sample was lucky. Learn then Test (Angelopoulos, Bates,
Candes, Jordan, Lei 2021) turns the choice into multiple testing with a fixed-sequence order:
1. learn a 1-D path through the joint grid on items that are not tested: the train split,
   where only the cheap tiers run (`path_from_other_items`; `cascade calibrate`'s default), or a
   random `learn_share` of the validation items (the rest are then the test items). The path
   (`greedy_path`) starts at "everything to the large model", whose loss is 0 by definition,
   and lowers one tier's threshold one grid step at a time, the move adding the fewest errors
   per item first, so the answered sets are nested and the steps small;
2. on the test items, walk the path and test each point's null hypothesis "its loss exceeds the
   tolerance" at level delta = 1 - C with an exact p-value; stop at the first point not
   rejected; the last rejected point is the answer (`certify`, which returns a `Certificate`).
Why not one split of val: 0.5 pt at 90% needs about 470 test items even when the cascade and
the large model never disagree ((1 - 0.005)^n <= 0.1), so a 500-item val cut in two certifies
nothing; the path needs only independence from the tested items, not unbiased data.
Fixed-sequence testing controls the family-wise error at delta without splitting it (a
point is only tested when every earlier one was rejected), so P(the chosen point's
loss > tolerance) <= delta holds *after* the selection, whatever the path looks like.

This module owns the path and the walk; the p-values are `cascade.bounds`' (pure functions, no
cascade types), and every point is routed by `cascade.thresholds`' replay of the measured tiers.
The loss: against the large model, the paired per-item loss l = correct_llm - correct_cascade
in {-1, 0, 1} (`paired_loss_pvalue`: the exact unconditional test on the trinomial of worse,
better and neither); for an absolute target, the error rate (`accuracy_pvalue`: exact
binomial). With traffic weights (`traffic_weights`: one weight for the out-of-scope items, one for
the rest), the weighted loss is a fixed mix of two strata's losses, tested exactly
(`stratified_loss_pvalue`, `stratified_rate_pvalue`); other weights get a betting test
(`betting_pvalue`).
Label-free evidence (`certify`'s `unlabelled`): the loss against the large model is at most how
often a cheap tier answers and disagrees with it, which needs no gold label.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cascade.bounds import (
    accuracy_pvalue,
    betting_pvalue,
    binom_cdf,
    binom_upper,
    bonferroni_pvalue,
    least_rejected,
    paired_loss_bound,
    paired_loss_pvalue,
    stratified_loss_pvalue,
    stratified_rate_pvalue,
)
from cascade.thresholds import (
    NEVER,
    CalibrationError,
    Point,
    TierRun,
    candidate_thresholds,
    correct_and_answered,
    label_masks,
    route_items,
    simulate,
    subset,
    weighted_mean,
)

# Thresholds tried besides the quantiles when the path is learnt on other items (`certify`'s
# `path_runs`): a student's confidences on its own training texts crowd near 1, so their
# quantiles alone would leave the range validation needs untried.
FIXED_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.985, 0.99, 0.995, 0.998,
                    0.999)


@dataclass
class Step:
    """One point of the fixed sequence: thresholds found on learn, tested on test."""

    point: Point  # its figures where the path was learnt
    tested: bool = False
    p_value: float | None = None
    certified: bool = False
    source: str = ""  # "val", "unlabelled", "val+unlabelled" (weighted Bonferroni), "definition" (the large model)
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
        self.is_label = label_masks(runs, label)
        reference = runs[-1].labels  # the large model's answers (labels, or extraction answer keys)
        self.agrees = [np.array([a == b for a, b in zip(r.labels, reference)], dtype=bool) for r in runs]

    def route(self, point: Point):
        right, _, _, llm_share, by = route_items(self.runs, self.n, point.thresholds, self.correct, self.answered,
                                                 point.label_thresholds, self.is_label, self.weights)
        agrees = np.choose(by, self.agrees) if len(self.runs) > 1 else np.ones(self.n, dtype=bool)
        return right, llm_share, by, agrees

    def mean(self, x: np.ndarray) -> float:
        return weighted_mean(x.astype(float), self.weights)


def traffic_strata(weights: np.ndarray) -> tuple[np.ndarray, tuple[float, float]] | None:
    """The two strata traffic weights stand for (`traffic_weights`: items of a stratum share one
    weight, the stratum's traffic share over its share of the sample), as (each item's stratum,
    0 or 1; the two traffic shares); None for weights of any other shape."""
    values = np.unique(weights)
    if values.size != 2:
        return None
    stratum = (weights == values[1]).astype(int)
    mass = np.array([weights[stratum == s].sum() for s in (0, 1)])
    shares = mass / mass.sum()
    return stratum, (float(shares[0]), float(shares[1]))


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
    correct, answered = correct_and_answered(runs, gold)
    is_label = label_masks(runs, label)
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
        right, _, _, _, by = route_items(runs, n, thr, correct, answered, lab, is_label)
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


def answers_nothing(point: Point, last: int) -> bool:
    """No tier before `last` can answer at this point on any items: each threshold, its
    out-of-scope label's too, is above every confidence (<= 1)."""
    labels = tuple(point.label_thresholds) + (None,) * last
    return all(t >= NEVER and (lt is None or lt >= NEVER) for t, lt in zip(point.thresholds[:last], labels))


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
            seed: int = 0, unlabelled: list[TierRun] | None = None, unlabelled_share: float = 0.2,
            nuisance_share: float = 0.05, bounds: bool = True, weighted_test: str = "stratified") -> Certificate:
    """Learn then Test (module docstring): the cheapest point whose loss against the large model
    is <= `max_loss`, or whose accuracy is >= `min_accuracy`, with probability >= `confidence`.

    Args:
        runs, gold: the tiers measured on the validation items, and their gold labels.
        confidence: 1 - delta, the probability over the validation sample that the promise holds.
        max_loss / min_accuracy: exactly one; the tolerance below the large model's accuracy, or
            the least accuracy.
        candidates, label: the grid of `frontier`, where the path is learnt.
        weights: traffic weights (`traffic_weights`) for every item of `gold`. Two-valued ones
            (`traffic_strata`) are two strata mixed at the asked traffic shares, so the weighted
            loss is shares . (each stratum's loss), and `weighted_test` "stratified" tests that
            exactly (`stratified_loss_pvalue`; `stratified_rate_pvalue` for an absolute target),
            conditional on how many val items each stratum holds. "betting" (and any weights of
            another shape) takes a betting test on the weighted per-item loss (`betting_pvalue`),
            which needs no strata but pays for the weights' range.
        weighted_test: "stratified" or "betting" (above).
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
            "disagreement >= max_loss", which H0 implies). The two p-values are combined by
            weighted Bonferroni (`bonferroni_pvalue`): `unlabelled_share` of delta goes to the
            label-free test, the rest to val's, a split fixed before either is seen, so a weak
            source costs at most its share of delta (Fisher's combination, used before, fell below
            val alone wherever the student's disagreement was a few percent). With a learn split,
            per point the learn items pick the evidence expected to give the smaller p-value: val
            alone or unlabelled alone, each at the whole delta. The guarantee then holds
            for the tiers that produced those predictions: a student's own training texts need
            cross-fitted (out-of-fold) predictions, and their thresholds must mean what the
            deployed student's do. Only with `max_loss`, without weights.
        unlabelled_share: the share of delta the label-free test gets, in (0, 1).
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
        if not 0.0 < unlabelled_share < 1.0:
            raise CalibrationError(f"--label-free-share {unlabelled_share}: must be in (0, 1)")
    if weighted_test not in ("stratified", "betting"):
        raise CalibrationError(f"weighted_test {weighted_test!r}: 'stratified' or 'betting'")
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
    strata = None if weights is None or weighted_test != "stratified" else traffic_strata(weights)
    if strata is not None:
        in_test = strata[0][test_idx]
        if min(int((in_test == 0).sum()), int((in_test == 1).sum())) < 1:
            strata = None  # a stratum with no test items: nothing to test it on
    if strata is not None:
        stratum_of, shares = in_test, strata[1]
        stratum_n = (int((stratum_of == 0).sum()), int((stratum_of == 1).sum()))

        def per_stratum(mask: np.ndarray) -> tuple[int, int]:
            return int((mask & (stratum_of == 0)).sum()), int((mask & (stratum_of == 1)).sum())
    if max_loss is not None:
        # fixed a priori, so its figures may come from the test items; points that route as it does
        # on any items (no cheap tier can answer) go: the test could only fail to tell them from it
        alone = simulate(test.runs, [gold[i] for i in test_idx], (NEVER,) * last + (0.0,), weights=w_test)
        path = [alone] + [p for p in path if not answers_nothing(p, last)]
    steps = [Step(p) for p in path]
    method = ("exact test on the two strata's " + ("paired loss" if max_loss is not None else "errors")
              + f" (traffic shares {shares[0]:.3f}, {shares[1]:.3f})" if strata is not None else
              "betting on the weighted loss" if weights is not None else
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
            elif strata is not None:
                sw, sb = per_stratum(worse), per_stratum(better)
                step.p_value = stratified_loss_pvalue(sw, sb, stratum_n, shares, max_loss, nuisance)
                step.source = "val"
                step.test.update({"stratum_n": stratum_n, "stratum_worse": sw, "stratum_better": sb})
                if bounds:
                    step.test["loss_bound"] = least_rejected(
                        lambda e: stratified_loss_pvalue(sw, sb, stratum_n, shares, e, nuisance), delta, -1.0, 1.0,
                        steps=14)
            elif weights is not None:
                x, (m0, v0, n0) = paired_x(test), prior(paired_x)
                step.p_value = betting_pvalue(x, max_loss, w_max, m0, v0, n0, seed=seed)
                step.source = "val"
                if bounds:
                    step.test["loss_bound"] = least_rejected(
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
                        # the split is never below the smaller of the two, so it is not a choice here
                        step.source = min(guess, key=guess.get)
                    step.p_value = {"val": p_val, "unlabelled": p_unl,
                                    "val+unlabelled": bonferroni_pvalue(p_val, p_unl, unlabelled_share)}[step.source]
                    step.test.update({"p_val": p_val, "p_unlabelled": p_unl})
        else:
            errors = ~right
            step.source = "val"
            if strata is not None:
                se = per_stratum(errors)
                step.p_value = stratified_rate_pvalue(se, stratum_n, shares, 1.0 - min_accuracy)
                step.test.update({"stratum_n": stratum_n, "stratum_errors": se})
                if bounds:
                    step.test["accuracy_bound"] = 1.0 - least_rejected(
                        lambda e: stratified_rate_pvalue(se, stratum_n, shares, e), delta, 0.0, 1.0)
            elif weights is not None:
                def error_x(split: _Split, point=step.point) -> np.ndarray:
                    return split.weights * ~split.route(point)[0]

                x, (m0, v0, n0) = error_x(test), prior(error_x)
                step.p_value = betting_pvalue(x, 1.0 - min_accuracy, w_max, m0, v0, n0, seed=seed)
                if bounds:
                    step.test["accuracy_bound"] = 1.0 - least_rejected(
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
