"""The flywheel, measured: does the large model's share fall round after round while the
cascade serves its own traffic? (issue 17 item 5, docs/flywheel.md "Measured")

    python bench/flywheel.py --run runs/e2e-banking77 --out runs/flywheel-banking77

From a `bench/e2e.py` run it reuses the large model (and its val/test splits), then:

    seed      a data dir whose train is a seeded `--seed-share` (5%) of the run's train; rules
              mined on it, a student distilled from it (the large model as teacher), int8,
              calibrated (the large model's accuracy minus 0.5 pt at 90%): version 0
    traffic   the rest of train, shuffled, cut into `--rounds` rounds: unlabelled traffic
    a round   per strategy: `cascade serve` (a real server on loopback, its traffic log and
              audit sampling on) answers the round's texts, one request each from 8 clients;
              then `run_flywheel` on that log (the budget: `--budget-share` of the round's
              traffic, picked by the strategy; warm-started distillation; recalibration; the
              gate) promotes a new version or keeps the current one; the version now current is
              measured on a seeded `--test-limit` sample of test
    cost      every large-model call a round spends: escalations + audits (from the log) +
              labelling (the manifest); the calibration's and the gate's calls on val are
              counted apart (a fixed cost per round, as in any redeploy)

An arm is a strategy, or `strategy@N`: the same strategy with the distillation set pruned to N
rows each round (`--max-train N` of `cascade flywheel`, dropping the easiest rows), so
`--strategies random,random@3000` measures what pruning costs against the unpruned arm.

Round 1's traffic is served once by version 0 and its log copied to every strategy (the same
server would log the same answers; audits are a random draw either way). Each step leaves its
JSON under OUT/state, so a killed run resumes where it stopped. Writes
`bench/results/flywheel-<dataset>.json` and its PNG (share and accuracy per round per strategy).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from load import free_port, wait_ready  # noqa: E402

STRATEGIES = ("random", "uncertainty", "diversity", "importance")
AUDIT = "\n[audit]\nshare = {share}\nmax_per_s = 50\nmax_llm_wait_s = 5\n"


def _save(path: Path, record: dict) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)
    return record


def _once(path: Path, make) -> dict:
    """A step's record: read when it exists (a resumed run), else computed and saved."""
    return json.loads(path.read_text()) if path.exists() else _save(path, make())


# --- the seed --------------------------------------------------------------------------------


def prepare(run: Path, out: Path, seed_share: float, rounds: int, seed: int) -> dict:
    """OUT/data (train = the seed, val and test as the run's) and OUT/traffic/round{r}.jsonl."""
    from cascade.data import load_labels, load_split, write_dataset

    src = run / "data"
    labels = load_labels(src)
    train = load_split(src, "train")
    order = np.random.default_rng(seed).permutation(len(train))
    n_seed = max(1, round(seed_share * len(train)))
    splits = {"train": [train[i] for i in sorted(order[:n_seed])], "val": load_split(src, "val"),
              "test": load_split(src, "test")}
    write_dataset(out / "data", splits, labels.oos_label, labels.task)
    rest = order[n_seed:]
    (out / "traffic").mkdir(parents=True, exist_ok=True)
    sizes = []
    for r, chunk in enumerate(np.array_split(rest, rounds), start=1):
        with (out / "traffic" / f"round{r}.jsonl").open("w") as f:
            for i in chunk:
                f.write(json.dumps({"text": train[i].text}) + "\n")
        sizes.append(len(chunk))
    return {"train": len(train), "seed": n_seed, "round_sizes": sizes, "val": len(splits["val"]),
            "test": len(splits["test"]), "labels": len(labels.labels)}


def build_seed(run: Path, out: Path, epochs: float) -> dict:
    """Version 0: rules mined on the seed, a distil-smollm2 student distilled from the large model
    on the seed, exported int8, calibrated; OUT/seed/cascade.toml."""
    from cascade.app.quickstart import CONFIG_TEMPLATE
    from cascade.calibrate import run_calibration
    from cascade.data import load_labels, load_split
    from cascade.rules.mine import mine_for_task, write_pack
    from training.distill import train_student
    from training.flywheel import export_student
    from training.recipes import STUDENT
    from training.trainer import TrainConfig

    data, seed_dir = out / "data", out / "seed"
    seed_dir.mkdir(parents=True, exist_ok=True)
    labels = load_labels(data)
    train, val = load_split(data, "train"), load_split(data, "val")
    write_pack(mine_for_task(train, val, "flywheel-seed", labels.task, labels.oos_label), seed_dir / "rules.toml")
    t0 = time.perf_counter()
    student = train_student(data, run / "large", seed_dir / "student", size="distil-smollm2", from_teacher=True,
                            resume=True, cfg=TrainConfig(**{**STUDENT, "epochs": epochs, "warmup_steps": 10}))
    train_s = time.perf_counter() - t0
    export = export_student(seed_dir / "student", data)
    text = CONFIG_TEMPLATE.format(task="flywheel-seed", kind=labels.task, writer="bench/flywheel.py")
    text = text.replace('path = "large"', f'path = "{os.path.relpath(run / "large", seed_dir)}"')
    (seed_dir / "cascade.toml").write_text(text)
    cal = run_calibration(seed_dir / "cascade.toml", data, "llm", max_loss=0.005, confidence=0.9)
    return {"student_val_accuracy": student.summary["val_accuracy"], "student_steps": student.summary["steps"],
            "train_s": round(train_s, 1), "int8_top1_agreement": export["int8"]["top1_agreement"],
            "calibration": {"chosen": cal["chosen"], "llm_val_accuracy": cal["last_tier_accuracy"]}}


def strategy_config(out: Path, strategy: str, audit_share: float) -> Path:
    """Version 0's cascade.toml for one strategy: its own traffic log dir and audit sampling."""
    seed_cfg = (out / "seed" / "cascade.toml").read_text()
    path = out / "seed" / f"cascade-{strategy}.toml"
    log_dir = os.path.relpath(out / strategy / "traffic", out / "seed")
    path.write_text(f'traffic_log = {{ dir = "{log_dir}", fsync_s = 0.5 }}\n' + seed_cfg
                    + AUDIT.format(share=audit_share))
    return path


# --- serving a round ----------------------------------------------------------------------


def serve_round(config: Path, texts: list[str], clients: int = 8) -> dict:
    """`cascade serve` answers `texts` (a request each, `clients` at a time), then drains: the
    traffic log and pending audits are flushed on shutdown."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "cascade", "serve", "--config", str(config), "--port", str(port),
                             "--log-level", "warning"], cwd=ROOT)
    try:
        import httpx

        wait_ready(url + "/readyz", proc)
        with httpx.Client(timeout=120) as client:
            def ask(text: str) -> tuple[int, str | None]:
                r = client.post(url + "/v1/classify", json={"text": text})
                return r.status_code, (r.json()["results"][0].get("tier") if r.status_code == 200 else None)

            t0 = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                answers = list(pool.map(ask, texts))
            wall = time.perf_counter() - t0
            time.sleep(3.0)  # audits run after their answers, in the background
            metrics = client.get(url + "/metrics").text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    failed = sum(code != 200 for code, _ in answers)
    if failed:
        raise RuntimeError(f"serve_round: {failed} of {len(texts)} requests failed")
    tiers: dict[str, int] = {}
    for _, tier in answers:
        tiers[tier] = tiers.get(tier, 0) + 1
    audits = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                 if line.startswith("cascade_audit_items_total{"))
    return {"requests": len(texts), "wall_s": round(wall, 1), "tiers": tiers, "audits_metric": audits}


def log_calls(log_dir: Path, since: int) -> tuple[dict, int]:
    """Large-model calls in the log's entries past `since`: escalations and audits."""
    from serving.traffic_log import read_log

    entries = list(read_log(log_dir))
    new = entries[since:]
    esc = sum(1 for e in new if not e.get("audit") and e.get("tier") == "llm")
    aud = sum(1 for e in new if e.get("audit"))
    return {"entries": len(new), "escalations": esc, "audits": aud}, len(entries)


# --- measuring on test ------------------------------------------------------------------------


def test_sample(data: Path, limit: int, seed: int) -> tuple[list[str], list[str]]:
    from cascade.data import load_split

    test = load_split(data, "test")
    idx = sorted(np.random.default_rng(seed + 1).permutation(len(test))[:limit])
    return [test[i].text for i in idx], [test[i].label for i in idx]


def measure_test(config: Path, texts: list[str], gold: list[str], llm_alone: bool = False) -> dict:
    """The version's accuracy, large-model share and items/s on the test sample, with each item's
    (correct, escalated) for the paired comparisons."""
    from cascade.config import build_cascade, load_config
    from cascade.evaluate import as_predictions, predict_timed
    from cascade.metrics import classification_report

    cfg = load_config(config)
    if llm_alone:
        cfg = cfg.model_copy(update={"tiers": [t for t in cfg.tiers if t.kind == "llm"][-1:]})
    cascade = build_cascade(cfg, config.parent)
    try:
        for tier in cascade.tiers:  # lazy init (oneDNN packing, ORT arenas) is not the version's speed
            tier.predict_batch(texts[:32])
        answers, seconds = predict_timed(cascade, texts)
    finally:
        cascade.close()
    preds, failed = as_predictions(answers)
    rep = classification_report(gold, preds, [t.name for t in cfg.tiers], seconds, None, ["llm"])
    return {"accuracy": rep["accuracy"], "llm_share": rep["llm_share"], "items_per_s": len(texts) / seconds,
            "tier_shares": rep.get("tier_shares"), "failed": len(failed),
            "correct": [int(p.label == g) for p, g in zip(preds, gold)],
            "escalated": [int(p.tier == "llm") for p in preds]}


def student_alone(config: Path, texts: list[str], gold: list[str], large_correct: list[int],
                  max_loss: float = 0.005) -> dict:
    """The version's student alone on the test sample, and the **oracle share**: the fewest of its
    least confident items that, sent to the large model, bring the accuracy to the large model's
    minus `max_loss` on these very items. It measures what a round's labels bought, free of the
    certified calibration's step-wise choice (which moved the served share by up to 2.6x
    between two students of the same val accuracy)."""
    from cascade.config import build_cascade, load_config

    cfg = load_config(config)
    spec = [t for t in cfg.tiers if t.kind == "student"][-1]
    cascade = build_cascade(cfg.model_copy(update={"tiers": [spec]}), config.parent)
    try:
        preds = cascade.tiers[0].predict_batch(texts)
    finally:
        cascade.close()
    correct = np.array([int(p.label == g) for p, g in zip(preds, gold)])
    large = np.asarray(large_correct)
    order = np.argsort([p.confidence for p in preds], kind="stable")  # least confident first
    target = large.mean() - max_loss
    # accuracy when the k least confident go to the large model, for k = 0..n
    gains = np.concatenate([[0], np.cumsum(large[order] - correct[order])])
    acc = (correct.sum() + gains) / len(correct)
    k = int(np.argmax(acc >= target - 1e-12)) if (acc >= target - 1e-12).any() else len(correct)
    return {"accuracy": float(correct.mean()), "oracle_share": k / len(correct), "correct": correct.tolist()}


def final_speed(configs: dict[str, Path], texts: list[str], repeats: int = 2) -> dict:
    """items/s of version 0, each strategy's last version and the large model alone on the test
    sample, round robin, best of `repeats`: the per-round figures were measured minutes apart on
    a shared machine, these in one sitting (a drift hits all alike)."""
    from cascade.config import build_cascade, load_config
    from cascade.evaluate import predict_timed
    from cascade.router import Cascade

    systems = {name: build_cascade(load_config(path), path.parent) for name, path in configs.items()}
    first = next(iter(systems.values()))
    systems["large_only"] = Cascade([first.tiers[-1]], [0.0])
    best: dict[str, float] = {}
    try:
        for cascade in systems.values():
            for tier in cascade.tiers:
                tier.predict_batch(texts[:32])
        for _ in range(repeats):
            for name, cascade in systems.items():
                _, seconds = predict_timed(cascade, texts)
                best[name] = max(best.get(name, 0.0), len(texts) / seconds)
    finally:
        for name, cascade in systems.items():
            if name != "large_only":
                cascade.close()
    return {"items_per_s": best, "vs_large": {n: v / best["large_only"] for n, v in best.items()},
            "repeats": repeats}


def paired_ci(a: list[int], b: list[int], resamples: int = 2000, seed: int = 0) -> dict:
    """mean(a) − mean(b) over the same items, with a 90% paired bootstrap interval."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), (resamples, len(a)))
    diffs = (a[idx] - b[idx]).mean(axis=1)
    return {"diff": float(a.mean() - b.mean()), "ci90": [float(np.quantile(diffs, 0.05)),
                                                          float(np.quantile(diffs, 0.95))]}


# --- the rounds -------------------------------------------------------------------------------


def current_config(out: Path, strategy: str) -> Path:
    """The strategy's current version (version 0 until a round is promoted)."""
    current = out / strategy / "versions" / "current" / "cascade.toml"
    return current.resolve() if current.exists() else out / "seed" / f"cascade-{strategy}.toml"


def parse_arm(arm: str) -> tuple[str, int | None]:
    """`strategy` or `strategy@N` (pruned to N rows) -> (strategy, N or None)."""
    strategy, _, rows = arm.partition("@")
    if strategy not in STRATEGIES:
        raise ValueError(f"--strategies: unknown strategy {strategy!r} in {arm!r}; choose from {', '.join(STRATEGIES)}")
    if "@" in arm and not (rows.isdigit() and int(rows) > 0):
        raise ValueError(f"--strategies: {arm!r}: after '@' a positive number of rows to prune to")
    return strategy, int(rows) if rows else None


def run_round(out: Path, arm: str, r: int, args, texts: list[str], test: tuple, state: Path) -> dict:
    from training.flywheel import FlywheelConfig, run_flywheel
    from training.recipes import STUDENT
    from training.trainer import TrainConfig

    strategy, max_train = parse_arm(arm)
    max_train = max_train or args.max_train
    versions, log_dir = out / arm / "versions", out / arm / "traffic"
    config = current_config(out, arm)
    if not config.exists():
        config = strategy_config(out, arm, args.audit_share)

    def served() -> dict:
        if r == 1 and (out / "round1-log").exists():  # version 0 served round 1 once for all strategies
            shutil.copytree(out / "round1-log", log_dir, dirs_exist_ok=True)
            return json.loads((out / "round1-served.json").read_text())
        report = serve_round(config, texts)
        if r == 1:
            shutil.copytree(log_dir, out / "round1-log")
            _save(out / "round1-served.json", report)
        return report

    before = json.loads((state / f"{arm}-r{r - 1}.json").read_text())["log_entries"] if r > 1 else 0
    serve = _once(state / f"{arm}-r{r}-serve.json", served)
    calls, entries = log_calls(log_dir, before)
    budget = round(args.budget_share * len(texts))
    t0 = time.perf_counter()
    manifest = run_flywheel(
        config, log_dir, out / "data", versions,
        FlywheelConfig(budget=budget, strategy=strategy, seed=args.seed, max_train=max_train,
                       min_agreement=args.min_agreement),
        TrainConfig(**{**STUDENT, "lr": args.lr, "epochs": args.epochs, "max_steps": args.max_steps,
                       "warmup_steps": 10}),
        promote=True, resume=any(versions.glob(".v*.partial")), progress=False)
    flywheel_s = time.perf_counter() - t0
    measured = measure_test(current_config(out, arm), *test)
    gate = manifest["gate"]
    return {"strategy": strategy, "arm": arm, "max_train": max_train, "round": r,
            "served": serve, "log_entries": entries,
            "llm_calls": {**calls, "labelling": manifest["counts"]["budget_labels"],
                          "total": calls["escalations"] + calls["audits"] + manifest["counts"]["budget_labels"]},
            "version": manifest["version"], "promoted": manifest["promoted"], "gate": {
                "passed": gate["passed"], "reasons": gate["reasons"], "new_val": gate["new"],
                "current_val": gate["current"]},
            "counts": manifest["counts"], "selection": manifest["selection"], "prune": manifest["prune"],
            "training": {k: manifest["training"].get(k) for k in ("steps", "val_accuracy", "wall_s")},
            "calibration_chosen": manifest["calibration"].get("chosen"), "timings_s": manifest["timings_s"],
            "flywheel_s": round(flywheel_s, 1), "test": measured}


def summarize(result: dict, alone: dict) -> dict:
    """The issue's targets from the rounds; `alone`: `student_alone` per version."""
    large = result["large_only"]
    rows = result["rounds"]
    out = {}
    for s in result["strategies"]:
        done_rounds = [f"{s}-r{r}" for r in range(1, result["rounds_n"] + 1) if f"{s}-r{r}" in rows]
        per = [result["round0"]["test"]] + [rows[k]["test"] for k in done_rounds]
        versions = ["version0"] + done_rounds
        first, last = per[0]["llm_share"], per[-1]["llm_share"]
        out[s] = {"shares": [p["llm_share"] for p in per], "accuracies": [p["accuracy"] for p in per],
                  "items_per_s_vs_large": [p["items_per_s"] / large["items_per_s"] for p in per],
                  "share_fall": first / last if last > 0 else float("inf"),
                  "worst_gap_pt": 100 * min(p["accuracy"] - large["accuracy"] for p in per),
                  # each round's gap to the large model on the same test items, with its 90%
                  # paired interval: the test sample's own error beside the point estimate
                  "gaps_vs_large": [paired_ci(p["correct"], large["correct"]) for p in per],
                  "student_accuracies": [alone[k]["accuracy"] for k in versions],
                  "oracle_shares": [alone[k]["oracle_share"] for k in versions],
                  "llm_calls_total": sum(rows[k]["llm_calls"]["total"] for k in done_rounds)}
    done = [s for s in out if len(out[s]["shares"]) == result["rounds_n"] + 1]
    targets = {s: {"share_falls_3x": out[s]["share_fall"] >= 3,
                   "within_0.5pt_every_round": out[s]["worst_gap_pt"] >= -0.5,
                   # no round shown to be more than 0.5 pt below: its interval's top at or above -0.5 pt
                   "no_round_shown_below_0.5pt": all(g["ci90"][1] >= -0.005 for g in out[s]["gaps_vs_large"])}
               for s in out}
    versus = {}
    last = result["rounds_n"]
    if "random" in done:
        for s in done:
            if s != "random":
                a, b = rows[f"{s}-r{last}"]["test"], rows[f"random-r{last}"]["test"]
                versus[s] = {"llm_share_minus_random": paired_ci(a["escalated"], b["escalated"]),
                             "accuracy_minus_random": paired_ci(a["correct"], b["correct"]),
                             "student_accuracy_minus_random": paired_ci(alone[f"{s}-r{last}"]["correct"],
                                                                        alone[f"random-r{last}"]["correct"])}
    pruning = {}  # an arm `s@N` against the same strategy unpruned, on the last round
    for s in done:
        base = s.partition("@")[0]
        if "@" in s and base in done:
            a, b = rows[f"{s}-r{last}"], rows[f"{base}-r{last}"]
            pruning[s] = {"rows": [a["counts"].get("distillation_rows"), b["counts"].get("distillation_rows")],
                          "accuracy_minus_unpruned": paired_ci(a["test"]["correct"], b["test"]["correct"]),
                          "llm_share_minus_unpruned": paired_ci(a["test"]["escalated"], b["test"]["escalated"]),
                          "student_accuracy_minus_unpruned": paired_ci(alone[f"{s}-r{last}"]["correct"],
                                                                       alone[f"{base}-r{last}"]["correct"]),
                          "distill_s": [a["timings_s"].get("distil"), b["timings_s"].get("distil")]}
    return {"per_strategy": out, "targets": targets, "vs_random_last_round": versus, "pruning_last_round": pruning}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for s, v in result["summary"]["per_strategy"].items():
        line, = ax1.plot(range(len(v["shares"])), v["shares"], marker="o", label=f"{s} (served, certified)")
        ax1.plot(range(len(v["oracle_shares"])), v["oracle_shares"], ls="--", color=line.get_color(),
                 label=f"{s} (oracle threshold on test)")
        ax2.plot(range(len(v["accuracies"])), v["accuracies"], marker="o", label=s)
    ax2.axhline(result["large_only"]["accuracy"], color="k", ls="--", label="large model alone")
    ax2.axhline(result["large_only"]["accuracy"] - 0.005, color="k", ls=":", label="− 0.5 pt")
    if result.get("static_share") is not None:
        ax1.axhline(result["static_share"], color="grey", ls="--", label="static e2e cascade")
    ax1.set(xlabel="round", ylabel="large-model share (test)", title="share")
    ax2.set(xlabel="round", ylabel="accuracy (test)", title="accuracy")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    fig.suptitle(f"flywheel on {result['dataset']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    from cascade.cpu import cpu_report
    from training.trainer import matmul_peak

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="a bench/e2e.py run dir (its large/ and data/)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dataset", default=None, help="the results' name (default: the run's dir name)")
    p.add_argument("--strategies", default=",".join(STRATEGIES),
                   help="arms, comma-separated: a strategy, or strategy@N (pruned to N rows a round)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seed-share", type=float, default=0.05)
    p.add_argument("--budget-share", type=float, default=0.02)
    p.add_argument("--audit-share", type=float, default=0.05)
    p.add_argument("--seed-epochs", type=float, default=6.0)
    p.add_argument("--epochs", type=float, default=1.0, help="each round's warm-started distillation")
    p.add_argument("--max-steps", type=int, default=None, help="... capped at this many steps")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--max-train", type=int, default=None, help="prune the distillation set to this many rows")
    p.add_argument("--min-agreement", type=float, default=None,
                   help="each round's int8 vs fp32 agreement target (default: off; the search for nodes to keep in "
                        "fp32 costs minutes a round, and calibration measures the int8 graph that serves anyway)")
    p.add_argument("--test-limit", type=int, default=1000)
    p.add_argument("--static", type=Path, default=None, help="the static e2e result JSON (its cascade's share)")
    p.add_argument("--results-dir", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    strategies = [s for s in args.strategies.split(",") if s]
    for arm in strategies:
        try:
            parse_arm(arm)
        except ValueError as e:
            p.error(str(e))
    out, state = args.out, args.out / "state"
    dataset = args.dataset or args.run.name.removeprefix("e2e-")
    t_start = time.perf_counter()

    prep = _once(state / "prepare.json", lambda: prepare(args.run, out, args.seed_share, args.rounds, args.seed))
    print(f"[bench] seed {prep['seed']} of {prep['train']} train texts; rounds {prep['round_sizes']}", flush=True)
    seed = _once(state / "seed.json", lambda: build_seed(args.run, out, args.seed_epochs))
    print(f"[bench] version 0: student val {seed['student_val_accuracy']:.4f}, chosen {seed['calibration']['chosen']}",
          flush=True)
    test = test_sample(out / "data", args.test_limit, args.seed)
    large = _once(state / "large.json", lambda: {**measure_test(out / "seed" / "cascade.toml", *test, llm_alone=True),
                                                 "peak_fp32_flops": matmul_peak("fp32", repeats=5)})
    round0 = _once(state / "round0.json", lambda: {"test": measure_test(out / "seed" / "cascade.toml", *test)})
    print(f"[bench] large alone {large['accuracy']:.4f} at {large['items_per_s']:.1f} items/s; version 0 "
          f"{round0['test']['accuracy']:.4f}, share {round0['test']['llm_share']:.3f}", flush=True)

    rounds = {}
    for r in range(1, args.rounds + 1):
        texts = [json.loads(line)["text"] for line in (out / "traffic" / f"round{r}.jsonl").open()]
        for s in strategies:
            rec = _once(state / f"{s}-r{r}.json", lambda: run_round(out, s, r, args, texts, test, state))
            rounds[f"{s}-r{r}"] = rec
            t = rec["test"]
            print(f"[bench] round {r} {s:<11} {rec['version']} promoted={rec['promoted']}  test accuracy "
                  f"{t['accuracy']:.4f} share {t['llm_share']:.3f} ({t['items_per_s'] / large['items_per_s']:.1f}x "
                  f"large)  llm calls {rec['llm_calls']['total']}  flywheel {rec['flywheel_s']:.0f}s", flush=True)

    finished = [s for s in strategies if f"{s}-r{args.rounds}" in rounds]
    speed = _once(state / f"speed-{'-'.join(finished)}.json", lambda: final_speed(
        {"version0": out / "seed" / "cascade.toml",
         **{s: current_config(out, s) for s in finished}}, test[0]))
    print(f"[bench] items/s against the large model alone, one sitting: {speed['vs_large']}", flush=True)
    def versions_alone() -> dict:
        got = {"version0": student_alone(out / "seed" / "cascade.toml", *test, large["correct"])}
        for key, rec in rounds.items():
            strategy = key.rsplit("-r", 1)[0]
            got[key] = student_alone(out / strategy / "versions" / rec["version"] / "cascade.toml", *test,
                                     large["correct"])
        return got

    alone = _once(state / f"alone-{'-'.join(strategies)}-{len(rounds)}.json", versions_alone)
    static = json.loads(args.static.read_text())["cascade"]["llm_share"] if args.static else None
    result = {"dataset": dataset, "run": str(args.run), "cpu": cpu_report(), "threads": os.cpu_count(),
              "command": "python bench/flywheel.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "prepare": prep, "seed": seed, "large_only": {k: v for k, v in large.items()
                                                            if k not in ("correct", "escalated")},
              "round0": round0, "rounds_n": args.rounds, "strategies": strategies, "rounds": rounds,
              "static_share": static, "speed_one_sitting": speed,
              "student_alone": {k: {kk: v for kk, v in a.items() if kk != "correct"} for k, a in alone.items()},
              "wall_s": round(time.perf_counter() - t_start, 1)}
    result["summary"] = summarize({**result, "large_only": large}, alone)
    if static is not None:
        result["summary"]["last_share_at_or_below_static"] = {
            s: v["shares"][-1] <= static for s, v in result["summary"]["per_strategy"].items()}
    for rec in [result["round0"], *rounds.values()]:  # the per-item lists served the intervals
        rec["test"] = {k: v for k, v in rec["test"].items() if k not in ("correct", "escalated")}
    args.results_dir.mkdir(parents=True, exist_ok=True)
    plot(result, args.results_dir / f"flywheel-{dataset}.png")
    (args.results_dir / f"flywheel-{dataset}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
