"""Chained students against the best single student, at the same accuracy target (issue 16
item 2): does a second student between the first and the large model keep more traffic?

    python bench/chain.py --run runs/e2e-banking77        # RUN/student and RUN/student-minilm-l6

A finished run (`bench/e2e.py`, with `bench/students.py` for the second student) holds rules,
two students and the large model. Each variant is a cascade.toml written into the run dir —
rules → one student → large, rules → student A → student B → large in both orders, and the
two students' ensemble (`kind = "ensemble"`: their mean distribution) alone and behind A — and
calibrated the same way (`run_calibration`: the large model's val accuracy minus 0.5 pt,
certified at 90%, out-of-scope requests weighted to 20% of traffic as in `bench/e2e.py`; one
threshold per cheap tier, searched jointly). Then every variant routes the
whole test split `--repeats` times, round robin (this machine is shared: a drift hits all
alike): the first pass's accuracy and large-model share, the best pass's items/s and that as a
multiple of the large model alone measured in the same passes, and how many answers a later
pass changed; and the oracle on test (`oracle_on_test`): the least share each variant's grid
reaches within the tolerance on test itself, which says what better calibration could win.
Writes bench/results/chain-DATASET.json with the CPU flags.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TIER = '''
[[tiers]]
name = "{name}"
kind = "{kind}"
path = "{path}"
threshold = 0.0
{options}
'''


def scalars(record: dict) -> dict:
    """A report's figures without its per-item and per-candidate lists (kept in the frontier file)."""
    return {k: v for k, v in record.items() if not isinstance(v, (list, dict))}


def student_tier(entry: str) -> str:
    """A cheap tier of a variant: a student dir of the run, or "A+B", the ensemble of two."""
    if "+" in entry:
        members = entry.split("+")
        return TIER.format(name="ensemble", kind="ensemble", path=".",
                           options="options = { members = [" + ", ".join(f'"{m}"' for m in members) + "] }")
    return TIER.format(name=entry.removeprefix("student-") if entry != "student" else "student", kind="student",
                       path=entry, options="")


def write_variant(run: Path, name: str, students: list[str], task: str, kind: str) -> Path:
    """RUN/cascade-chain-NAME.toml: rules, the students (or ensembles) in order, the large model."""
    tiers = [TIER.format(name="rules", kind="rules", path="rules.toml", options="options = { timeout_ms = 20 }")]
    tiers += [student_tier(s) for s in students]
    tiers.append(TIER.format(name="llm", kind="llm", path="large",
                             options='options = { backend = "builtin", memory_gb = 0.5 }'))
    path = run / f"cascade-chain-{name}.toml"
    path.write_text(f'# Written by bench/chain.py\n[task]\nname = "{task}"\nkind = "{kind}"\n' + "".join(tiers))
    return path


def oracle_on_test(systems: dict, results: dict, texts: list[str], gold: list[str], oos: str | None, args) -> None:
    """What would reach the targets: per variant, the least large-model share among its threshold
    grid's points within `max_loss` of the large model on test itself (an oracle, which picks
    on the data it is judged by), and the items/s that point models (the tiers' measured ms per
    item) as a multiple of the large model's. Each tier is run once on test, shared by the
    variants that hold it."""
    from types import SimpleNamespace

    from cascade.calibrate import measure_tiers
    from cascade.thresholds import frontier, traffic_weights

    weights = traffic_weights(gold, oos, args.oos_share or None)
    measured = {}
    for name, cascade in systems.items():
        if name == "large_only":
            continue
        runs = []
        for key, tier in zip(["rules", *results[name]["students"], "llm"], cascade.tiers):
            if key not in measured:  # its cost: this pass alone (the tier's meter holds the timed passes too)
                t0 = time.perf_counter()
                run = measure_tiers(SimpleNamespace(tiers=[tier]), [key == "llm"], texts)[0]
                run.mean_ms = 1000 * (time.perf_counter() - t0) / len(texts)
                measured[key] = run
            runs.append(measured[key])
        right = np.array([a == g for a, g in zip(runs[-1].labels, gold)], dtype=float)
        llm_accuracy = float(np.average(right, weights=weights))
        # 17 thresholds per tier, and the out-of-scope label's grid only with one cheap model tier: with
        # two it would be 17^3 x 9^3 points; without it a chain's oracle share is an upper bound
        label = oos if len(runs) == 3 else None
        ok = [p for p in frontier(runs, gold, 16, label, weights=weights)
              if p.accuracy >= llm_accuracy - args.max_loss - 1e-12]
        best = min(ok, key=lambda p: (p.llm_share, p.cost_ms))
        results[name]["oracle_on_test"] = {
            "llm_share": best.llm_share, "accuracy": best.accuracy, "llm_accuracy": llm_accuracy,
            "thresholds": list(best.thresholds), "label_thresholds": list(best.label_thresholds),
            "speedup_modelled": runs[-1].mean_ms / best.cost_ms, "label_grid": label is not None}
        print(f"[chain] {name:<40} oracle on test: share {best.llm_share:.3f} at {best.accuracy:.4f} "
              f"(large {llm_accuracy:.4f}), {runs[-1].mean_ms / best.cost_ms:.1f}x modelled", flush=True)


def main(argv: list[str] | None = None) -> int:
    from cascade.calibrate import CalibrationError, run_calibration
    from cascade.config import build_cascade, load_config
    from cascade.cpu import cpu_report
    from cascade.data import load_labels, load_split
    from cascade.evaluate import answers_changed, as_predictions, predict_timed
    from cascade.metrics import classification_report
    from cascade.router import Cascade
    from training.trainer import matmul_peak

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--students", default="student,student-minilm-l6", help="two student dirs in the run")
    p.add_argument("--max-loss", type=float, default=0.005)
    p.add_argument("--confidence", type=float, default=0.9)
    p.add_argument("--oos-share", type=float, default=0.2,
                   help="weigh val so the out-of-scope label is this share of traffic, as bench/e2e.py "
                        "(ignored on a dataset without one; 0: as sampled)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dataset", default=None)
    p.add_argument("--results-dir", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    run = args.run
    a, b = args.students.split(",")
    for s in (a, b):
        if not (run / s / "model.int8.onnx").exists():
            p.error(f"--students: {run / s} has no model.int8.onnx (export it with `cascade export --int8`)")
    data = run / "data"
    labels = load_labels(data)
    dataset = args.dataset or run.name.removeprefix("e2e-")
    variants = {f"single-{a}": [a], f"single-{b}": [b], f"chain-{a}-{b}": [a, b], f"chain-{b}-{a}": [b, a],
                # both students' mean distribution (`kind = "ensemble"`), alone and behind the faster one
                f"ensemble-{a}+{b}": [f"{a}+{b}"], f"chain-{a}-ensemble": [a, f"{a}+{b}"]}

    results, t0 = {}, time.perf_counter()
    for name, students in variants.items():
        path = write_variant(run, name, students, dataset, labels.task)
        try:
            cal = run_calibration(path, data, "llm", max_loss=args.max_loss, confidence=args.confidence,
                                  oos_share=args.oos_share or None)
        except CalibrationError as exc:
            results[name] = {"students": students, "calibration_error": str(exc)}
            continue
        print(f"[chain] {name}: chosen {cal['chosen']}", flush=True)
        results[name] = {"students": students, "config": str(path), "calibration": {
            "chosen": cal["chosen"], "llm_val_accuracy": cal["last_tier_accuracy"],
            "guarantee": scalars(cal.get("guarantee") or {}), "tier_mean_ms": cal.get("tier_mean_ms")}}

    test = load_split(data, "test")
    texts, gold = [ex.text for ex in test], [ex.label for ex in test]
    systems = {n: build_cascade(load_config(Path(r["config"])), run) for n, r in results.items() if "config" in r}
    first = next(iter(systems.values()))
    systems["large_only"] = Cascade([first.tiers[-1]], [0.0])
    try:
        for cascade in systems.values():
            for tier in cascade.tiers:  # lazy init is not the steady state
                tier.predict_batch(texts[:64])
        # the first pass's answers at the best pass's time; later passes' changes are counted
        walls, firsts, changed = {n: [] for n in systems}, {}, {n: 0 for n in systems}
        for r in range(args.repeats):
            for name, cascade in systems.items():
                answers, seconds = predict_timed(cascade, texts)
                walls[name].append(seconds)
                preds, failed = as_predictions(answers)
                first_preds, first_failed = firsts.setdefault(name, (preds, failed))
                changed[name] = max(changed[name], answers_changed(first_preds, preds))
                rep = classification_report(gold, first_preds, [t.name for t in cascade.tiers], min(walls[name]),
                                            labels.oos_label, ["llm"])
                results.setdefault(name, {}).update({"test": {
                    **rep, "all_wall_s": list(walls[name]), "failed": len(first_failed),
                    "answers_changed_between_passes": changed[name]}})
                print(f"[chain] {name:<40} accuracy {rep['accuracy']:.4f} share {rep['llm_share']:.3f} "
                      f"{len(texts) / seconds:.0f} items/s (pass {r + 1}; {changed[name]} answers changed)",
                      flush=True)
        try:  # a figure beside the measured ones: its failure loses none of them
            oracle_on_test(systems, results, texts, gold, labels.oos_label, args)
        except Exception as exc:  # noqa: BLE001
            print(f"[chain] oracle on test failed: {exc!r}", file=sys.stderr)
            results["large_only"]["oracle_error"] = repr(exc)
    finally:
        for name, cascade in systems.items():
            if name != "large_only":
                cascade.close()
    large = results["large_only"]["test"]
    for name, res in results.items():
        if "test" in res:
            res["test"]["speedup_vs_large"] = res["test"]["items_per_s"] / large["items_per_s"]
            res["test"]["gap_pt_vs_large"] = 100 * (res["test"]["accuracy"] - large["accuracy"])
    def best(prefix: str) -> str | None:
        names = [n for n in results if n.startswith(prefix) and "test" in results[n]]
        return min(names, key=lambda n: results[n]["test"]["llm_share"]) if names else None

    best_single, verdict = best("single-"), None
    if best_single:
        s = results[best_single]["test"]
        verdict = {"best_single": best_single}
        # a chain (student tiers in a row, an ensemble among them or not), and the ensemble alone
        for kind, other in (("chain", best("chain-")), ("ensemble", best("ensemble-"))):
            if other:
                c = results[other]["test"]
                wins = c["llm_share"] < s["llm_share"] and c["items_per_s"] > s["items_per_s"]
                verdict.update({f"best_{kind}": other, f"{kind}_share_minus_single": c["llm_share"] - s["llm_share"],
                                f"{kind}_speedup_over_single": c["items_per_s"] / s["items_per_s"],
                                f"{kind}_wins": wins})
    out = {"dataset": dataset, "run": str(run), "cpu": cpu_report(), "threads": os.cpu_count(),
           "fp32_matmul_peak_flops": matmul_peak("fp32", repeats=5),
           "command": "python bench/chain.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "max_loss": args.max_loss, "confidence": args.confidence,
           "oos_share": args.oos_share if labels.oos_label else None, "n_test": len(texts), "variants": results,
           "verdict": verdict, "wall_s": round(time.perf_counter() - t0, 1)}
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / f"chain-{dataset}.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(verdict, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
