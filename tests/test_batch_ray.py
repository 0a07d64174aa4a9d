"""`cascade batch --ray` on a real local Ray cluster (loopback, 2 CPUs): every valid row exactly
once, the same answers as the local `cascade batch`, malformed rows in the errors output, and a
resume after the driver is killed mid-run."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from serving.batch_job import run_batch  # noqa: E402
from serving.batch_ray import run_batch_ray  # noqa: E402
from tests.conftest import rules_cascade_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ANSWER_KEYS = ("id", "line", "label", "confidence", "tier", "degraded", "gold")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _node_ip_address="127.0.0.1")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def config(tmp_path: Path, clinc_dir: Path) -> Path:
    """Rules then a fallback. The rules' matching budget is wall-clock (an abstention past it):
    with actors and drivers sharing two cores, 20 ms ran out on some texts, so an answer would
    depend on the load. The budget is for catastrophic patterns; here it is generous."""
    cfg = rules_cascade_config(tmp_path, clinc_dir)
    budget = "threshold = 0.5\noptions = { timeout_ms = 5000 }\n"
    cfg.write_text(cfg.read_text().replace("threshold = 0.5\n", budget, 1))
    return cfg


def input_file(tmp_path: Path, clinc_dir: Path, n: int = 600) -> Path:
    rows = [json.loads(line) for line in (clinc_dir / "test.jsonl").read_text().splitlines()[:n]]
    lines = [json.dumps({"id": r["id"], "text": r["text"], "label": r["label"]}) for r in rows]
    lines[10] = "{not json"
    lines[20] = json.dumps({"id": "x", "label": "a"})  # no text
    lines[30] = json.dumps({"text": "\ud800 lone"})  # json.dumps escapes it: invalid Unicode once read
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def ray_rows(out_dir: Path) -> list[dict]:
    return [json.loads(x) for p in sorted(out_dir.glob("part-*[0-9].jsonl")) for x in p.read_text().splitlines()]


def ray_errors(out_dir: Path) -> list[dict]:
    return [json.loads(x) for p in sorted(out_dir.glob("part-*.errors.jsonl")) for x in p.read_text().splitlines()]


def answers(rows: list[dict]) -> list[tuple]:
    return [tuple(r.get(k) for k in ANSWER_KEYS) for r in rows]


def test_ray_batch_matches_the_local_batch_row_for_row(tmp_path, clinc_dir, cluster):
    cfg = config(tmp_path, clinc_dir)
    path = input_file(tmp_path, clinc_dir)
    run_batch(path, cfg, tmp_path / "local.jsonl", progress=False)
    summary = run_batch_ray(path, cfg, tmp_path / "ray", address=cluster, workers=2, shard_rows=100, batch_size=64,
                            progress=False)
    rows = ray_rows(tmp_path / "ray")
    local_rows = [json.loads(x) for x in (tmp_path / "local.jsonl").read_text().splitlines()]
    assert answers(rows) == answers(local_rows)  # same answers, same order, each valid row once
    assert len(rows) == 597 and len({r["line"] for r in rows}) == 597
    assert [e["line"] for e in ray_errors(tmp_path / "ray")] == [11, 21, 31]
    assert summary["shards"] == 6 and summary["rows"] == 597 and summary["malformed"] == 3
    assert abs(sum(summary["shares"].values()) - 1) < 1e-9 and set(summary["shares"]) <= {"rules", "fallback"}


def test_parquet_input(tmp_path, clinc_dir, cluster):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (clinc_dir / "val.jsonl").read_text().splitlines()[:120]]
    pq.write_table(pa.Table.from_pylist([{"text": r["text"], "label": r["label"]} for r in rows] + [{"label": "a"}]),
                   tmp_path / "in.parquet")
    s = run_batch_ray(tmp_path / "in.parquet", config(tmp_path, clinc_dir), tmp_path / "out",
                      address=cluster, workers=1, shard_rows=50, progress=False)
    out = ray_rows(tmp_path / "out")
    assert [r["line"] for r in out] == list(range(1, 121)) and s["malformed"] == 1
    assert ray_errors(tmp_path / "out")[0]["line"] == 121


def test_resume_after_killing_the_driver_loses_and_duplicates_nothing(tmp_path, clinc_dir, cluster):
    cfg = config(tmp_path, clinc_dir)
    path = input_file(tmp_path, clinc_dir, n=3000)
    out = tmp_path / "ray"
    # the driver is slowed to one small batch at a time so it can be killed with shards still open
    cmd = [sys.executable, "-m", "cascade", "batch", str(path), "--config", str(cfg), "--out", str(out),
           "--ray", cluster, "--workers", "1", "--shard-rows", "100", "--batch-size", "8", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(list(out.glob("part-*[0-9].jsonl"))) < 3:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    done_before = len(list(out.glob("part-*[0-9].jsonl")))
    assert done_before < 30, "the run finished before it could be killed"
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "--resume" in again.stderr  # an existing run is not overwritten
    resumed = subprocess.run(cmd + ["--resume"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    rows = ray_rows(out)
    local = run_batch(path, cfg, tmp_path / "local.jsonl", progress=False)
    local_rows = [json.loads(x) for x in (tmp_path / "local.jsonl").read_text().splitlines()]
    assert answers(rows) == answers(local_rows) and local["rows"] == len(rows) == 2997
    assert [e["line"] for e in ray_errors(out)] == [11, 21, 31]
    assert json.loads((out / "manifest.json").read_text())["done"] == list(range(30))
    other = subprocess.run([*cmd[:-5], "--shard-rows", "50", "--resume"], cwd=REPO, capture_output=True, text=True,
                           timeout=120)
    assert other.returncode == 2 and "shard_rows" in other.stderr  # a resume must keep the shard size


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tests.test_llm_serving import model_dir as make

    return make.__wrapped__(tmp_path_factory)


def test_the_large_model_runs_in_its_own_actor(tmp_path, model_dir, cluster):
    cfg = tmp_path / "cascade.toml"
    cfg.write_text(f'[task]\nname = "t"\n\n[[tiers]]\nname = "llm"\nkind = "llm"\npath = "{model_dir}"\n'
                   'options = { backend = "builtin", dtype = "fp32", num_blocks = 64, block_size = 4 }\n')
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(str(i + j) for j in range(1 + i % 4))}) + "\n"
                            for i in range(40)))
    run_batch(path, cfg, tmp_path / "local.jsonl", progress=False)
    summary = run_batch_ray(path, cfg, tmp_path / "ray", address=cluster, workers=2, shard_rows=10, batch_size=8,
                            progress=False)
    local = [json.loads(x) for x in (tmp_path / "local.jsonl").read_text().splitlines()]
    rows = ray_rows(tmp_path / "ray")
    assert [(r["line"], r["label"], r["tier"]) for r in rows] == [(r["line"], r["label"], r["tier"]) for r in local]
    assert all(abs(a["confidence"] - b["confidence"]) < 1e-4 for a, b in zip(rows, local))
    assert summary["own_actors"] == ["llm"]  # one engine for the pool, in its own actor
