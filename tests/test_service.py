"""`cascade serve`: the HTTP app on a real uvicorn server on loopback, with the router's tiers
micro-batched per tier."""

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from cascade.router import Cascade
from serving.app import create_app
from serving.service import CascadeService
from tests.conftest import rules_cascade_config

REPO = Path(__file__).resolve().parents[1]


class SlowTier:
    """Answers every text with one label after `delay` seconds; records its batches."""

    def __init__(self, name, label="oos", confidence=1.0, delay=0.0, fail=False):
        self.name, self.label, self.confidence, self.delay, self.fail = name, label, confidence, delay, fail
        self.batches = []

    def predict_batch(self, texts):
        from cascade.types import Prediction

        self.batches.append(list(texts))
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError(f"{self.name} is down")
        return [Prediction(self.label, self.confidence, self.name) for _ in texts]

    @property
    def cost(self):
        return 0.0


def write_config(tmp_path, **serving):
    return rules_cascade_config(tmp_path, REPO / "tests", **serving)  # the fallback is never built here


def service_with(tiers, thresholds, **kw):
    # Loop-lag shedding off unless a test asks for it: the test's own client shares this
    # process's event loop and CPU, which the server would rightly see as being behind.
    args = {"max_queue": 64, "micro_batch_size": 32, "micro_batch_ms": 5.0, "tier_timeout_s": 5.0,
            "max_loop_lag_s": 60.0, **kw}
    return CascadeService(Cascade(tiers, thresholds), **args)


def rules_tier():
    from cascade.config import TierConfig
    from cascade.tiers.rules import build_rules_tier

    return build_rules_tier(TierConfig(name="rules", kind="rules", path=str(REPO / "rules" / "clinc150.toml")), REPO)


RULE_TEXT = "are you a real person"  # the shipped pack answers this one (are_you_a_bot)


def test_classify_happy_path_explain_health_and_metrics(tmp_path, serve_app):
    fallback = SlowTier("fallback")
    app = create_app(write_config(tmp_path), service=service_with([rules_tier(), fallback], [0.5, 0.0]))
    with serve_app(app) as url:
        assert httpx.get(url + "/healthz").json() == {"status": "ok"}
        ready = httpx.get(url + "/readyz").json()
        assert ready["status"] == "ready" and ready["parts"] == {"rules": "ready", "fallback": "ready"}
        one = httpx.post(url + "/v1/classify", json={"text": RULE_TEXT}).json()
        assert one["object"] == "classification" and one["model"] == "clinc150" and one["id"].startswith("cls-")
        assert one["usage"] == {"items": 1, "tiers": {"rules": 1, "fallback": 0}}
        (res,) = one["results"]
        assert res["tier"] == "rules" and res["label"] == "are_you_a_bot" and res["latency_ms"] >= 0
        assert res["index"] == 0 and res["fields"] == {} and res["degraded"] is False and "scores" not in res
        many = httpx.post(url + "/v1/classify", json={"texts": ["zzz qqq", RULE_TEXT], "explain": True}).json()
        preds = many["results"]
        assert [p["tier"] for p in preds] == ["fallback", "rules"] and [p["index"] for p in preds] == [0, 1]
        assert [t["tier"] for t in preds[0]["trail"]] == ["fallback"]  # rules abstained, nothing to show
        assert many["usage"] == {"items": 2, "tiers": {"rules": 1, "fallback": 1}}
        metrics = httpx.get(url + "/metrics").text
        assert 'cascade_answers_total{tier="rules"} 2.0' in metrics
        assert 'cascade_answers_total{tier="fallback"} 1.0' in metrics
        assert 'cascade_escalations_total{tier="rules"} 1.0' in metrics
        assert 'cascade_requests_total{code="200",path="/v1/classify"} 2.0' in metrics


def test_limits_name_the_field(tmp_path, serve_app):
    app = create_app(write_config(tmp_path, max_text_chars=50, max_batch_items=3),
                     service=service_with([SlowTier("fallback")], [0.0]))
    with serve_app(app) as url:
        r = httpx.post(url + "/v1/classify", json={"texts": ["ok", "x" * 51]})
        assert r.status_code == 413 and r.json()["error"]["param"] == "texts[1]"
        r = httpx.post(url + "/v1/classify", json={"texts": ["a"] * 4})
        assert r.status_code == 413 and "limit is 3" in r.json()["error"]["message"]
        r = httpx.post(url + "/v1/classify", json={"text": "a", "texts": ["b"]})
        assert r.status_code == 422 and "exactly one" in r.json()["error"]["message"]
        r = httpx.post(url + "/v1/classify", json={"text": 5})
        assert r.status_code == 422 and r.json()["error"]["param"] == "text"
        r = httpx.post(url + "/v1/classify", json={"txt": "a"})
        assert r.status_code == 422 and r.json()["error"]["param"] == "txt"


def test_api_keys(tmp_path, serve_app, monkeypatch):
    monkeypatch.setenv("CASCADE_API_KEYS", "k1, k2")
    app = create_app(write_config(tmp_path), service=service_with([SlowTier("fallback")], [0.0]))
    with serve_app(app) as url:
        assert httpx.post(url + "/v1/classify", json={"text": "a"}).status_code == 401
        bad = httpx.post(url + "/v1/classify", json={"text": "a"}, headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401 and "API key" in bad.json()["error"]["message"]
        ok = httpx.post(url + "/v1/classify", json={"text": "a"}, headers={"Authorization": "Bearer k2"})
        assert ok.status_code == 200


def test_overload_gives_429_with_retry_after_and_nothing_is_lost(tmp_path, serve_app):
    slow = SlowTier("fallback", delay=0.3)
    app = create_app(write_config(tmp_path, max_queue=4, retry_after_s=2),
                     service=service_with([slow], [0.0], max_queue=4, retry_after_s=2))

    async def burst(url):
        async with httpx.AsyncClient(timeout=10) as client:
            return await asyncio.gather(*(client.post(url + "/v1/classify", json={"texts": ["a", "b"]})
                                          for _ in range(6)))

    with serve_app(app) as url:
        responses = asyncio.run(burst(url))
        codes = sorted(r.status_code for r in responses)
        assert codes.count(200) >= 2 and 429 in codes and set(codes) <= {200, 429}
        rejected = [r for r in responses if r.status_code == 429]
        assert all(r.headers["retry-after"] == "2" for r in rejected)
        answered = sum(len(r.json()["results"]) for r in responses if r.status_code == 200)
        assert answered == 2 * codes.count(200) == sum(len(b) for b in slow.batches)
        assert f"cascade_rejected_total {2.0 * len(rejected)}" in httpx.get(url + "/metrics").text


def test_large_model_failure_gives_degraded_answers(tmp_path, serve_app):
    student = SlowTier("student", label="balance", confidence=0.4)
    llm = SlowTier("llm", fail=True)
    app = create_app(write_config(tmp_path), service=service_with([student, llm], [0.9, 0.0]))
    with serve_app(app) as url:
        r = httpx.post(url + "/v1/classify", json={"text": "how much money do I have"})
        assert r.status_code == 200
        body = r.json()["results"][0]
        assert body["degraded"] is True and body["tier"] == "student" and body["label"] == "balance"
        metrics = httpx.get(url + "/metrics").text
        assert "cascade_degraded_total 1.0" in metrics and 'cascade_tier_errors_total{tier="llm"} 1.0' in metrics


def test_large_model_timeout_is_a_failure_too(tmp_path, serve_app):
    student = SlowTier("student", label="balance", confidence=0.4)
    llm = SlowTier("llm", delay=1.0)
    app = create_app(write_config(tmp_path),
                     service=service_with([student, llm], [0.9, 0.0], tier_timeout_s=0.2))
    with serve_app(app) as url:
        body = httpx.post(url + "/v1/classify", json={"text": "x"}, timeout=10).json()["results"][0]
        assert body["degraded"] is True and body["tier"] == "student"


def test_concurrent_requests_are_micro_batched_per_tier(tmp_path, serve_app):
    tier = SlowTier("fallback", delay=0.02)
    app = create_app(write_config(tmp_path), service=service_with([tier], [0.0], micro_batch_ms=20.0))

    async def many(url):
        async with httpx.AsyncClient(timeout=10) as client:
            return await asyncio.gather(*(client.post(url + "/v1/classify", json={"text": f"t{i}"}) for i in range(20)))

    with serve_app(app) as url:
        responses = asyncio.run(many(url))
    assert all(r.status_code == 200 for r in responses)
    assert sum(len(b) for b in tier.batches) == 20 and len(tier.batches) < 20  # merged across requests


def test_serve_builds_the_configured_tiers(tmp_path, serve_app, clinc_dir):
    """No injected service: the app builds the cascade from the config itself."""
    cfg = write_config(tmp_path)
    cfg.write_text(cfg.read_text().replace(str(REPO / "tests"), str(clinc_dir)))
    with serve_app(create_app(cfg)) as url:
        assert httpx.post(url + "/v1/classify", json={"text": RULE_TEXT}).json()["results"][0]["tier"] == "rules"


def test_shutdown_drains_in_flight_requests(tmp_path):
    """A request in flight when the server is told to stop still gets its answer."""
    import socket
    import threading

    import uvicorn

    slow = SlowTier("fallback", delay=0.8)
    app = create_app(write_config(tmp_path), service=service_with([slow], [0.0]))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    result = {}
    client = threading.Thread(target=lambda: result.update(
        r=httpx.post(url + "/v1/classify", json={"text": "x"}, timeout=10)))
    client.start()
    while not slow.batches:  # the request has reached the tier
        time.sleep(0.01)
    server.should_exit = True  # what SIGTERM does
    client.join(timeout=10)
    thread.join(timeout=10)
    assert result["r"].status_code == 200 and result["r"].json()["results"][0]["tier"] == "fallback"
    assert not thread.is_alive()
    with pytest.raises(httpx.ConnectError):  # and it is really gone
        httpx.post(url + "/v1/classify", json={"text": "x"}, timeout=2)
