"""Threshold calibration, the `cascade calibrate` command: measure, decide, report, write.

`run_calibration` runs every configured tier on *every* text of the validation split
(`measure_tiers`; and the cheap tiers on up to `path_limit` train items, where the certified
path is learnt), then decides on those measurements alone, no model run again
(`calibrate_runs`): without `--confidence`, the cheapest point of the joint grid that reaches
the target on these items, or the most accurate within a large-model share; with it, the
cheapest point certified to keep its promise after the search. It prints and saves the
frontier (`format_frontier`, `NAME.frontier.json`, `plot_frontier`: `NAME.frontier.png`) and the
tested sequence (`format_certificate`), and writes the thresholds into `cascade.toml`.

The rest lives in one module per concern, each below this one (docs/calibration.md):
- `cascade.thresholds`: the measured tiers replayed at any thresholds (`TierRun`, `Point`,
  `simulate`), the joint grid and the search without a guarantee (`frontier`, `pareto`,
  `choose`), out-of-scope thresholds and traffic weights;
- `cascade.certify`: the guarantee, Learn then Test with fixed-sequence testing (`certify`,
  `greedy_path`, `Certificate`);
- `cascade.bounds`: the exact tests and confidence bounds `certify` runs (pure functions).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cascade.certify import Certificate, certify
from cascade.thresholds import (
    NEVER,
    CalibrationError,
    Point,
    TierRun,
    choose,
    confidence_of,
    frontier,
    label_masks,
    pareto,
    simulate,
    traffic_weights,
    weighted_mean,
)


def measure_tiers(cascade, is_llm: list[bool], texts: list[str], batch_size: int = 256,
                  progress=None, tiers: int | None = None, metric: str = "accuracy") -> list[TierRun]:
    """Run every tier (or the first `tiers`) on every text (batched); its cost is what the tier
    itself measured (`Tier.cost`, the mean ms per item its meter keeps: the same figure it
    reports when serving). A tier's answers are kept as `answer_key(metric, ...)`: the label
    for accuracy, the fields (or label and fields) for extraction, so the replay compares
    answers under the task's metric."""
    from cascade.metrics import answer_key

    runs = []
    for tier, llm in list(zip(cascade.tiers, is_llm))[:tiers]:
        labels: list[str | None] = []
        conf: list[float] = []
        for start in range(0, len(texts), batch_size):
            for pred in tier.predict_batch(texts[start:start + batch_size]):
                labels.append(None if pred is None else answer_key(metric, pred.label, pred.fields))
                conf.append(0.0 if pred is None else float(pred.confidence))
            if progress:
                progress(tier.name, min(len(texts), start + batch_size), len(texts))
        runs.append(TierRun(tier.name, labels, np.array(conf), float(tier.cost), llm))
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
                   learn_share: float = 0.3, seed: int = 0, unlabelled: list[TierRun] | None = None,
                   unlabelled_share: float = 0.2) -> dict:
    """The decision of `cascade calibrate` on measured tiers, no model run: `target_accuracy` (a
    number, or "llm" for the large model's own minus `max_loss`) at the least cost — with
    `confidence`, certified by `certify`; without, the cheapest point reaching it on these items
    (no guarantee) — or the most accurate point within `max_llm_share`.

    Returns: {"points": the grid on all items, "chosen": the chosen point's figures on all items,
    "certificate": the `Certificate` or None, "target_accuracy", "last_accuracy", "against_last"}."""
    last_accuracy = weighted_mean(np.array([p == g for p, g in zip(runs[-1].labels, gold)]), weights)
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
                       seed=seed, unlabelled=unlabelled, unlabelled_share=unlabelled_share)
        if cert.point is None:
            first = cert.steps[0].test if cert.steps else {}
            raise CalibrationError(
                f"--target-accuracy {target_accuracy:.4f} with confidence {confidence}: no point passed the test "
                f"(the most accurate on the path: {first.get('accuracy', float('nan')):.4f} on the "
                f"{cert.test_n} test items, at least {first.get('accuracy_bound', float('nan')):.4f} with that "
                "confidence); lower the target or --confidence, or use more validation data")
        p = cert.point
        is_label = label_masks(runs, label)
        chosen = simulate(runs, gold, p.thresholds, label_thresholds=p.label_thresholds, is_label=is_label,
                          weights=weights)
    else:
        chosen = choose(points, target_accuracy if max_llm_share is None else None, max_llm_share)
    return {"points": points, "chosen": chosen, "certificate": cert, "target_accuracy": target_accuracy,
            "last_accuracy": last_accuracy, "against_last": against_last}


def llm_agreement(runs: list[TierRun], point: Point, label: str | None) -> dict[str, float]:
    """Per cheap tier, the share of the items it answers at `point` where the large model's answer
    is the same: the figure audit sampling watches live (serving/audit.py). Tiers that answer no
    validation item have none."""
    from cascade.thresholds import correct_and_answered, label_masks, route_items

    llm = runs[-1].labels
    correct, answered = correct_and_answered(runs, llm)  # "correct" here: agrees with the large model
    by = route_items(runs, len(llm), point.thresholds, correct, answered, point.label_thresholds,
                     label_masks(runs, label))[4]
    out = {}
    for k, run in enumerate(runs[:-1]):
        mine = by == k
        if mine.any():
            out[run.name] = round(float(correct[k][mine].mean()), 6)
    return out


def _traffic_runs(cascade, is_llm: list[bool], config_path: Path, data_dir, items, metric: str,
                  progress) -> tuple[list[TierRun], dict]:
    """The cheap tiers measured on label-free items with the large model's answers, leaving out
    texts the tiers may have learnt: the train split and the carried traffic of a flywheel version."""
    import json

    from cascade.data import load_split
    from cascade.evidence import CARRIED_TRAFFIC
    from cascade.metrics import answer_key

    texts, answers = items
    seen = {ex.text for ex in load_split(data_dir, "train")} if (Path(data_dir) / "train.jsonl").exists() else set()
    carried = config_path.parent / CARRIED_TRAFFIC
    if carried.exists():
        seen |= {json.loads(line)["text"] for line in carried.read_text(encoding="utf-8").splitlines() if line}
    keep = [i for i, t in enumerate(texts) if t not in seen]
    if not keep:
        raise CalibrationError(f"--label-free: none of the {len(texts)} items is left once the texts the tiers may "
                               "have learnt (train, carried traffic) are left out")
    runs = measure_tiers(cascade, is_llm, [texts[i] for i in keep], progress=progress, tiers=len(is_llm) - 1,
                         metric=metric)
    llm = [answer_key(metric, answers[i]["label"], answers[i].get("fields")) for i in keep]
    runs.append(TierRun(cascade.tiers[-1].name, llm, np.ones(len(keep)), 0.0, True))
    return runs, {"source": "traffic", "n_file": len(texts), "n": len(keep), "dropped_seen": len(texts) - len(keep)}


def _label_free_runs(path, names: list[str], path_texts: list[str]) -> tuple[list[TierRun], dict]:
    """The evidence file's runs without the items the certified path is learnt on (the path must
    not depend on the items that test it), and what was used."""
    from cascade.evidence import drop_items, read_evidence, text_digest

    runs, digests, meta = read_evidence(path, names)
    on_path = {text_digest(t) for t in path_texts}
    keep = np.array([d not in on_path for d in digests], dtype=bool)
    if not keep.any():
        raise CalibrationError(f"--label-free {path}: every item is also on the path's items; nothing is left")
    return drop_items(runs, keep), {"file": str(path), "source": meta.get("source"), "n_file": len(digests),
                                    "n": int(keep.sum()), "dropped_on_path": int((~keep).sum())}


def run_calibration(config_path, data_dir, target_accuracy: float | str | None = None,
                    max_llm_share: float | None = None, split: str = "val", candidates: int = 24,
                    limit: int | None = None, write: bool = True, progress=None,
                    confidence: float | None = None, oos_threshold: bool = True,
                    oos_share: float | None = None, max_loss: float = 0.0, path_split: str | None = "train",
                    path_limit: int = 3000, learn_share: float = 0.3, seed: int = 0,
                    unlabelled: list[TierRun] | None = None, label_free: str | Path | None = None,
                    label_free_items: tuple[list[str], list[dict]] | None = None,
                    label_free_share: float = 0.2) -> dict:
    """Measure the configured tiers on `split`, choose thresholds (`calibrate_runs`), and (with
    `write`) store them in the config; the frontier goes beside it as `NAME.frontier.json` and
    `NAME.frontier.png`. `oos_share`: weight the items so the dataset's out-of-scope label is that
    share of traffic. With `confidence`, the certified path is learnt on up to `path_limit` items
    of `path_split` (the cheap tiers only; a seeded sample), else, when that split is absent or
    None, on a `learn_share` of `split`. `unlabelled`: label-free evidence (`certify`);
    `label_free`: an evidence file of it (`cascade.evidence`), less the items the path learns on
    (the path then takes at most half of `path_split`, so half of such a file is left);
    `label_free_items`: (texts, the large model's answers {"label", "fields"}), e.g. audited
    traffic (`serving.traffic_log.audited_sample`): the configured cheap tiers are run on them
    here, less the texts they may have learnt (the train split, the version's carried traffic).
    `label_free_share`: the share of 1 - confidence the label-free test gets (`certify`).
    With label-free evidence the report's `evidence` compares the choice with val alone."""
    import json

    from cascade.config import build_cascade, dump_config, load_config
    from cascade.data import load_labels, load_split, seeded_sample
    from cascade.evaluate import LLM_KINDS
    from cascade.metrics import answer_key

    config_path = Path(config_path)
    config = load_config(config_path)
    metric = config.task.target_metric
    examples = seeded_sample(load_split(data_dir, split), limit, seed)
    texts, gold = [ex.text for ex in examples], [answer_key(metric, ex.label, ex.fields) for ex in examples]
    use_path = (confidence is not None and max_llm_share is None and path_split not in (None, split)
                and (Path(data_dir) / f"{path_split}.jsonl").exists() and len(config.tiers) > 1)
    path_runs = path_gold = evidence = None
    if label_free is not None and label_free_items is not None:
        raise CalibrationError("--label-free: give one evidence source, a file or a traffic log")
    cascade = build_cascade(config, config_path.parent)
    try:
        is_llm = [spec.kind in LLM_KINDS for spec in config.tiers]
        runs = measure_tiers(cascade, is_llm, texts, progress=progress, metric=metric)
        if use_path:
            path_examples = load_split(data_dir, path_split)
            if label_free is not None:  # leave at least half of a train-split evidence file to test with
                path_limit = min(path_limit, max(1, len(path_examples) // 2))
            path_examples = seeded_sample(path_examples, path_limit, seed)
            path_gold = [answer_key(metric, ex.label, ex.fields) for ex in path_examples]
            path_runs = measure_tiers(cascade, is_llm, [ex.text for ex in path_examples], progress=progress,
                                      tiers=len(config.tiers) - 1, metric=metric)
        if label_free_items is not None:
            unlabelled, evidence = _traffic_runs(cascade, is_llm, config_path, data_dir, label_free_items, metric,
                                                 progress)
    finally:
        cascade.close()
    if label_free is not None:
        unlabelled, evidence = _label_free_runs(label_free, [r.name for r in runs],
                                                [ex.text for ex in path_examples] if use_path else [])
    # out-of-scope label thresholds are a classification feature: keys are labels only there
    oos_label = load_labels(data_dir).oos_label if metric == "accuracy" else None
    weights = traffic_weights(gold, oos_label, oos_share)
    label = oos_label if oos_threshold else None
    decision = calibrate_runs(runs, gold, target_accuracy, max_llm_share, confidence=confidence, max_loss=max_loss,
                              candidates=candidates, label=label, weights=weights, path_runs=path_runs,
                              path_gold=path_gold, learn_share=learn_share, seed=seed, unlabelled=unlabelled,
                              unlabelled_share=label_free_share)
    if unlabelled is not None and confidence is not None:
        evidence = evidence or {"n": len(unlabelled[0].labels)}
        try:
            alone = calibrate_runs(runs, gold, target_accuracy, max_llm_share, confidence=confidence,
                                   max_loss=max_loss, candidates=candidates, label=label, weights=weights,
                                   path_runs=path_runs, path_gold=path_gold, learn_share=learn_share, seed=seed)
            evidence["val_only"] = {"llm_share": alone["chosen"].llm_share, "accuracy": alone["chosen"].accuracy}
        except CalibrationError as exc:
            evidence["val_only"] = {"error": str(exc)}
        evidence["with_label_free"] = {"llm_share": decision["chosen"].llm_share,
                                       "accuracy": decision["chosen"].accuracy}
    points, chosen, cert = decision["points"], decision["chosen"], decision["certificate"]
    target_accuracy, last_accuracy = decision["target_accuracy"], decision["last_accuracy"]
    names = [r.name for r in runs]
    report = {
        "split": split, "n": len(gold), "tiers": names, "metric": metric,
        "tier_accuracy_alone": {r.name: weighted_mean(np.array([p == g for p, g in zip(r.labels, gold)]), weights)
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
        "grid_points": len(points), "evidence": evidence,
        "llm_agreement": llm_agreement(runs, chosen, label),
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
    agreement = report["llm_agreement"]
    if write:
        for spec in config.tiers[:-1]:  # what audit sampling's drift flag compares live traffic with
            spec.llm_agreement = agreement.get(spec.name)
        for k, (spec, thr) in enumerate(zip(config.tiers[:-1], chosen.thresholds[:-1])):
            spec.threshold = thr  # NEVER (> 1) is stored as is: that tier never answers
            # the simulation knew only these label thresholds: any other stored one would route
            # differently from what was calibrated
            spec.label_thresholds = {}
            if label is not None and k < len(chosen.label_thresholds) and chosen.label_thresholds[k] is not None:
                spec.label_thresholds[label] = chosen.label_thresholds[k]
        dump_config(config, config_path)
    return report
