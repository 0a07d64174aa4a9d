"""Does `cascade calibrate --confidence` keep its promise? A resampling check on a finished run (issue 20).

    python bench/calibration_check.py                              # runs/quickstart, 0.5 pt at 90%
    python bench/calibration_check.py --run runs/e2e-clinc150 --resamples 300 --max-loss 0.01
    python bench/calibration_check.py --run runs/e2e-clinc150 --oos-share 0.2   # the weighted promise

The run's tiers are measured once on its val + test texts (every tier, as calibration measures
them) and its cheap tiers on up to 3,000 train texts (where the certified path is learnt);
the measurements are cached beside the run (`calibration_check.measured.json`). Then, for
many resamples of "which items are validation", both procedures choose thresholds for a loss
of at most `--max-loss` against the large model with `--confidence`:

- old: the cheapest grid point on val that reaches the large model's val accuracy minus the
  tolerance and whose one-sided normal bound on the paired difference says so with that
  confidence (`confidence_of`), the check applied after the search;
- new: `cascade calibrate`'s decision (`calibrate_runs`: Learn then Test, the path learnt on
  train, every val item testing it), and, for comparison, the path learnt on a 30% split of val.

Two regimes:
- bootstrap: val is drawn with replacement from the pool (val + test) and the loss is the
  pool's own: the pool *is* the population, so "loss > tolerance" is exactly the event the
  guarantee bounds (its rate must stay <= 1 - confidence, up to Monte-Carlo error);
- split: val is drawn without replacement, the rest of the pool is test, as in the quickstart.
  The test loss is then itself a sample (800 items: a standard error near 0.5 pt), so its
  exceedance rate is not what the guarantee bounds; it is reported as what a user would see.
  It needs a rest at least as large as val: a `--val-n` above half the pool runs bootstrap only,
  which is how the check answers "what would more labelled evidence buy?".
The oracle share: the least large-model share among grid points of the evaluated items whose
loss there is within the tolerance. And the run's own split (its val -> its test), once.

Writes bench/results/calibration_check.json. runs/ is not in git: without the run this says
so and exits 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cascade.calibrate import calibrate_runs  # noqa: E402
from cascade.certify import certify, path_from_other_items  # noqa: E402
from cascade.data import seeded_sample  # noqa: E402
from cascade.thresholds import (  # noqa: E402
    CalibrationError,
    TierRun,
    choose,
    confidence_of,
    frontier,
    simulate,
    subset,
)


def measure(run: Path, path_limit: int, seed: int, config_name: str = "cascade.toml") -> dict:
    """Every tier on val + test, the cheap tiers on (a sample of) train; cached by the tier
    specs and the data and model files' sizes and times (one cache per config file)."""
    from cascade.config import build_cascade, load_config
    from cascade.data import load_labels, load_split
    from cascade.evaluate import LLM_KINDS

    config_path, data = run / config_name, run / "data"
    config = load_config(config_path)
    key = hashlib.sha256(json.dumps({
        "tiers": [[t.name, t.kind, str(t.path), repr(t.options)] for t in config.tiers],
        "files": sorted((str(f.relative_to(run)), f.stat().st_size, int(f.stat().st_mtime))
                        for f in run.rglob("*") if f.is_file() and f.suffix in (".jsonl", ".onnx", ".safetensors",
                                                                                   ".toml") and "checkpoints" not in
                        f.parts and f.name != config_name and not f.name.startswith("cascade-chain-")),
        "path_limit": path_limit, "seed": seed}, sort_keys=True).encode()).hexdigest()[:16]
    cache = run / ("calibration_check.measured.json" if config_name == "cascade.toml" else
                   f"calibration_check.{Path(config_name).stem}.measured.json")
    if cache.exists() and (got := json.loads(cache.read_text())).get("key") == key:
        print(f"measurements from {cache}", file=sys.stderr)
        return got
    val, test, train = (load_split(data, s) for s in ("val", "test", "train"))
    train = seeded_sample(train, path_limit, seed)
    is_llm = [spec.kind in LLM_KINDS for spec in config.tiers]
    cascade = build_cascade(config, config_path.parent)

    def progress(name: str, done: int, total: int) -> None:
        print(f"\r  measuring {name}: {done}/{total}", end="" if done < total else "\n", file=sys.stderr)

    from cascade.calibrate import measure_tiers

    try:
        t0 = time.perf_counter()
        pool = measure_tiers(cascade, is_llm, [ex.text for ex in val + test], progress=progress)
        cheap = measure_tiers(cascade, is_llm, [ex.text for ex in train], progress=progress,
                              tiers=len(config.tiers) - 1)
        wall = time.perf_counter() - t0
    finally:
        cascade.close()
    enc = lambda runs: [{"name": r.name, "labels": r.labels, "confidences": r.confidences.tolist(),  # noqa: E731
                         "mean_ms": r.mean_ms, "is_llm": r.is_llm} for r in runs]
    got = {"key": key, "n_val": len(val), "n_test": len(test), "pool": enc(pool),
           "pool_gold": [ex.label for ex in val + test], "train": enc(cheap), "train_gold": [ex.label for ex in train],
           "oos_label": load_labels(data).oos_label, "measure_wall_s": wall}
    cache.write_text(json.dumps(got) + "\n")
    return got


def label_free_runs(path: Path, run: Path, names: list[str], path_limit: int, seed: int):
    """The evidence file's runs less the train items `measure` put on the path (the same seeded sample)."""
    from cascade.data import load_split
    from cascade.evidence import drop_items, read_evidence, text_digest

    runs, digests, meta = read_evidence(path, names)
    train = load_split(run / "data", "train")
    on_path = {text_digest(ex.text) for ex in seeded_sample(train, path_limit, seed)}
    mask = np.array([d not in on_path for d in digests])
    if not mask.any():
        raise SystemExit(f"{path}: every evidence item is on the path; lower --path-limit")
    return drop_items(runs, mask), {"file": str(path), "n_file": len(digests), "n": int(mask.sum()),
                                    "folds": meta.get("folds")}


def decode(rows: list[dict]) -> list[TierRun]:
    return [TierRun(r["name"], r["labels"], np.array(r["confidences"]), r["mean_ms"], r["is_llm"]) for r in rows]


def llm_accuracy(runs: list[TierRun], gold: list[str]) -> float:
    return float(np.mean([a == g for a, g in zip(runs[-1].labels, gold)]))


def old_choice(runs, gold, eps, conf, label):
    """The procedure before issue 20: search, then a normal bound on the winner."""
    points = frontier(runs, gold, label=label)
    target = llm_accuracy(runs, gold) - eps
    try:
        return choose(points, target, confident=lambda p: confidence_of(runs, gold, p, target, True, label,
                                                                        max_loss=eps) >= conf)
    except CalibrationError:  # what the quickstart then did: the most accurate point
        return choose(points, max_llm_share=1.0)


def evaluate(runs, gold, point, label) -> tuple[float, float]:
    """(loss against the large model, large-model share) of the point's thresholds on these items."""
    is_label = None if label is None else [np.array([lab == label for lab in r.labels]) for r in runs]
    q = simulate(runs, gold, point.thresholds, label_thresholds=point.label_thresholds, is_label=is_label)
    return llm_accuracy(runs, gold) - q.accuracy, q.llm_share


def test_cost(runs, gold, point, label) -> float:
    """Expected ms per item at the point's thresholds (None: the large model alone)."""
    if point is None:
        return runs[-1].mean_ms
    is_label = None if label is None else [np.array([lab == label for lab in r.labels]) for r in runs]
    return simulate(runs, gold, point.thresholds, label_thresholds=point.label_thresholds, is_label=is_label).cost_ms


def oracle_share(runs, gold, eps, label) -> float:
    llm = llm_accuracy(runs, gold)
    return min(p.llm_share for p in frontier(runs, gold, 48, label) if p.accuracy >= llm - eps - 1e-12)


def weighted_check(pool, pool_gold, train, train_gold, label, m, args) -> dict:
    """`--oos-share S`: the same promise for traffic where out-of-scope requests are S of it
    (`traffic_weights`), with `certify`'s two weighted tests: "stratified" (exact, per stratum;
    `cascade calibrate --oos-share`'s) and "betting". Every val resample keeps the run's own
    count of out-of-scope items (val rarely holds many: CLINC150's 100 of 3,100) and draws
    them and the rest separately, so it is the run's val in composition; the loss it is judged
    by is the pool's under the same weights (bootstrap), or the held-out rest's (split)."""
    from cascade.thresholds import traffic_weights

    eps, conf, share = args.max_loss, args.confidence, args.oos_share
    path = path_from_other_items(train, train_gold, pool, label=label)
    is_oos = np.array([g == label for g in pool_gold])
    val_idx = np.arange(m["n_val"])
    n_oos = int(is_oos[val_idx].sum())
    n_in = len(val_idx) - n_oos

    def weighted(runs, gold):
        return traffic_weights(gold, label, share)

    def choose_with(test: str):
        def run(runs, gold):
            return certify(runs, gold, conf, max_loss=eps, label=label, path=path, path_gold=train_gold,
                           weights=weighted(runs, gold), weighted_test=test, bounds=False).point
        return run

    procedures = {"stratified": choose_with("stratified"), "betting": choose_with("betting")}

    def evaluate_w(runs, gold, point) -> tuple[float, float]:
        w = weighted(runs, gold)
        is_label = [np.array([lab == label for lab in r.labels]) for r in runs]
        q = simulate(runs, gold, point.thresholds, label_thresholds=point.label_thresholds, is_label=is_label,
                     weights=w)
        llm = float(np.average([a == g for a, g in zip(runs[-1].labels, gold)], weights=w))
        return llm - q.accuracy, q.llm_share

    def oracle_w(runs, gold) -> float:
        w = weighted(runs, gold)
        llm = float(np.average([a == g for a, g in zip(runs[-1].labels, gold)], weights=w))
        return min(p.llm_share for p in frontier(runs, gold, 48, label, weights=w) if p.accuracy >= llm - eps - 1e-12)

    test_idx = np.arange(m["n_val"], len(pool_gold))
    v, vg = subset(pool, val_idx), [pool_gold[i] for i in val_idx]
    t, tg = subset(pool, test_idx), [pool_gold[i] for i in test_idx]
    own = {k: f(v, vg) for k, f in procedures.items()}
    result = {"oos_share": share, "val_oos_items": n_oos, "val_in_scope_items": n_in,
              "own_split": {"oracle_llm_share_on_test": oracle_w(t, tg)} | {
                  k: dict(zip(("test_loss", "test_llm_share"), evaluate_w(t, tg, p)),
                          val_llm_share=evaluate_w(v, vg, p)[1])
                  for k, p in own.items()}}
    oos_pool, in_pool = np.flatnonzero(is_oos), np.flatnonzero(~is_oos)
    pool_oracle = oracle_w(pool, pool_gold)
    rng = np.random.default_rng(args.seed)
    regimes = {}
    for regime in ("bootstrap", "split"):
        rows, oracles, t0 = {k: [] for k in procedures}, [], time.perf_counter()
        for _ in range(args.resamples):
            if regime == "bootstrap":
                idx = np.concatenate([rng.choice(oos_pool, n_oos), rng.choice(in_pool, n_in)])
                ev, eg = pool, pool_gold
                oracles.append(pool_oracle)
            else:
                idx = np.concatenate([rng.choice(oos_pool, n_oos, replace=False),
                                      rng.choice(in_pool, n_in, replace=False)])
                rest = np.setdiff1d(np.arange(len(pool_gold)), idx)
                ev, eg = subset(pool, rest), [pool_gold[i] for i in rest]
                oracles.append(oracle_w(ev, eg))
            idx = np.sort(idx)
            runs, gold = subset(pool, idx), [pool_gold[i] for i in idx]
            for k, f in procedures.items():
                rows[k].append(evaluate_w(ev, eg, f(runs, gold)))
        regimes[regime] = {"oracle_llm_share_mean": float(np.mean(oracles)), "wall_s": time.perf_counter() - t0} | {
            k: summary(r, eps, oracles) for k, r in rows.items()}
        print(f"{regime}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    result["regimes"] = regimes
    return result


def summary(rows: list[tuple[float, float]], eps: float, oracle: list[float]) -> dict:
    a = np.array(rows)
    viol = a[:, 0] > eps + 1e-12
    share = a[:, 1]
    return {"violation_rate": float(viol.mean()), "violation_se": float(np.sqrt(viol.mean() * (1 - viol.mean())
                                                                                / len(a))),
            "llm_share_mean": float(share.mean()), "llm_share_median": float(np.median(share)),
            "loss_mean": float(a[:, 0].mean()), "loss_p90": float(np.quantile(a[:, 0], 0.9)),
            "share_over_oracle": float(share.mean() / np.mean(oracle)), "resamples": len(a)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default=str(ROOT / "runs" / "quickstart"), help="a finished quickstart or e2e run")
    ap.add_argument("--config", default="cascade.toml",
                    help="the cascade config in the run to check (e.g. a bench/chain.py variant's)")
    ap.add_argument("--max-loss", type=float, default=0.005)
    ap.add_argument("--confidence", type=float, default=0.9)
    ap.add_argument("--resamples", type=int, default=300, help="per regime")
    ap.add_argument("--val-n", type=int, help="validation items per resample (default: the run's val size)")
    ap.add_argument("--path-limit", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--label-free", metavar="EVIDENCE.json",
                    help="also the new procedure with this label-free evidence (`cascade train crossfit`), less "
                         "the path's train items")
    ap.add_argument("--oos-share", type=float,
                    help="check the weighted promise instead: out-of-scope requests are this share of traffic; "
                         "the stratified and the betting test side by side")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "calibration_check.json"))
    args = ap.parse_args(argv)
    run = Path(args.run)
    missing = [p for p in (run / args.config, run / "data" / "val.jsonl", run / "data" / "test.jsonl",
                           run / "data" / "train.jsonl") if not p.exists()]
    if missing:
        print(f"calibration_check: {run} is not a finished run (missing {', '.join(map(str, missing))}).\n"
              "runs/ is not in git: make one with `cascade quickstart` (it writes runs/quickstart) or "
              "`python bench/e2e.py`, or point --run at one. Nothing was written.", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    m = measure(run, args.path_limit, args.seed, args.config)
    pool, pool_gold = decode(m["pool"]), m["pool_gold"]
    train, train_gold = decode(m["train"]), m["train_gold"]
    label, eps, conf = m["oos_label"], args.max_loss, args.confidence
    n_pool, n_val = len(pool_gold), args.val_n or m["n_val"]
    if args.oos_share:
        if label is None:
            raise SystemExit(f"--oos-share: {run}'s labels have no out-of-scope label")
        result = {"run": str(run), "config": args.config, "max_loss": eps, "confidence": conf, "n_pool": n_pool,
                  "n_val": m["n_val"],
                  "n_train_path": len(train_gold), "tiers": [r.name for r in pool],
                  "resamples": args.resamples} | weighted_check(pool, pool_gold, train, train_gold, label, m, args)
        result["wall_s"] = time.perf_counter() - t_start
        o = result["own_split"]
        print(f"{run}: out-of-scope at {args.oos_share:.0%} of traffic; val holds {result['val_oos_items']} of them "
              f"and {result['val_in_scope_items']} others; tolerance {eps:g} at {conf:.0%}")
        print(f"own split: oracle share on test {o['oracle_llm_share_on_test']:.3f}")
        for k in ("stratified", "betting"):
            print(f"  {k:>10}: val share {o[k]['val_llm_share']:.3f}, test share {o[k]['test_llm_share']:.3f}, "
                  f"test loss {o[k]['test_loss']:+.4f}")
        for regime, res in result["regimes"].items():
            print(f"{regime} ({args.resamples} resamples): oracle share {res['oracle_llm_share_mean']:.3f}")
            for k in ("stratified", "betting"):
                r = res[k]
                print(f"  {k:>10}: violation {r['violation_rate']:.3f} +- {r['violation_se']:.3f}, share "
                      f"{r['llm_share_mean']:.3f} ({r['share_over_oracle']:.2f}x oracle), loss {r['loss_mean']:+.4f}")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
        return 0
    path = path_from_other_items(train, train_gold, pool, label=label)  # fixed: train is not resampled

    def new_choice(runs, gold):
        return calibrate_runs(runs, gold, "llm", confidence=conf, max_loss=eps, label=label, path_runs=train,
                              path_gold=train_gold)["chosen"]

    def new_learn_split(runs, gold, seed):
        return certify(runs, gold, conf, max_loss=eps, label=label, learn_share=0.3, seed=seed, bounds=False).point

    def run_new(runs, gold):  # as calibrate_runs, with the path learnt once
        return certify(runs, gold, conf, max_loss=eps, label=label, path=path, path_gold=train_gold,
                       bounds=False).point

    procedures = ["old", "new", "new_learn_split"]
    unlabelled = None
    if args.label_free:
        unlabelled, lf = label_free_runs(Path(args.label_free), run, [r.name for r in pool], args.path_limit,
                                         args.seed)
        procedures.append("new_label_free")

    def run_label_free(runs, gold):  # calibrate_runs with --label-free: the same path, the evidence beside val
        return certify(runs, gold, conf, max_loss=eps, label=label, path=path, path_gold=train_gold,
                       unlabelled=unlabelled, bounds=False).point

    rng = np.random.default_rng(args.seed)
    result = {"run": str(run), "config": args.config, "max_loss": eps, "confidence": conf, "n_pool": n_pool,
              "n_val": n_val,
              "n_train_path": len(train_gold), "tiers": [r.name for r in pool],
              "pool_llm_accuracy": llm_accuracy(pool, pool_gold), "measure_wall_s": m["measure_wall_s"],
              "label_free": lf if args.label_free else None}

    # the run's own split, once (the same decision `cascade calibrate` makes; with --val-n below the
    # run's val size, on the seeded sample `cascade calibrate --limit N --seed S` measures)
    val_idx, test_idx = np.arange(m["n_val"]), np.arange(m["n_val"], n_pool)
    val_idx = np.array(seeded_sample(list(val_idx), n_val, args.seed))
    v, vg = subset(pool, val_idx), [pool_gold[i] for i in val_idx]
    t, tg = subset(pool, test_idx), [pool_gold[i] for i in test_idx]
    own = {"old": old_choice(v, vg, eps, conf, label), "new": new_choice(v, vg),
           "new_learn_split": new_learn_split(v, vg, args.seed)}
    if unlabelled is not None:
        own["new_label_free"] = run_label_free(v, vg)
    result["own_split"] = {"oracle_llm_share_on_test": oracle_share(t, tg, eps, label),
                           "llm_accuracy_on_test": llm_accuracy(t, tg)} | {
        k: dict(zip(("test_loss", "test_llm_share"), evaluate(t, tg, p, label)),
                val_llm_share=p.llm_share, thresholds=list(p.thresholds),
                # modelled from each tier's measured ms per item: the large model alone over this point
                speedup_over_llm_modelled=test_cost(t, tg, None, label) / test_cost(t, tg, p, label))
        for k, p in own.items()}

    pool_oracle = oracle_share(pool, pool_gold, eps, label)
    regimes = {}
    # split draws val without replacement and tests on the rest, so it needs a rest as large as val;
    # bootstrap draws with replacement from the pool (the population), so any --val-n is sound there:
    # that is how the check asks "what would more labelled evidence buy?"
    regime_names = ("bootstrap", "split") if 2 * n_val <= n_pool else ("bootstrap",)
    for regime in regime_names:
        rows = {k: [] for k in procedures}
        oracles = []
        t0 = time.perf_counter()
        for r in range(args.resamples):
            if regime == "bootstrap":
                idx = rng.integers(0, n_pool, n_val)
                ev, eg, oracles = pool, pool_gold, oracles + [pool_oracle]
            else:
                perm = rng.permutation(n_pool)
                idx, rest = perm[:n_val], np.sort(perm[n_val:])
                ev, eg = subset(pool, rest), [pool_gold[i] for i in rest]
                oracles.append(oracle_share(ev, eg, eps, label))
            runs, gold = subset(pool, idx), [pool_gold[i] for i in idx]
            rows["old"].append(evaluate(ev, eg, old_choice(runs, gold, eps, conf, label), label))
            rows["new"].append(evaluate(ev, eg, run_new(runs, gold), label))
            rows["new_learn_split"].append(evaluate(ev, eg, new_learn_split(runs, gold, r), label))
            if unlabelled is not None:
                rows["new_label_free"].append(evaluate(ev, eg, run_label_free(runs, gold), label))
        regimes[regime] = {"oracle_llm_share_mean": float(np.mean(oracles)), "wall_s": time.perf_counter() - t0} | {
            k: summary(v, eps, oracles) for k, v in rows.items()}
        print(f"{regime}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    result["regimes"] = regimes
    if "split" not in regimes:
        result["split_skipped"] = f"--val-n {n_val} leaves a held-out rest smaller than val in a pool of {n_pool}"
    result["wall_s"] = time.perf_counter() - t_start

    print(f"{run}: pool {n_pool} items (val {m['n_val']} + test {m['n_test']}), val resamples of {n_val}, "
          f"path from {len(train_gold)} train items; tolerance {eps:g} at {conf:.0%}")
    o = result["own_split"]
    print(f"own split (its val -> its test): oracle share on test {o['oracle_llm_share_on_test']:.3f}")
    for k in own:
        print(f"  {k:>16}: val share {o[k]['val_llm_share']:.3f}, test share {o[k]['test_llm_share']:.3f}, "
              f"test loss {o[k]['test_loss']:+.4f}, {o[k]['speedup_over_llm_modelled']:.1f}x the large model "
              f"(modelled from tier ms)")
    for regime, res in regimes.items():
        print(f"{regime} ({args.resamples} resamples; loss on "
              f"{'the pool' if regime == 'bootstrap' else 'the held-out rest'}): oracle share "
              f"{res['oracle_llm_share_mean']:.3f}")
        for k in rows:
            s = res[k]
            print(f"  {k:>16}: violation {s['violation_rate']:.3f} +- {s['violation_se']:.3f}, share "
                  f"{s['llm_share_mean']:.3f} ({s['share_over_oracle']:.2f}x oracle), loss {s['loss_mean']:+.4f} "
                  f"(p90 {s['loss_p90']:+.4f})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
