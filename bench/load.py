"""Load test of a served cascade, overload included (loopback only, bounded, stops by itself).

    python bench/load.py --config runs/quickstart/cascade.toml --data runs/quickstart/data
    python bench/load.py                      # the CLINC150 cascade of bench/e2e.py's runs

Starts `cascade serve` in a subprocess on a free loopback port — with the large-model tier
moved into its own `cascade llm serve` process behind the openai backend (`--llm process`, the
default: its Python work does not share the front end's GIL) — and offers single-text requests
(real test texts, shuffled) in phases:

1. capacity: closed loop, `--clients` concurrent clients for `--seconds`: full answers/s;
2. unloaded: open loop (Poisson arrivals) at 20% of capacity: the p99 to compare against;
3. overload: open loop at 1.5x and 2x capacity.

Per phase: goodput (200s that are not degraded, per second), answered/s, p50/p99 of answered
requests overall and per answering tier, the 429 share and time-to-429 (client-measured),
degraded, other errors and lost requests (sent, never answered: must be 0). Targets (issue 13):
at 2x, goodput >= 90% of capacity, the cheap tiers' p99 within 3x the unloaded p99, median
time-to-429 under 50 ms. The client runs on the same 2 cores as the servers (noted in the JSON),
so every figure includes its share of the CPU. Writes bench/results/load.json with the CPU
flags and the matmul peak measured in the same run.
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
import tomllib
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import tomli_w

from cascade.data import load_split

ROOT = Path(__file__).resolve().parents[1]
CHEAP_TIERS_EXCLUDE = ("llm",)  # tier kinds that are not "cheap"


def cpu_info() -> dict:
    text = Path("/proc/cpuinfo").read_text()
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    keep = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni", "fma")
    return {"model": model, "flags": sorted(f for f in keep if f in flags), "cores": os.cpu_count(),
            "class": "AVX512-BF16" if "avx512_bf16" in flags else ("AVX2-only" if "avx2" in flags else "other")}


def matmul_peaks() -> dict:
    try:
        from training.trainer import matmul_peak
    except ImportError:  # no torch in this environment
        return {}
    return {"matmul_flops_fp32": matmul_peak("fp32", size=1024, repeats=5),
            "matmul_flops_bf16": matmul_peak("bf16", size=1024, repeats=5)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, seconds: float = 300) -> None:
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
    return round(float(np.percentile(xs, q)), 2) if xs else None


def summarize(name: str, results: list[tuple], sent: int, wall: float, offered: float | None) -> dict:
    """results: (status, ms, tier, degraded) per answered request."""
    ok = [(ms, tier, deg) for code, ms, tier, deg in results if code == 200]
    full = [(ms, tier) for ms, tier, deg in ok if not deg]
    refused = [ms for code, ms, _, _ in results if code == 429]
    by_tier: dict[str, list[float]] = {}
    for ms, tier in full:
        by_tier.setdefault(tier, []).append(ms)
    return {
        "phase": name, "offered_per_s": offered, "seconds": round(wall, 2), "sent": sent,
        "goodput_per_s": round(len(full) / wall, 1), "answered_per_s": round(len(ok) / wall, 1),
        "ok": len(ok), "degraded": len(ok) - len(full), "rejected_429": len(refused),
        "share_429": round(len(refused) / sent, 4) if sent else 0.0,
        "time_to_429_p50_ms": pct(refused, 50), "time_to_429_p99_ms": pct(refused, 99),
        "errors": sum(1 for c, _, _, _ in results if c not in (200, 429)),
        "error_codes": {str(c): n for c, n in Counter(c for c, _, _, _ in results if c not in (200, 429)).items()},
        "lost": sent - len(results),
        "p50_ms": pct([m for m, _, _ in ok], 50), "p99_ms": pct([m for m, _, _ in ok], 99),
        "tiers": {t: {"share": round(len(v) / max(1, len(full)), 4), "p50_ms": pct(v, 50), "p99_ms": pct(v, 99)}
                  for t, v in sorted(by_tier.items())},
    }


async def _post(client: httpx.AsyncClient, url: str, text: str, results: list) -> None:
    t0 = time.perf_counter()
    try:
        r = await client.post(url + "/v1/classify", json={"text": text})
        body = r.json() if r.status_code == 200 else {}
        results.append((r.status_code, 1000 * (time.perf_counter() - t0), body.get("tier"), body.get("degraded")))
    except httpx.HTTPError:
        results.append((-1, 1000 * (time.perf_counter() - t0), None, None))


def _client() -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=1024)
    return httpx.AsyncClient(timeout=60.0, limits=limits)


async def closed_loop(url: str, texts: list[str], clients: int, seconds: float) -> dict:
    results: list = []
    sent = 0
    async with _client() as client:
        stop = time.perf_counter() + seconds

        async def worker(k: int) -> None:
            nonlocal sent
            i = k
            while time.perf_counter() < stop:
                sent += 1
                await _post(client, url, texts[i % len(texts)], results)
                i += clients

        start = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(clients)))
        wall = time.perf_counter() - start
    return summarize("capacity (closed loop)", results, sent, wall, None)


async def open_loop(url: str, texts: list[str], rate: float, seconds: float, seed: int, name: str) -> dict:
    rng = random.Random(seed)
    results: list = []
    sent = 0
    async with _client() as client:
        tasks = []
        start = time.perf_counter()
        next_at = start
        while next_at - start < seconds:
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            tasks.append(asyncio.create_task(_post(client, url, texts[sent % len(texts)], results)))
            sent += 1
            next_at += rng.expovariate(rate)
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
        wall = time.perf_counter() - start
    return summarize(name, results, sent, wall, rate)


def prepare_config(config: Path, work: Path, llm: str, llm_threads: int, env: dict) -> tuple[Path, subprocess.Popen | None]:
    """A copy of `config` (paths made absolute); with llm = "process", its llm tier served by a
    `cascade llm serve` subprocess behind the openai backend."""
    data = tomllib.loads(config.read_text())
    server = None
    for tier in data["tiers"]:
        if tier.get("path"):
            p = Path(tier["path"])
            tier["path"] = str(p if p.is_absolute() else (config.parent / p).resolve())
        if tier["kind"] == "llm" and llm == "process":
            port = free_port()
            server = subprocess.Popen([sys.executable, "-m", "cascade", "llm", "serve", "--model", tier["path"],
                                       "--name", "large", "--port", str(port), "--kv-memory-gb", "0.5",
                                       "--threads", str(llm_threads), "--max-prompts", "256"], env=env)
            wait_ready(f"http://127.0.0.1:{port}/healthz", server)
            keep = {k: v for k, v in tier.get("options", {}).items()
                    if k in ("labels", "template", "choice_prefix", "max_text_chars")}
            tier["options"] = {**keep, "backend": "openai", "url": f"http://127.0.0.1:{port}/v1", "model": "large",
                               "timeout_s": 30.0, "retries": 1}
    out = work / "cascade.toml"
    out.write_text(tomli_w.dumps(data))
    return out, server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "runs" / "load" / "clinc150.toml"),
                    help="a cascade.toml to serve (its [serving] table is used as it is)")
    ap.add_argument("--data", default=str(ROOT / "runs" / "data" / "clinc150"), help="dataset dir: test texts")
    ap.add_argument("--seconds", type=float, default=10.0, help="per phase")
    ap.add_argument("--clients", type=int, default=64, help="closed-loop clients for the capacity phase")
    ap.add_argument("--overload", default="1.5,2", help="open-loop rates as multiples of the measured capacity")
    ap.add_argument("--llm", default="process", choices=["process", "inline"])
    ap.add_argument("--llm-threads", type=int, default=1,
                    help="torch threads of the large-model process (the rest of the 2 cores serve the front end)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "load.json"))
    args = ap.parse_args()
    work = ROOT / "runs" / "load"
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    report = {"cpu": cpu_info(), **matmul_peaks(), "source_config": args.config, "llm": args.llm,
              "llm_threads": args.llm_threads, "seconds_per_phase": args.seconds,
              "client": "httpx.AsyncClient in one process on the same cores as the servers"}
    config, llm_server = prepare_config(Path(args.config), work, args.llm, args.llm_threads, env)
    report["serving"] = tomllib.loads(config.read_text()).get("serving", {})
    texts = [ex.text for ex in load_split(args.data, "test")]
    random.Random(0).shuffle(texts)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "cascade", "serve", "--config", str(config), "--port", str(port)],
                              env=env)
    url = f"http://127.0.0.1:{port}"
    phases = []
    try:
        wait_ready(url + "/readyz", server)
        asyncio.run(open_loop(url, texts[:200], 20, 3.0, 99, "warm-up"))  # sessions, first batches, rates
        cap = asyncio.run(closed_loop(url, texts, args.clients, args.seconds))
        print(json.dumps(cap), flush=True)
        phases.append(cap)
        capacity = cap["goodput_per_s"]
        runs = [("unloaded (0.2x)", 0.2)] + [(f"overload ({m}x)", float(m)) for m in args.overload.split(",")]
        for i, (name, mult) in enumerate(runs):
            time.sleep(2.0)  # let the queues drain between phases
            row = asyncio.run(open_loop(url, texts, mult * capacity, args.seconds, i, name))
            row["offered_x_capacity"] = mult
            print(json.dumps(row), flush=True)
            phases.append(row)
        report["metrics_tail"] = [line for line in httpx.get(url + "/metrics").text.splitlines()
                                  if line.startswith(("cascade_answers_total", "cascade_rejected_total",
                                                      "cascade_degraded_total", "cascade_tier_errors_total",
                                                      "cascade_shed_total", "cascade_deadline_exceeded_total"))]
    finally:
        for proc in (server, llm_server):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=60)
    report["phases"] = phases
    report["capacity_per_s"] = phases[0]["goodput_per_s"]
    unloaded = phases[1]
    cheap = [t for t in unloaded["tiers"] if t not in CHEAP_TIERS_EXCLUDE]
    checks = {}
    for row in phases[2:]:
        checks[row["phase"]] = {
            "goodput_x_capacity": round(row["goodput_per_s"] / report["capacity_per_s"], 3),
            "cheap_p99_x_unloaded": {t: round(row["tiers"][t]["p99_ms"] / unloaded["tiers"][t]["p99_ms"], 2)
                                     for t in cheap if t in row["tiers"] and unloaded["tiers"][t]["p99_ms"]},
            "time_to_429_p50_ms": row["time_to_429_p50_ms"], "lost": row["lost"],
        }
    report["checks"] = checks
    report["targets"] = {"goodput_x_capacity_at_2x": ">= 0.9", "cheap_p99_x_unloaded": "<= 3",
                         "time_to_429_p50_ms": "< 50", "lost": "0"}
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(checks, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
