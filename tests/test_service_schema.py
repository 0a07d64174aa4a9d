"""Property-based: schemathesis generates requests from each app's own OpenAPI schema (valid
and invalid bodies) against a real server on loopback, while an innocent client sends the same
request over and over beside them. No generated request may get a 5xx, the server keeps
serving, and the innocent client always gets the answer it gets alone.

schemathesis is in the `dev` extra and imported outright: a missing install fails here instead
of skipping the fuzzing silently."""

import threading

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

from serving.app import create_app
from tests.test_llm_serving import model_dir  # noqa: F401  (the tiny model fixture)
from tests.test_service import SlowTier, rules_tier, service_with, write_config


class Innocent:
    """Sends one request in a loop on its own thread; records every answer that differs."""

    def __init__(self, url: str, path: str, body: dict, expect):
        self.url, self.path, self.body, self.expect = url, path, body, expect
        self.stop, self.bad, self.n = threading.Event(), [], 0
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                try:
                    r = client.post(self.url + self.path, json=self.body)
                except httpx.HTTPError as exc:  # the server dropped it: as bad as a wrong answer
                    self.bad.append((-1, repr(exc)))
                    continue
                self.n += 1
                if r.status_code != 200 or not self.expect(r.json()):
                    self.bad.append((r.status_code, r.text[:300]))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=30)


def fuzz(url: str, paths: set[tuple[str, str]], max_examples: int) -> set[int]:
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {(op.method.upper(), op.path) for op in operations} >= paths
    seen: set[int] = set()
    for op, mode in [(op, mode) for op in operations for mode in schemathesis.GenerationMode]:
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=max_examples, deadline=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        def check(case):
            response = case.call(base_url=url, timeout=60)
            seen.add(response.status_code)
            # a request that set its own tiny deadline (timeout_s: 1e-300) is rightly a 504
            own_deadline = isinstance(case.body, dict) and "timeout_s" in case.body and \
                response.status_code == 504 and '"deadline_exceeded"' in response.text
            assert response.status_code < 500 or own_deadline, \
                f"{case.method} {case.path}: {response.status_code} {response.text}"

        try:
            check()
        except Unsatisfiable:  # a parameterless GET has no invalid form
            assert mode == schemathesis.GenerationMode.NEGATIVE and op.method.upper() == "GET"
    return seen


def test_no_server_errors_from_schema_generated_requests(tmp_path, serve_app):
    rules = rules_tier()
    # The rules' matching budget is wall-clock; with the fuzzer, the server and the innocent
    # client on one GIL, 20 ms ran out on the innocent's text (an abstention, so a different
    # answer). The budget is for catastrophic patterns, not for this contention.
    rules.timeout_s = 2.0
    app = create_app(write_config(tmp_path, max_text_chars=200, max_batch_items=8),
                     service=service_with([rules, SlowTier("fallback")], [0.5, 0.0]))
    with serve_app(app) as url:
        innocent_body = {"text": "are you a real person"}
        answered_right = lambda b: b["results"][0]["label"] == "are_you_a_bot"  # noqa: E731
        with Innocent(url, "/v1/classify", innocent_body, answered_right) as innocent:
            seen = fuzz(url, {("POST", "/v1/classify"), ("GET", "/healthz")}, 60)
        assert 200 in seen and 422 in seen  # both valid and invalid requests were made
        assert innocent.n > 0 and innocent.bad == [], rules.outcomes
        assert httpx.post(url + "/v1/classify", json=innocent_body).status_code == 200  # still serving


def test_openai_routes_survive_schema_generated_requests(serve_app, model_dir):  # noqa: F811
    from serving.app import create_llm_app
    from serving.engine.async_engine import AsyncEngine
    from tests.test_llm_serving import small_engine

    engine = small_engine(model_dir)
    app = create_llm_app(model_dir, "tiny", engine=AsyncEngine(engine))
    body = {"model": "tiny", "prompt": "5 6 7", "max_tokens": 4, "temperature": 0}
    with serve_app(app) as url:
        expected = httpx.post(url + "/v1/completions", json=body, timeout=30).json()["choices"][0]["text"]
        with Innocent(url, "/v1/completions", body, lambda b: b["choices"][0]["text"] == expected) as innocent:
            seen = fuzz(url, {("POST", "/v1/completions"), ("POST", "/v1/chat/completions")}, 25)
        assert 200 in seen and 422 in seen
        assert innocent.n > 0 and innocent.bad == []
        assert engine.failed_steps == 0
