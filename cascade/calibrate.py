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


def candidate_thresholds(confidences: np.ndarray, answered: np.ndarray, n: int) -> list[float]:
    """Up to `n` quantiles of the confidences of the items the tier answered, plus NEVER."""
    conf = confidences[answered]
    if conf.size == 0:
        return [NEVER]
    qs = np.unique(np.quantile(conf, np.linspace(0.0, 1.0, n)))
    return sorted({float(q) for q in qs}) + [NEVER]


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
    n = len(gold)
    open_mask = np.ones(n, dtype=bool)
    right = np.zeros(n, dtype=bool)
    cost = np.zeros(n)
    shares, llm = [], 0.0
    last = len(runs) - 1
    for k, run in enumerate(runs):
        cost[open_mask] += run.mean_ms
        thr = thresholds[k]
        if k < len(label_thresholds) and label_thresholds[k] is not None and is_label is not None:
            thr = np.where(is_label[k], label_thresholds[k], thr)
        takes = open_mask if k == last else open_mask & answered[k] & (run.confidences >= thr)
        right |= takes & correct[k]
        share = _mean(takes, weights)
        shares.append(share)
        if run.is_llm:
            llm += share
        open_mask = open_mask & ~takes
    return right, cost, shares, llm


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
                  against_last: bool = False, label: str | None = None, weights: np.ndarray | None = None) -> float:
    """One-sided confidence that the cascade at `point` reaches `target` beyond this sample
    (normal approximation): of accuracy >= target, or with `against_last`, of accuracy >= the
    last tier's alone, from the paired per-item difference (the two share their errors, so the
    paired bound is much tighter than two separate ones). With `weights`, weighted means and
    Kish's effective sample size (sum w)^2 / sum w^2."""
    from statistics import NormalDist

    correct, answered = _masks(runs, gold)
    right = _simulate_items(runs, gold, point.thresholds, correct, answered, point.label_thresholds,
                            _label_masks(runs, label), weights)[0].astype(float)
    w = np.ones(len(gold)) if weights is None else weights
    n = float(w.sum() ** 2 / (w ** 2).sum()) if len(gold) else 0.0
    if against_last:
        diff = right - correct[-1].astype(float)
        mean = _mean(diff, w)
        se = np.sqrt(_mean((diff - mean) ** 2, w) * n / (n - 1) / n) if n > 1 else 0.0
    else:
        p = _mean(right, w)
        mean = p - target
        se = np.sqrt(max(p * (1 - p), 1e-12) / n)
    if se == 0:
        return 1.0 if mean >= 0 else 0.0
    return NormalDist().cdf(mean / se)


def frontier(runs: list[TierRun], gold: list[str], candidates: int = 24, label: str | None = None,
             min_label_answers: int = 10, weights: np.ndarray | None = None) -> list[Point]:
    """Every joint threshold combination on the candidate grid, simulated. With `label`, every
    non-last tier that gives that answer at least `min_label_answers` times gets a second grid
    for those answers (None in the grid: the tier's own threshold)."""
    if not runs:
        raise CalibrationError("no tiers to calibrate")
    correct, answered = _masks(runs, gold)
    is_label = _label_masks(runs, label)
    grids = [candidate_thresholds(run.confidences, mask, candidates) for run, mask in zip(runs[:-1], answered)]
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


# --- running tiers and writing results (the `cascade calibrate` command) -------------------


def measure_tiers(cascade, is_llm: list[bool], texts: list[str], batch_size: int = 256,
                  progress=None) -> list[TierRun]:
    """Run every tier on every text (batched) and time it."""
    import time

    runs = []
    for tier, llm in zip(cascade.tiers, is_llm):
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


def plot_frontier(points: list[Point], chosen: Point, path, llm_accuracy: float | None = None) -> None:
    """Accuracy against large-model share and against cost, every grid point and the Pareto
    fronts, the chosen point marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_calibration(config_path, data_dir, target_accuracy: float | str | None = None,
                    max_llm_share: float | None = None, split: str = "val", candidates: int = 24,
                    limit: int | None = None, write: bool = True, progress=None,
                    confidence: float | None = None, oos_threshold: bool = True,
                    oos_share: float | None = None) -> dict:
    """Measure the configured tiers on `split`, choose thresholds, and (with `write`) store them
    in the config; the frontier goes beside it as `NAME.frontier.json` and `NAME.frontier.png`.
    `oos_share`: weight the items so the dataset's out-of-scope label is that share of traffic."""
    import json
    from pathlib import Path

    from cascade.config import build_cascade, dump_config, load_config
    from cascade.data import load_labels, load_split
    from cascade.evaluate import LLM_KINDS

    config_path = Path(config_path)
    config = load_config(config_path)
    examples = load_split(data_dir, split)[:limit]
    texts, gold = [ex.text for ex in examples], [ex.label for ex in examples]
    cascade = build_cascade(config, config_path.parent)
    try:
        runs = measure_tiers(cascade, [spec.kind in LLM_KINDS for spec in config.tiers], texts, progress=progress)
    finally:
        cascade.close()
    oos_label = load_labels(data_dir).oos_label
    weights = traffic_weights(gold, oos_label, oos_share)
    last_accuracy = _mean(np.array([p == g for p, g in zip(runs[-1].labels, gold)]), weights)
    against_last = target_accuracy == "llm"
    if against_last:
        target_accuracy = last_accuracy
    elif isinstance(target_accuracy, str):
        try:
            target_accuracy = float(target_accuracy)
        except ValueError:
            raise CalibrationError(f"--target-accuracy {target_accuracy!r}: a number in (0, 1] or 'llm'") from None
    label = oos_label if oos_threshold else None
    points = frontier(runs, gold, candidates, label, weights=weights)
    confident = None
    if confidence is not None and target_accuracy is not None:
        confident = lambda p: confidence_of(runs, gold, p, target_accuracy, against_last, label,  # noqa: E731
                                            weights) >= confidence
    chosen = choose(points, target_accuracy, max_llm_share, confident)
    names = [r.name for r in runs]
    report = {
        "split": split, "n": len(gold), "tiers": names,
        "tier_accuracy_alone": {r.name: _mean(np.array([p == g for p, g in zip(r.labels, gold)]), weights)
                                for r in runs},
        "oos_share": oos_share if weights is not None else None,
        "split_oos_share": (float(np.mean([g == oos_label for g in gold])) if oos_label is not None else None),
        "tier_mean_ms": {r.name: r.mean_ms for r in runs},
        "target_accuracy": target_accuracy, "max_llm_share": max_llm_share, "confidence": confidence,
        "label_threshold_label": label,
        "chosen": chosen.to_json(), "last_tier_accuracy": last_accuracy,
        "chosen_confidence": (confidence_of(runs, gold, chosen, target_accuracy, against_last, label, weights)
                              if target_accuracy is not None else None),
        "frontier_by_cost": [p.to_json() for p in pareto(points, "cost_ms")],
        "frontier_by_llm_share": [p.to_json() for p in pareto(points, "llm_share")],
        "grid_points": len(points),
    }
    # The chosen point is shown even when a confidence bound made it leave the frontier.
    rows = pareto(points, "cost_ms")
    rows = sorted(rows + ([chosen] if chosen not in rows else []), key=lambda p: p.cost_ms)
    report["table"] = format_frontier(rows, names, chosen, label)
    stem = config_path.with_suffix("")
    report["plot"] = str(stem) + ".frontier.png"
    plot_frontier(points, chosen, report["plot"], last_accuracy)
    Path(str(stem) + ".frontier.json").write_text(json.dumps({k: v for k, v in report.items() if k != "table"},
                                                             indent=1) + "\n")
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
