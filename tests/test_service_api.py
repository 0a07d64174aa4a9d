"""What a client and an operator meet: one /v1/classify shape, readiness while models load,
request ids, the access log, metrics, logs as JSON lines, and the app factory."""

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from serving.app import create_app, create_llm_app
from tests.test_isolation import error_of, free_port, raw_post
from tests.test_service import RULE_TEXT, SlowTier, rules_tier, service_with, write_config

REPO = Path(__file__).resolve().parents[1]


class Scored(SlowTier):
    """Answers with a full distribution, as a student does."""

    def predict_batch(self, texts):
        from cascade.types import Prediction

        self.batches.append(list(texts))
        scores = {"balance": 0.7, "transfer": 0.2, "oos": 0.1}
        return [Prediction("balance", 0.7, self.name, scores=scores, latency_ms=1.23456) for _ in texts]


def test_one_classify_shape_whatever_was_sent_and_whichever_tier_answered(tmp_path, serve_app):
    app = create_app(write_config(tmp_path), service=service_with([rules_tier(), Scored("student")], [0.5, 0.0]))
    with serve_app(app) as url:
        bodies = [httpx.post(url + "/v1/classify", json=b).json() for b in (
            {"text": RULE_TEXT}, {"texts": [RULE_TEXT]}, {"input": RULE_TEXT}, {"input": [RULE_TEXT]})]
        same = [[{k: v for k, v in r.items() if k != "latency_ms"} for r in b["results"]] for b in bodies]
        assert all(s == same[0] for s in same) and all("latency_ms" in b["results"][0] for b in bodies)
        assert all(set(b) == {"id", "object", "created", "model", "results", "usage"} for b in bodies)
        assert len({b["id"] for b in bodies}) == 4
        mixed = httpx.post(url + "/v1/classify", json={"texts": [RULE_TEXT, "zzz qqq"], "top_k": 2}).json()
        rule, student = mixed["results"]
        assert set(rule) == set(student) == {"index", "label", "confidence", "tier", "degraded", "fields",
                                             "latency_ms", "scores"}
        # the Hugging Face text-classification shape, most likely first; a rule has its one answer
        assert student["scores"] == [{"label": "balance", "score": 0.7}, {"label": "transfer", "score": 0.2}]
        assert rule["scores"] == [{"label": "are_you_a_bot", "score": rule["confidence"]}]
        assert student["latency_ms"] == round(student["latency_ms"], 3) >= 1.235  # rounded to 3 decimals
        assert mixed["usage"] == {"items": 2, "tiers": {"rules": 1, "student": 1}}
        r = httpx.post(url + "/v1/classify", json={"text": "a", "model": "banking77"})
        assert r.status_code == 404 and error_of(r)["param"] == "model"
        assert httpx.post(url + "/v1/classify", json={"text": "a", "model": "clinc150"}).status_code == 200
        r = httpx.post(url + "/v1/classify", json={"input": ["a"], "texts": ["b"]})
        assert r.status_code == 422 and error_of(r)["code"] == "missing_text"
        r = raw_post(url, "/v1/classify", {"input": ["ok", "\ud800"]})
        assert r.status_code == 422 and error_of(r)["param"] == "input[1]"
        schema = httpx.get(url + "/openapi.json").json()
    op = schema["paths"]["/v1/classify"]["post"]
    assert op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/ClassifyResponse")
    for code in ("401", "413", "422", "429", "503"):
        assert op["responses"][code]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody"), code
    result = schema["components"]["schemas"]["ClassifyResult"]["properties"]
    assert {"label", "confidence", "tier", "degraded", "fields", "latency_ms", "scores"} <= set(result)


def test_port_opens_at_once_and_readyz_says_what_is_still_loading(tmp_path, serve_app, clinc_dir, monkeypatch):
    import cascade.tiers.majority as majority

    release = threading.Event()
    real = majority.build_majority_tier

    def slow_build(spec, base_dir):
        release.wait(30)
        return real(spec, base_dir)

    monkeypatch.setattr(majority, "build_majority_tier", slow_build)
    cfg = write_config(tmp_path)
    cfg.write_text(cfg.read_text().replace(str(REPO / "tests"), str(clinc_dir)))
    with serve_app(create_app(cfg), ready=False) as url:
        assert httpx.get(url + "/healthz").status_code == 200  # alive while loading
        r = httpx.get(url + "/readyz")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        assert r.json()["parts"] == {"rules": "ready", "fallback": "loading"}
        r = httpx.post(url + "/v1/classify", json={"text": RULE_TEXT})
        assert r.status_code == 503 and error_of(r)["code"] == "not_ready" and "fallback (loading)" in r.text
        assert r.headers["retry-after"] == "1"
        release.set()
        deadline = time.monotonic() + 30
        while httpx.get(url + "/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert httpx.get(url + "/readyz").json()["parts"] == {"rules": "ready", "fallback": "ready"}
        assert httpx.post(url + "/v1/classify", json={"text": RULE_TEXT}).json()["results"][0]["tier"] == "rules"


def test_a_failed_load_is_reported_and_ends_the_server(tmp_path, serve_app):
    cfg = write_config(tmp_path)  # the fallback reads tests/ as a dataset dir: it has no train.jsonl
    heard = []
    app = create_app(cfg, on_load_error=heard.append)
    with serve_app(app, ready=False) as url:
        deadline = time.monotonic() + 30
        while not heard:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = httpx.get(url + "/readyz")
        assert r.status_code == 503 and r.json()["status"] == "failed" and r.json()["error"] == heard[0]
        assert heard[0] == f"{REPO / 'tests' / 'train.jsonl'}: not found"  # names the file
        assert error_of(httpx.post(url + "/v1/classify", json={"text": "a"}))["code"] == "not_ready"


def test_request_ids_access_log_and_metrics(tmp_path, serve_app, caplog, monkeypatch):
    monkeypatch.setenv("CASCADE_API_KEYS", "k1")
    app = create_app(write_config(tmp_path), service=service_with([rules_tier(), Scored("student")], [0.5, 0.0]))
    auth = {"Authorization": "Bearer k1"}
    caplog.set_level(logging.INFO, logger="cascade.access")
    with serve_app(app) as url:
        r = httpx.post(url + "/v1/classify", json={"text": RULE_TEXT}, headers={**auth, "X-Request-ID": "abc-123"})
        assert r.headers["x-request-id"] == "abc-123"
        fresh = httpx.post(url + "/v1/classify", json={"text": "zzz"}, headers={**auth, "X-Request-ID": "a b"})
        assert fresh.headers["x-request-id"] != "a b" and len(fresh.headers["x-request-id"]) == 32
        assert httpx.post(url + "/v1/classify", json={"text": "a"}).status_code == 401
        assert httpx.get(url + "/no/such/path", headers=auth).status_code == 404
        metrics = httpx.get(url + "/metrics", headers=auth).text
    lines = [rec for rec in caplog.records if rec.name == "cascade.access"]
    mine = next(rec for rec in lines if rec.request_id == "abc-123")
    assert (mine.method, mine.path, mine.status) == ("POST", "/v1/classify", 200) and mine.duration_ms > 0
    assert any(rec.status == 401 for rec in lines)
    assert 'cascade_requests_total{code="200",path="/v1/classify"} 2.0' in metrics
    assert 'cascade_requests_total{code="401",path="/v1/classify"} 1.0' in metrics
    assert 'cascade_requests_total{code="404",path="other"} 1.0' in metrics  # unknown paths: one label
    assert 'cascade_request_duration_seconds_count{path="/v1/classify"} 3.0' in metrics
    assert 'cascade_tier_confidence_count{tier="rules"}' in metrics
    assert 'cascade_tier_confidence_bucket{le="0.7",tier="student"} 1.0' in metrics
    assert 'cascade_build_info{app="cascade serve"' in metrics and "_created" not in metrics


def test_llm_serve_health_metrics_and_access_log(serve_app, model_dir, caplog):  # noqa: F811
    from serving.engine.async_engine import AsyncEngine
    from tests.test_llm_serving import small_engine

    caplog.set_level(logging.INFO, logger="cascade.access")
    app = create_llm_app(model_dir, "tiny", engine=AsyncEngine(small_engine(model_dir)))
    with serve_app(app) as url:
        assert httpx.get(url + "/health").status_code == 200
        for _ in range(2):
            done = httpx.post(url + "/v1/completions", json={"prompt": "100 101 102 103 104 105", "max_tokens": 3},
                               timeout=30)
            assert done.status_code == 200
        metrics = httpx.get(url + "/metrics").text
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
              if line and not line.startswith("#")}
    assert values["cascade_llm_requests_running"] == 0 and values["cascade_llm_requests_waiting"] == 0
    assert values["cascade_llm_kv_blocks_free"] > 0 and "cascade_llm_kv_blocks_used" in values
    assert values["cascade_llm_generation_tokens_total"] >= 2 and values["cascade_llm_prompt_tokens_total"] > 0
    assert values["cascade_llm_time_to_first_token_seconds_count"] == 2
    assert 0.0 < values["cascade_llm_prefix_cache_hit_rate"] <= 1.0  # the second prompt hit the first's blocks
    assert values.get('cascade_requests_total{code="200",path="/v1/completions"}') == 2, metrics
    assert any(rec.path == "/v1/completions" and rec.status == 200 for rec in caplog.records
               if rec.name == "cascade.access")


@pytest.fixture
def model_dir(tmp_path_factory):
    from tests.test_llm_serving import model_dir as make

    return make.__wrapped__(tmp_path_factory)


def wait_ready(url: str, proc: subprocess.Popen, probe: str = "/readyz", seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while True:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else proc.returncode
        assert time.monotonic() < deadline, "never ready"
        try:
            if httpx.get(url + probe, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)


def test_cascade_serve_logs_json_lines_with_the_request_id(tmp_path, clinc_dir):
    cfg = write_config(tmp_path)
    cfg.write_text(cfg.read_text().replace(str(REPO / "tests"), str(clinc_dir)))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cascade", "serve", "--config", str(cfg), "--port", str(port),
                             "--log-format", "json"], stderr=subprocess.PIPE, text=True, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        r = httpx.post(url + "/v1/classify", json={"text": RULE_TEXT}, headers={"X-Request-ID": "req-42"})
        assert r.status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode in (0, -signal.SIGTERM), err  # uvicorn re-raises the signal once drained
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    access = [rec for rec in records if rec.get("request_id") == "req-42"]
    assert access and access[0]["path"] == "/v1/classify" and access[0]["status"] == 200
    assert {"time", "level", "logger", "message"} <= set(access[0])
    assert any(rec["logger"] == "cascade.startup" and "fallback: ready" in rec["message"] for rec in records)


def test_app_factory_reads_its_config_from_the_environment(tmp_path, clinc_dir):
    cfg = write_config(tmp_path)
    cfg.write_text(cfg.read_text().replace(str(REPO / "tests"), str(clinc_dir)))
    port = free_port()
    env = {**os.environ, "CASCADE_CONFIG": str(cfg)}
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "serving.app:create_app",
                             "--port", str(port)], env=env, stderr=subprocess.PIPE, text=True, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        body = httpx.post(url + "/v1/classify", json={"input": RULE_TEXT}).json()
        assert body["results"][0]["label"] == "are_you_a_bot" and body["model"] == "clinc150"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    env.pop("CASCADE_CONFIG")
    from cascade.config import ConfigError

    with pytest.raises(ConfigError, match="CASCADE_CONFIG"):
        create_app()


def test_readyz_waits_for_the_service_itself_not_only_the_tiers(tmp_path, serve_app, clinc_dir, monkeypatch):
    """Found in review: the tiers were all "ready" while the service was still starting, and a
    classify in that gap got a 500."""
    import asyncio

    from serving.service import CascadeService

    release = threading.Event()
    real_start = CascadeService.start

    async def slow_start(self):
        await asyncio.to_thread(release.wait, 30)
        await real_start(self)

    monkeypatch.setattr(CascadeService, "start", slow_start)
    cfg = write_config(tmp_path)
    cfg.write_text(cfg.read_text().replace(str(REPO / "tests"), str(clinc_dir)))
    with serve_app(create_app(cfg), ready=False) as url:
        deadline = time.monotonic() + 30
        while httpx.get(url + "/readyz").json()["parts"] != {"rules": "ready", "fallback": "ready"}:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = httpx.get(url + "/readyz")
        assert r.status_code == 503 and r.json()["service"] == "starting"
        c = httpx.post(url + "/v1/classify", json={"text": RULE_TEXT})
        assert c.status_code == 503 and error_of(c)["code"] == "not_ready"
        assert error_of(httpx.post(url + "/admin/reload", json={}))["code"] == "not_ready"
        release.set()
        while httpx.get(url + "/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert httpx.post(url + "/v1/classify", json={"text": RULE_TEXT}).status_code == 200
