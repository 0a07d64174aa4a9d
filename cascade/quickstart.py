"""`cascade quickstart`: the main job, end to end, with what exists so far.

Prepares CLINC150 into a dataset dir, mines a rule pack from it, writes a cascade config
(rules tier, then the majority-label stand-in for the model tiers that later stages add),
and evaluates it on the test split against the last tier alone.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from cascade.data import load_labels, load_split, prepare
from cascade.evaluate import format_report, run_eval
from cascade.rulecheck import check_pack
from cascade.rulemine import MineConfig, mine_pack, oos_weight_for, write_pack
from cascade.rulepack import load_pack

CONFIG_TEMPLATE = """\
# Written by `cascade quickstart`. Paths are relative to this file.
[task]
name = "clinc150"
description = "CLINC150 intents (150 + out-of-scope)"

[[tiers]]
name = "rules"
kind = "rules"
path = "rules.toml"
threshold = 0.0
options = {{ timeout_ms = 20 }}

# Stand-in last tier until the model tiers exist: "when unsure, say out of scope".
[[tiers]]
name = "fallback"
kind = "majority"
path = "{data}"
options = {{ label = "oos" }}
"""


def _step(n: int, total: int, what: str) -> float:
    print(f"[{n}/{total}] {what}", flush=True)
    return time.perf_counter()


def run_quickstart(source: str | Path, workdir: str | Path) -> dict:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = workdir / "data"
    total = 4

    t = _step(1, total, f"prepare CLINC150 from {source} -> {data_dir}")
    rep = prepare("clinc150", source, data_dir)
    print(f"      {rep.counts} in {time.perf_counter() - t:.1f}s")

    t = _step(2, total, "mine a rule pack from train, validated on val")
    train = load_split(data_dir, "train")
    labels = load_labels(data_dir)
    cfg = MineConfig(min_val_support=4, oos_label=labels.oos_label,
                     oos_weight=oos_weight_for(train, labels.oos_label, 0.2))
    pack_data, _ = mine_pack(train, load_split(data_dir, "val"), "clinc150", cfg)
    write_pack(pack_data, workdir / "rules.toml")
    check = check_pack(load_pack(workdir / "rules.toml"), load_split(data_dir, "test"))
    print(f"      {len(pack_data['rule'])} rules; on test: coverage {check['coverage']:.3f}, "
          f"precision {check['precision']:.4f} ({time.perf_counter() - t:.1f}s)")

    _step(3, total, "write the cascade config")
    config_path = workdir / "cascade.toml"
    config_path.write_text(CONFIG_TEMPLATE.format(data="data"), encoding="utf-8")

    _step(4, total, "evaluate the cascade on test, against its last tier alone")
    report = run_eval(config_path, data_dir, "test", baseline=True)
    report["rules_check"] = {k: check[k] for k in ("coverage", "precision", "answered", "n")}
    report_path = workdir / "eval.json"
    report_path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(format_report(report))
    print(f"\nreport: {report_path}\nconfig: {config_path}\n"
          f"re-run: cascade eval --config {config_path} --data {data_dir} --baseline")
    return report
