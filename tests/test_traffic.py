"""The flywheel's serving side: the traffic log (every answered item, off the request path) and
a hot swap to another cascade version under load without a failed request."""

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from serving.app import create_app
from serving.traffic_log import TrafficLog, read_log
from tests.test_service import RULE_TEXT

REPO = Path(__file__).resolve().parents[1]


def versioned_config(directory: Path, data_dir: Path, fallback_label: str, log: str | None = None) -> Path:
    """A cascade version: the shipped rules, then a fallback answering `fallback_label`."""
    directory.mkdir(parents=True, exist_ok=True)
    cfg = directory / "cascade.toml"
    head = f"traffic_log = {log}\n\n" if log else ""
    cfg.write_text(f'''{head}[task]
name = "clinc150"

[[tiers]]
name = "rules"
kind = "rules"
path = "{REPO / 'rules' / 'clinc150.toml'}"
threshold = 0.5
options = {{ timeout_ms = 2000 }}

[[tiers]]
name = "fallback"
kind = "majority"
path = "{data_dir}"
options = {{ label = "{fallback_label}" }}
''')
    return cfg


def test_every_answer_is_logged_with_its_trail(tmp_path, serve_app, clinc_dir):
    cfg = versioned_config(tmp_path / "v1", clinc_dir, "oos", log="{ dir = 'traffic' }")
    with serve_app(create_app(cfg)) as url:
        r = httpx.post(url + "/v1/classify", json={"texts": [RULE_TEXT, "zzz qqq"]}, headers={"X-Request-ID": "r1"})
        assert r.status_code == 200 and "trail" not in r.json()["results"][0]  # not asked for: not returned
        assert httpx.post(url + "/v1/classify", json={"text": "ok"}).status_code == 200
        metrics = httpx.get(url + "/metrics").text
    entries = list(read_log(tmp_path / "v1" / "traffic"))  # the server stopped: the log is closed
    got = [(e["request_id"], e["index"], e["tier"]) for e in entries[:2]]
    assert got == [("r1", 0, "rules"), ("r1", 1, "fallback")]
    first, second = entries[0], entries[1]
    assert first["text"] == RULE_TEXT and first["label"] == "are_you_a_bot" and first["trail"][0]["tier"] == "rules"
    assert [t["tier"] for t in second["trail"]] == ["fallback"] and "llm" not in second  # no large model here
    assert len(entries) == 3 and "cascade_traffic_log_written_total" in metrics
    assert {e["version"] for e in entries} == {r.headers["X-Cascade-Version"]} and r.headers[
        "X-Cascade-Version"].startswith("v1@")  # which version answered, in the log and in the response


def test_hashed_text_and_the_batch_command_write_the_same_log(tmp_path, clinc_dir):
    from serving.batch_job import run_batch

    cfg = versioned_config(tmp_path, clinc_dir, "oos", log="{ dir = 'traffic', text = 'hash' }")
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "a", "text": RULE_TEXT}) + "\n" + json.dumps({"id": "b", "text": "zzz"}) + "\n")
    run_batch(src, cfg, tmp_path / "out.jsonl", progress=False)
    entries = list(read_log(tmp_path / "traffic"))
    assert [e["request_id"] for e in entries] == ["a", "b"] and all("text" not in e for e in entries)
    import hashlib

    assert entries[0]["text_sha256"] == hashlib.sha256(RULE_TEXT.encode()).hexdigest()


def test_the_log_survives_a_kill_and_a_torn_line(tmp_path):
    d = tmp_path / "traffic"
    code = (f"import time\nfrom serving.traffic_log import TrafficLog\nlog = TrafficLog({str(d)!r}, segment_mb=0.01, "
            "fsync_s=0.0)\ni = 0\nwhile True:\n    log.put({'i': i, 'text': 'x' * 200})\n    i += 1\n"
            "    if i % 100 == 0:\n        time.sleep(0.001)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    deadline = time.monotonic() + 60
    while len(list(d.glob("traffic-*.jsonl"))) < 5:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    last = sorted(d.glob("traffic-*.jsonl"))[-1]
    with last.open("ab") as f:
        f.write(b'{"i": 99999999, "text": "tor')  # what a kill mid-write leaves
    seen = [e["i"] for e in read_log(d)]
    assert len(seen) > 100 and seen == sorted(seen) and 99999999 not in seen
    assert seen == list(range(len(seen)))  # append-only and in order: no gap before the torn end (a kill keeps
    # the page cache, so this checks order and the reader, not fsync)


def test_a_cursor_reads_each_entry_once_while_the_log_grows_and_rotates(tmp_path):
    """`read_log(since, end)`: the newest segment's unfinished line is left for the next read,
    a later read returns exactly what came after, and a segment deleted by the size cap does not
    stop it."""
    from serving.traffic_log import read_log

    def line(i: int) -> bytes:
        return json.dumps({"i": i}).encode() + b"\n"

    a, b = tmp_path / "traffic-0000000000001-000001.jsonl", tmp_path / "traffic-0000000000002-000002.jsonl"
    a.write_bytes(line(0) + line(1) + b'{"i": 2, "to')  # a killed writer's torn line: the segment is closed
    b.write_bytes(line(3) + b'{"i": 4')  # being written
    cursor: dict = {}
    assert [e["i"] for e in read_log(tmp_path, None, cursor)] == [0, 1, 3]
    assert cursor == {"segment": b.name, "offset": len(line(3))}
    with b.open("ab") as f:
        f.write(b'}\n' + line(5))
    c = tmp_path / "traffic-0000000000003-000003.jsonl"
    c.write_bytes(line(6))
    a.unlink()  # the size cap
    nxt: dict = {}
    assert [e["i"] for e in read_log(tmp_path, cursor, nxt)] == [4, 5, 6]
    assert nxt == {"segment": c.name, "offset": len(line(6))}
    same: dict = {}
    assert list(read_log(tmp_path, nxt, same)) == [] and same == nxt  # nothing new: the cursor stays
    b.unlink()
    c.unlink()
    assert list(read_log(tmp_path, nxt, same)) == [] and same == nxt


def test_a_broken_writer_drops_entries_not_requests(tmp_path, serve_app, clinc_dir):
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "not-a-dir").write_text("a file where the log dir should be")
    cfg = versioned_config(tmp_path / "v1", clinc_dir, "oos", log="{ dir = 'not-a-dir' }")
    with serve_app(create_app(cfg)) as url:
        assert all(httpx.post(url + "/v1/classify", json={"text": f"t{i}"}).status_code == 200 for i in range(5))
        deadline = time.monotonic() + 10
        while 'cascade_traffic_log_dropped_total{reason="write_error"} 5.0' not in httpx.get(url + "/metrics").text:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    full = TrafficLog(tmp_path / "slow", queue_items=1)
    full._write = lambda batch: time.sleep(1)  # a stuck disk
    t0 = time.perf_counter()
    for i in range(100):
        full.put({"i": i})
    assert time.perf_counter() - t0 < 0.5 and full.dropped["queue_full"] >= 97  # put never waits
    full.close(timeout_s=3)


def test_hot_swap_under_load_loses_nothing_and_rollback_is_the_same_call(tmp_path, serve_app, clinc_dir):
    v1 = versioned_config(tmp_path / "v1", clinc_dir, "oos", log="{ dir = 'traffic' }")
    v2 = versioned_config(tmp_path / "v2", clinc_dir, "balance", log="{ dir = 'traffic' }")
    broken = tmp_path / "broken.toml"
    broken.write_text(v2.read_text().replace('kind = "majority"', 'kind = "majority"\npath_typo = 1', 1))

    async def load(url, stop):
        answers, failures = {i: [] for i in range(4)}, []  # per client, in its order: (version, label)
        async with httpx.AsyncClient(timeout=30) as client:
            async def one(i):
                while not stop.is_set():
                    r = await client.post(url + "/v1/classify", json={"text": f"zzz {i}"})
                    if r.status_code == 200:
                        answers[i].append((r.headers["X-Cascade-Version"], r.json()["results"][0]["label"]))
                    else:
                        failures.append(r.text)
            await asyncio.gather(*(one(i) for i in range(4)))
        return answers, failures

    async def scenario(url):
        stop = asyncio.Event()
        task = asyncio.create_task(load(url, stop))
        async with httpx.AsyncClient(timeout=60) as admin:
            await asyncio.sleep(0.5)
            bad = await admin.post(url + "/admin/reload", json={"config": str(broken)})
            await asyncio.sleep(0.3)
            swap = await admin.post(url + "/admin/reload", json={"config": str(v2)})
            await asyncio.sleep(0.5)
            back = await admin.post(url + "/admin/reload", json={"config": str(v1)})
            await asyncio.sleep(0.5)
        stop.set()
        return bad, swap, back, await task

    with serve_app(create_app(v1)) as url:
        bad, swap, back, (answers, failures) = asyncio.run(scenario(url))
    assert bad.status_code == 422 and "path_typo" in bad.json()["error"]["message"]  # v1 kept serving
    assert swap.status_code == 200 and swap.json()["drained"] and back.status_code == 200, (swap.text, back.text)
    every = [a for client in answers.values() for a in client]
    assert failures == [] and len(every) > 30
    ids = {label: version for version, label in every}
    assert set(ids) == {"oos", "balance"} and ids["oos"].startswith("v1@") and ids["balance"].startswith("v2@")
    assert all(ids[label] == version for version, label in every)  # each answer is its version's
    # Responses of different clients interleave (a request v1 accepted may finish after one v2
    # answered: in-flight requests finish on their version), but one client's requests follow
    # each other, so each client sees v1, then v2, then v1 again, never out of that order.
    for client in answers.values():
        runs = [client[0][1]] + [b[1] for a, b in zip(client, client[1:]) if a[1] != b[1]]
        assert runs == ["oos", "balance", "oos"][:len(runs)], runs
    assert any(label == "balance" for _, label in every)
    logged = list(read_log(tmp_path / "v1" / "traffic")) + list(read_log(tmp_path / "v2" / "traffic"))
    assert {e["version"] for e in logged} == {ids["oos"], ids["balance"]}


def test_audit_sampling_measures_agreement_and_flags_drift(tmp_path, serve_app, clinc_dir):
    """The fallback (standing in for the large model) answers "oos" to everything, so it never
    agrees with a rule: the audited agreement is 0, below the calibrated 0.95 — drift."""
    cfg = versioned_config(tmp_path, clinc_dir, "oos", log="{ dir = 'traffic' }")
    text = cfg.read_text().replace("options = { timeout_ms = 2000 }\n", "options = { timeout_ms = 2000 }\n"
                                   "llm_agreement = 0.95\n", 1)
    cfg.write_text(text + "\n[audit]\nshare = 1.0\nmax_per_s = 1000\nmax_llm_wait_s = 10\n")
    with serve_app(create_app(cfg)) as url:
        for _ in range(12):
            assert httpx.post(url + "/v1/classify", json={"text": RULE_TEXT}).status_code == 200
        deadline = time.monotonic() + 10
        while 'cascade_audit_items_total{tier="rules"} 12.0' not in (metrics := httpx.get(url + "/metrics").text):
            assert time.monotonic() < deadline, metrics
            time.sleep(0.05)
    assert 'cascade_audit_agreement{tier="rules"} 0.0' in metrics
    assert 'cascade_audit_drift{tier="rules"} 1.0' in metrics
    audits = [e for e in read_log(tmp_path / "traffic") if e.get("audit")]
    assert len(audits) == 12 and all(e["llm"]["label"] == "oos" and e["label"] == "are_you_a_bot" for e in audits)


def test_wilson_bound_and_budget():
    from serving.audit import Auditor, wilson_upper

    assert wilson_upper(95, 100, 0.95) > 0.95 > wilson_upper(80, 100, 0.95)  # no drift at 95/100; drift at 80
    assert wilson_upper(0, 0, 0.95) == 1.0
    a = Auditor(share=1.0, max_per_s=5.0, max_llm_wait_s=0.0, timeout_s=1.0, confidence=0.95, expected={}, seed=0)
    picked = sum(a.pick() for _ in range(100))  # at once: the bucket holds 5
    assert picked == 5 and a.skipped["budget"] == 95


def test_reload_needs_a_key_when_keys_are_set(tmp_path, serve_app, clinc_dir, monkeypatch):
    monkeypatch.setenv("CASCADE_API_KEYS", "k1")
    v1 = versioned_config(tmp_path / "v1", clinc_dir, "oos")
    with serve_app(create_app(v1)) as url:
        assert httpx.post(url + "/admin/reload", json={}).status_code == 401
        r = httpx.post(url + "/admin/reload", json={}, headers={"Authorization": "Bearer k1"}, timeout=60)
        assert r.status_code == 200 and r.json()["config"] == str(v1)
