"""A flywheel round's calibration and gate, with and without remembered large-model answers.

    python bench/flywheel_gate.py --new runs/flywheel-clinc150/random/versions/v002/cascade.toml \
        --current runs/flywheel-clinc150/random/versions/v001/cascade.toml --data runs/flywheel-clinc150/data

What steps 7 and 8 of `run_flywheel` spend on val, timed both ways in one run, alternating:
`run_calibration` of the new version (not written back: `write=False`) and the gate's two
`measure`s, outside `serving.llm_tier.remembered_answers` (every measurement asks the large
model again, as before) and inside it (asked once). Checks that both give the same chosen
thresholds and the same val figures. Writes bench/results/flywheel_gate-<name>.json with the
CPU's flags (cascade.cpu.cpu_report).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def one_pass(new: Path, current: Path, data: Path, remembered: bool) -> dict:
    from cascade.calibrate import run_calibration
    from serving.llm_tier import remembered_answers
    from training.flywheel import measure

    t0 = time.perf_counter()
    with remembered_answers() if remembered else contextlib.nullcontext():
        cal = run_calibration(new, data, "llm", max_loss=0.005, confidence=0.9, write=False)
        t1 = time.perf_counter()
        new_m, cur_m = measure(new, data), measure(current, data)
    t2 = time.perf_counter()
    return {"remembered": remembered, "calibrate_s": round(t1 - t0, 1), "gate_s": round(t2 - t1, 1),
            "total_s": round(t2 - t0, 1), "chosen": cal["chosen"]["thresholds"], "new": new_m, "current": cur_m}


def main(argv: list[str] | None = None) -> int:
    from cascade.cpu import cpu_report

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--new", type=Path, required=True, help="the round's new version's cascade.toml")
    p.add_argument("--current", type=Path, required=True, help="the current version's cascade.toml")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--repeats", type=int, default=1, help="passes each way, alternating")
    p.add_argument("--name", default=None, help="the results' name (default: the data dir's parent)")
    p.add_argument("--results-dir", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    passes = [one_pass(args.new, args.current, args.data, remembered) for _ in range(args.repeats)
              for remembered in (False, True)]
    before, after = ([x for x in passes if x["remembered"] is r] for r in (False, True))
    same = all(a["chosen"] == b["chosen"] and a["new"] == b["new"] and a["current"] == b["current"]
               for a, b in zip(before, after))
    best = {k: min(x["total_s"] for x in v) for k, v in (("asked_each_time", before), ("remembered", after))}
    result = {"cpu": cpu_report(), "command": "python bench/flywheel_gate.py " + " ".join(argv or sys.argv[1:]),
              "passes": passes, "same_answers": same, "best_total_s": best,
              "speedup": best["asked_each_time"] / best["remembered"]}
    name = args.name or args.data.resolve().parent.name
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / f"flywheel_gate-{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "passes"}, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
