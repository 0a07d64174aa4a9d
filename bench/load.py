"""Load test of the served CLINC150 cascade (loopback only, bounded, stops by itself).

    python bench/load.py [--rates 50,100,200,400] [--seconds 10]

Starts `cascade serve` in a subprocess on a free loopback port with rules -> student (ONNX
int8) -> large model (by default in its own `cascade llm serve` process behind the openai
backend, so its Python work does not share the front end's GIL; `--llm inline` runs it in-process), then offers single-text requests open-loop at each
rate (Poisson arrivals, real CLINC150 test texts) for a fixed time, and reports per rate:
p50/p99 latency overall and per answering tier, throughput, 429s, errors and lost requests
(sent, never answered). Needs runs/large-clinc150 and runs/student-clinc150-e6 (the
bench/large_clinc150.py and bench/students_clinc150.py outputs). Writes bench/results/load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

from cascade.data import load_split

ROOT = Path(__file__).resolve().parents[1]


def write_config(path: Path, student: Path, large: Path, thresholds: tuple[float, float], llm_options: str) -> None:
    path.write_text(f'''[task]
name = "clinc150"

[[tiers]]
name = "rules"
kind = "rules"
path = "{ROOT / 'rules' / 'clinc150.toml'}"
threshold = {thresholds[0]}

[[tiers]]
name = "student"
kind = "student"
path = "{student}"
threshold = {thresholds[1]}
options = {{ threads = 1 }}

[[tiers]]
name = "llm"
kind = "llm"
path = "{large}"
options = {llm_options}

[serving]
max_queue = 256
micro_batch_ms = 1.0
micro_batch_size = 16
tier_timeout_s = 10.0
''')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{url}: the server did not become ready")
        time.sleep(0.5)


def pct(xs, q):
    return float(np.percentile(xs, q)) if xs else None


async def offer(url: str, texts: list[str], rate: float, seconds: float, seed: int) -> dict:
    rng = random.Random(seed)
    results: list[tuple[int, float, str | None]] = []
    sent = 0
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    async with httpx.AsyncClient(timeout=30.0, limits=limits) as client:
        async def one(text: str) -> None:
            t0 = time.perf_counter()
            try:
                r = await client.post(url + "/v1/classify", json={"text": text})
                tier = r.json().get("tier") if r.status_code == 200 else None
                results.append((r.status_code, 1000 * (time.perf_counter() - t0), tier))
            except httpx.HTTPError:
                results.append((-1, 1000 * (time.perf_counter() - t0), None))

        tasks = []
        start = time.perf_counter()
        next_at = start
        while next_at - start < seconds:
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            tasks.append(asyncio.create_task(one(texts[sent % len(texts)])))
            sent += 1
            next_at += rng.expovariate(rate)
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
        wall = time.perf_counter() - start
    ok = [(ms, tier) for code, ms, tier in results if code == 200]
    by_tier: dict[str, list[float]] = {}
    for ms, tier in ok:
        by_tier.setdefault(tier, []).append(ms)
    return {
        "rate": rate, "sent": sent, "ok": len(ok),
        "rejected_429": sum(1 for c, _, _ in results if c == 429),
        "errors": sum(1 for c, _, _ in results if c not in (200, 429)),
        "error_codes": {str(c): n for c, n in Counter(c for c, _, _ in results if c not in (200, 429)).items()},
        "lost": sent - len(results),
        "throughput_per_s": len(ok) / wall,
        "p50_ms": pct([m for m, _ in ok], 50), "p99_ms": pct([m for m, _ in ok], 99),
        "tiers": {t: {"share": len(v) / max(1, len(ok)), "p50_ms": pct(v, 50), "p99_ms": pct(v, 99)}
                  for t, v in sorted(by_tier.items())},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rates", default="50,100,200,400")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--student", default=str(ROOT / "runs" / "student-clinc150-e6"))
    ap.add_argument("--large", default=str(ROOT / "runs" / "large-clinc150"))
    ap.add_argument("--thresholds", default="0.0,0.9", help="rules,student (from cascade calibrate)")
    ap.add_argument("--llm", default="process", choices=["process", "inline"],
                    help="process: the large model in its own `cascade llm serve` process behind the openai "
                         "backend (no GIL shared with the front end); inline: the builtin backend in-process")
    ap.add_argument("--llm-threads", type=int, default=1,
                    help="torch threads of the large-model process (the rest of the 2 cores serve the front end)")
    args = ap.parse_args()
    work = ROOT / "runs" / "load"
    work.mkdir(parents=True, exist_ok=True)
    config = work / "cascade.toml"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    llm_server = None
    if args.llm == "process":
        llm_port = free_port()
        llm_server = subprocess.Popen([sys.executable, "-m", "cascade", "llm", "serve", "--model", args.large,
                                       "--name", "large", "--port", str(llm_port), "--kv-memory-gb", "0.5",
                                       "--threads", str(args.llm_threads)], env=env)
        wait_ready(f"http://127.0.0.1:{llm_port}/v1/models", llm_server)
        llm_options = f'{{ backend = "openai", url = "http://127.0.0.1:{llm_port}/v1", model = "large", timeout_s = 30 }}'
    else:
        llm_options = '{ backend = "builtin", memory_gb = 0.5, threads = 1 }'
    write_config(config, Path(args.student), Path(args.large), tuple(float(x) for x in args.thresholds.split(",")),
                 llm_options)
    texts = [ex.text for ex in load_split(ROOT / "runs" / "data" / "clinc150", "test")]
    random.Random(0).shuffle(texts)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "cascade", "serve", "--config", str(config), "--port", str(port)],
                              env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url + "/readyz", server)
        asyncio.run(offer(url, texts[:200], 20, 3.0, seed=99))  # warm-up: sessions, first batches
        report = {"config": str(config), "thresholds": args.thresholds, "llm_threads": args.llm_threads, "seconds_per_rate": args.seconds, "rates": []}
        for i, rate in enumerate(float(r) for r in args.rates.split(",")):
            row = asyncio.run(offer(url, texts, rate, args.seconds, seed=i))
            print(json.dumps(row), flush=True)
            report["rates"].append(row)
        report["metrics_tail"] = [line for line in httpx.get(url + "/metrics").text.splitlines()
                                  if line.startswith(("cascade_answers_total", "cascade_rejected_total",
                                                      "cascade_degraded_total", "cascade_tier_errors_total"))]
    finally:
        for proc in (server, llm_server):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=60)
    report["llm"] = args.llm
    out = ROOT / "bench" / "results" / "load.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
