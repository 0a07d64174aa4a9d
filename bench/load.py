"""Load test of a served cascade, overload included (loopback only, bounded, stops by itself).

    python bench/load.py --config runs/quickstart/cascade.toml --data runs/quickstart/data --seconds 20

Starts `cascade serve` in a subprocess on a free loopback port — with the large-model tier
moved into its own `cascade llm serve` process behind the openai backend (`--llm process`, the
default: its Python work does not share the front end's GIL) — and offers single-text requests
(real test texts, shuffled) in phases:

1. capacity: closed loop, `--clients` concurrent clients for `--seconds` (a floor), then
   open-loop rates ramped up from there by 1.3x, 5 s each, until full answers/s stop growing:
   capacity is the most full (not degraded) answers/s seen;
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

from cascade.cpu import cpu_report
from cascade.data import load_split

ROOT = Path(__file__).resolve().parents[1]
CHEAP_TIERS_EXCLUDE = ("llm",)  # tier kinds that are not "cheap"


def matmul_peaks() -> dict:
    try:
        from training.trainer import matmul_peaks as measure
    except ImportError:  # no torch in this environment
        return {}
    return measure()


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
    """results: (status, ms, tier, degraded) per answered request; `wall`: the sending window
    (open loop) or the run (closed loop), what the rates are per."""
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


class RawClient:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams: a pool of connections, one
    request at a time each. httpx spent more CPU per request than the server it measured (on
    the same two cores the client's own lag showed up as server latency); this costs a
    fraction of that, so the figures are the server's."""

    def __init__(self, url: str):
        host, port = url.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.reused_failures = 0  # idle connections the server had closed (keep-alive timeout)

    async def post_json(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.idle:  # a kept-alive connection the server may have closed meanwhile: retry fresh once
            try:
                return await self._send(self.idle.pop(), path, body)
            except (OSError, asyncio.IncompleteReadError):
                self.reused_failures += 1
        return await self._send(await asyncio.open_connection(self.host, self.port), path, body)

    async def _send(self, conn, path: str, body: bytes) -> tuple[int, bytes]:
        reader, writer = conn
        writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                     % (path.encode(), self.host.encode(), len(body)) + body)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        data = await reader.readexactly(length)
        if b"connection: close" in head.lower():
            writer.close()
        else:
            self.idle.append(conn)
        return status, data

    async def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


async def _post(client: RawClient, text: str, results: list) -> None:
    t0 = time.perf_counter()
    try:
        status, data = await client.post_json("/v1/classify", json.dumps({"text": text}).encode())
        body = json.loads(data)["results"][0] if status == 200 else {}
        results.append((status, 1000 * (time.perf_counter() - t0), body.get("tier"), body.get("degraded")))
    except (OSError, asyncio.IncompleteReadError, ValueError):
        results.append((-1, 1000 * (time.perf_counter() - t0), None, None))


async def closed_loop(url: str, texts: list[str], clients: int, seconds: float) -> dict:
    results: list = []
    sent = 0
    client = RawClient(url)
    stop = time.perf_counter() + seconds

    async def worker(k: int) -> None:
        nonlocal sent
        i = k
        while time.perf_counter() < stop:
            sent += 1
            await _post(client, texts[i % len(texts)], results)
            i += clients

    start = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(clients)))
    wall = time.perf_counter() - start
    await client.close()
    return summarize("capacity (closed loop)", results, sent, wall, None)


async def open_loop(url: str, texts: list[str], rate: float, seconds: float, seed: int, name: str) -> dict:
    rng = random.Random(seed)
    results: list = []
    sent = 0
    client = RawClient(url)
    tasks = []
    start = time.perf_counter()
    next_at = start
    behind = 0.0  # how late the client sent, at worst: if large, the client is the bottleneck
    while next_at - start < seconds:
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        behind = max(behind, time.perf_counter() - next_at)
        tasks.append(asyncio.create_task(_post(client, texts[sent % len(texts)], results)))
        sent += 1
        next_at += rng.expovariate(rate)
    window = time.perf_counter() - start
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
    drain = time.perf_counter() - start - window
    await client.close()
    row = summarize(name, results, sent, window, rate)
    row["drain_s"] = round(drain, 2)
    row["client_max_send_delay_ms"] = round(1000 * behind, 1)
    return row


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far (children not included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def prepare_config(config: Path, work: Path, llm: str, llm_threads: int, env: dict, student_threads: int | None,
                   cheap_queue_wait_s: float | None) -> tuple[Path, subprocess.Popen | None]:
    """A copy of `config` (paths made absolute; the student's threads and the cheap tiers'
    queue budget set when given); with llm = "process", its llm tier served by a `cascade llm
    serve` subprocess behind the openai backend."""
    data = tomllib.loads(config.read_text())
    server = None
    for tier in data["tiers"]:
        if tier.get("path"):
            p = Path(tier["path"])
            tier["path"] = str(p if p.is_absolute() else (config.parent / p).resolve())
        if tier["kind"] == "student" and student_threads is not None:
            tier.setdefault("options", {})["threads"] = student_threads
        if tier["kind"] != "llm" and cheap_queue_wait_s is not None:
            tier["max_queue_wait_s"] = cheap_queue_wait_s
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
    ap.add_argument("--config", default=str(ROOT / "runs" / "quickstart" / "cascade.toml"),
                    help="a cascade.toml to serve (its [serving] table is used as it is)")
    ap.add_argument("--data", default=str(ROOT / "runs" / "quickstart" / "data"), help="dataset dir: test texts")
    ap.add_argument("--seconds", type=float, default=10.0, help="per phase")
    ap.add_argument("--clients", type=int, default=16,
                    help="closed-loop clients for the capacity phase (few enough that the large model's queue "
                         "stays under max_queue_wait_s: capacity is what is served at full quality)")
    ap.add_argument("--overload", default="1.5,2", help="open-loop rates as multiples of the measured capacity")
    ap.add_argument("--llm", default="process", choices=["process", "inline"])
    ap.add_argument("--llm-threads", type=int, default=1,
                    help="torch threads of the large-model process (the rest of the 2 cores serve the front end)")
    ap.add_argument("--student-threads", type=int, default=1,
                    help="onnxruntime threads of the student tier (the other core runs the large model); "
                         "-1 keeps the config's")
    ap.add_argument("--cheap-queue-wait-s", type=float, default=0.05,
                    help="max_queue_wait_s of every tier but the large model's (a cheap tier queueing for a "
                         "second is already a failure of its latency); -1 keeps the config's")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "load.json"))
    args = ap.parse_args()
    work = ROOT / "runs" / "load"
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    report = {"cpu": cpu_report(), **matmul_peaks(), "source_config": args.config, "llm": args.llm,
              "llm_threads": args.llm_threads, "seconds_per_phase": args.seconds,
              "client": "bench.load.RawClient (asyncio streams, keep-alive) in one process on the same cores "
                        "as the servers"}
    config, llm_server = prepare_config(Path(args.config), work, args.llm, args.llm_threads, env,
                                        None if args.student_threads < 0 else args.student_threads,
                                        None if args.cheap_queue_wait_s < 0 else args.cheap_queue_wait_s)
    served = tomllib.loads(config.read_text())
    report["serving"] = served.get("serving", {})
    report["tiers"] = [{k: v for k, v in t.items() if k not in ("label_thresholds", "path")} for t in served["tiers"]]
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
        procs = {"front_end": server.pid, "bench_client": os.getpid()}
        if llm_server is not None:
            procs["llm_server"] = llm_server.pid

        def measured(run):
            before = {k: cpu_seconds(p) for k, p in procs.items()}
            row = asyncio.run(run)
            row["cpu_s"] = {k: round(cpu_seconds(p) - before[k], 2) for k, p in procs.items()}

            print(json.dumps(row), flush=True)
            phases.append(row)
            return row

        # Capacity: the most full-quality answers/s while (almost) nothing is shed. A closed loop
        # gives a floor (its clients wait on the large model); open-loop rates are ramped from
        # there by 1.3x, 5 s each, until more than 1% of requests are degraded or refused.
        capacity = rate = measured(closed_loop(url, texts, args.clients, args.seconds))["goodput_per_s"]
        for step in range(8):
            time.sleep(2.0)
            rate *= 1.3
            row = measured(open_loop(url, texts, rate, 5.0, 100 + step, f"ramp {rate:.0f}/s"))
            if (row["degraded"] + row["rejected_429"] + row["errors"]) > 0.01 * row["sent"]:
                break
            capacity = row["goodput_per_s"]
        report["capacity_per_s"] = capacity
        runs = [("unloaded (0.2x)", 0.2)] + [(f"overload ({m}x)", float(m)) for m in args.overload.split(",")]
        for i, (name, mult) in enumerate(runs):
            time.sleep(2.0)  # let the queues drain between phases
            measured(open_loop(url, texts, mult * capacity, args.seconds, i, name))["offered_x_capacity"] = mult
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
    unloaded = next(row for row in phases if row["phase"].startswith("unloaded"))
    cheap = [t for t in unloaded["tiers"] if t not in CHEAP_TIERS_EXCLUDE]
    checks = {}
    for row in [row for row in phases if row["phase"].startswith("overload")]:
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
