"""Property-based: schemathesis generates requests from the app's own OpenAPI schema (valid
and invalid bodies) against a real server on loopback; no request may get a 5xx."""

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402

from serving.app import create_app  # noqa: E402
from tests.test_service import SlowTier, rules_tier, service_with, write_config  # noqa: E402


def test_no_server_errors_from_schema_generated_requests(tmp_path, serve_app):
    app = create_app(write_config(tmp_path, max_text_chars=200, max_batch_items=8),
                     service=service_with([rules_tier(), SlowTier("fallback")], [0.5, 0.0]))
    with serve_app(app) as url:
        schema = schemathesis.openapi.from_url(url + "/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {(op.method.upper(), op.path) for op in operations} >= {("POST", "/v1/classify"), ("GET", "/healthz")}
        seen: set[int] = set()
        for op, mode in [(op, mode) for op in operations for mode in schemathesis.GenerationMode]:
            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=60, deadline=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            def check(case):
                response = case.call(base_url=url)
                seen.add(response.status_code)
                assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text}"

            try:
                check()
            except Unsatisfiable:  # a parameterless GET has no invalid form
                assert mode == schemathesis.GenerationMode.NEGATIVE and op.method.upper() == "GET"
        assert 200 in seen and 422 in seen  # both valid and invalid requests were made
