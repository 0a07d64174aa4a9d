"""`cascade batch`: order, malformed rows with line numbers, CSV, and resume after a kill."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cascade.app.cli import main
from cascade.data import load_split
from tests.conftest import rules_cascade_config

REPO = Path(__file__).resolve().parents[1]


def config_for(tmp_path, data_dir) -> Path:
    return rules_cascade_config(tmp_path, data_dir)


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_batch_keeps_order_and_reports_malformed_rows(tmp_path, clinc_dir, capsys):
    val = load_split(clinc_dir, "val")[:40]
    lines = [json.dumps({"id": ex.id, "text": ex.text, "label": ex.label}) for ex in val]
    lines.insert(5, "{not json")
    lines.insert(12, json.dumps({"id": "x", "text": "   "}))
    lines.insert(20, json.dumps(["a", "list"]))
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["batch", str(src), "--config", str(config_for(tmp_path, clinc_dir)), "--out", str(out),
                 "--batch-size", "7", "--no-progress"]) == 0
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == [ex.id for ex in val]  # input order, nothing dropped
    errors = read_jsonl(tmp_path / "out.errors.jsonl")
    assert [e["line"] for e in errors] == [6, 13, 21]
    assert "not JSON" in errors[0]["error"] and "'text'" in errors[1]["error"] and "list" in errors[2]["error"]
    printed = capsys.readouterr().out
    assert "3 malformed rows" in printed and "accuracy on the 40 labelled rows" in printed
    # a second run without --resume refuses to overwrite
    assert main(["batch", str(src), "--config", str(tmp_path / "cascade.toml"), "--out", str(out),
                 "--no-progress"]) == 2


def test_batch_reads_csv(tmp_path, clinc_dir):
    src = tmp_path / "in.csv"
    src.write_text('id,text\n1,are you a real person\n2,"book me, please, a table"\n3,\n')
    out = tmp_path / "o.jsonl"
    assert main(["batch", str(src), "--config", str(config_for(tmp_path, clinc_dir)), "--out", str(out),
                 "--no-progress"]) == 0
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == ["1", "2"] and rows[0]["tier"] == "rules"
    assert read_jsonl(tmp_path / "o.errors.jsonl")[0]["line"] == 4


@pytest.mark.slow
def test_resume_after_kill_loses_and_duplicates_nothing(tmp_path, clinc_dir):
    texts = [ex.text for ex in load_split(clinc_dir, "train")]
    src = tmp_path / "big.jsonl"
    n = 60000
    with src.open("w") as f:
        for i in range(n):
            if i % 997 == 500:
                f.write("{broken\n")
            else:
                f.write(json.dumps({"id": f"r{i}", "text": texts[i % len(texts)]}) + "\n")
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "cascade", "batch", str(src), "--config", str(config_for(tmp_path, clinc_dir)),
           "--out", str(out), "--batch-size", "50", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = tmp_path / "out.progress.json"
    deadline = time.monotonic() + 60
    while not (progress.exists() and json.loads(progress.read_text())["line"] > 2000):
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(progress.read_text())["line"]
    assert killed_at < n, "the kill came too late to test anything"
    with out.open("a") as f:
        f.write('{"id": "torn')  # what a kill mid-write leaves
    done = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = read_jsonl(out)
    expected = [f"r{i}" for i in range(n) if i % 997 != 500]
    assert [r["id"] for r in rows] == expected  # every good row once, in order
    errors = read_jsonl(tmp_path / "out.errors.jsonl")
    assert [e["line"] for e in errors] == [i + 1 for i in range(n) if i % 997 == 500]
