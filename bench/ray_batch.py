"""`cascade batch` locally and on Ray Data with 1 and 2 workers, on one machine, in one run.

    python bench/ray_batch.py [--config runs/quickstart/cascade.toml --data runs/quickstart/data]

Routes the test split (repeated `--repeat` times) of a finished quickstart through the local
command and through `--ray` with 1 and 2 cascade actors on a local cluster of this machine's
cores, and writes bench/results/ray_batch.json: rows/s of each, their ratio to the local run
(measured in the same run, on the same CPU), the large model's share, and the CPU class and
flags. On 2 cores, the actors, the large-model actor and the driver share them: the figure says
what the engine costs here, not what a cluster gains.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "runs" / "quickstart" / "cascade.toml"))
    ap.add_argument("--data", default=str(ROOT / "runs" / "quickstart" / "data"))
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ray_batch.json"))
    args = ap.parse_args()
    if not Path(args.config).exists():
        print(f"{args.config}: not found; run `cascade quickstart` first (or pass --config/--data)", file=sys.stderr)
        return 2
    import ray

    from cascade.cpu import cpu_report
    from serving.batch_job import run_batch
    from serving.batch_ray import run_batch_ray

    lines = (Path(args.data) / "test.jsonl").read_text().splitlines() * args.repeat
    work = Path(tempfile.mkdtemp(prefix="ray-batch-"))
    path = work / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    results = {}
    t0 = time.perf_counter()
    local = run_batch(path, args.config, work / "local.jsonl", progress=False)
    results["local"] = {"rows": local["rows"], "seconds": time.perf_counter() - t0,
                        "rows_per_s": local["rows"] / (time.perf_counter() - t0), "shares": local["shares"]}
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
    for workers in (1, 2):
        t0 = time.perf_counter()
        s = run_batch_ray(path, args.config, work / f"ray{workers}", workers=workers, shard_rows=200,
                          progress=False)
        seconds = time.perf_counter() - t0  # cluster start excluded, actor start-up included
        results[f"ray_{workers}"] = {"rows": s["rows"], "seconds": seconds, "rows_per_s": s["rows"] / seconds,
                                     "shares": s["shares"], "own_actors": s["own_actors"]}
    ray.shutdown()
    base = results["local"]["rows_per_s"]
    for r in results.values():
        r["vs_local"] = r["rows_per_s"] / base
    report = {"command": "python bench/ray_batch.py", "config": args.config, "rows": len(lines), "cpu": cpu_report(),
              "results": results}
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
