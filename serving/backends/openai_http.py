"""Any OpenAI-compatible server (`vllm serve`, `cascade llm serve`, ...) over HTTP.

One pooled `httpx.Client` (keep-alive connections, bounded pool); retries by tenacity (the
maintained retry library) with exponential backoff and jitter on connection errors, 429
(honouring Retry-After) and 5xx — all inside the caller's deadline (`cascade.deadline`): each
attempt's timeout is what is left of it, a retry whose wait would pass it is not made, and
the waits are an Event that `close()` ends at once. The official `openai` client was
considered: its retries cannot be bounded by a total deadline (each attempt gets the full
timeout, and it sleeps up to 60 s on Retry-After), which is what hung requests here.
Labels use `/v1/completions` with `guided_choice` (vLLM's and our extension) and the first
position's `logprobs` for the distribution; a batch of prompts goes in one request. JSON
(`generate_json`) uses `/v1/completions` with OpenAI's `response_format` json_schema, one
request per prompt (each has its own schema), sent concurrently.
No torch here.
"""

from __future__ import annotations

import contextvars
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from cascade.deadline import remaining
from cascade.types import DeadlineExceeded, TierUnavailable
from serving.backends.base import ChoiceResult, JsonResult, distribution_from_logprobs, json_result
from serving.backends.pool import EndpointPool


class BackendError(RuntimeError):
    """The server refused the request itself (a 4xx other than 429): retrying will not help."""


class BackendUnavailable(BackendError, TierUnavailable):
    """The server could not answer within the retries or the deadline; the message says what it
    last said."""


class _Transient(RuntimeError):
    """An attempt failed in a way a retry may fix (a connection error, 429, 5xx)."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after
        self.why_stopped = ""


class OpenAIBackend:
    name = "openai"

    def __init__(self, url: str | list[str], model: str, api_key: str | None = None, timeout_s: float = 30.0,
                 retries: int = 3, backoff_s: float = 0.5, max_connections: int = 16, batch_size: int = 32,
                 choice_field: str = "guided_choice", max_choice_tokens: int = 16, failures_to_open: int = 3,
                 cooldown_s: float = 5.0, health_interval_s: float = 2.0):
        urls = [url] if isinstance(url, str) else list(url)
        urls = [u.rstrip("/") if u.rstrip("/").endswith("/v1") else u.rstrip("/") + "/v1" for u in urls]
        self.url = urls[0] if len(urls) == 1 else "{" + ", ".join(urls) + "}"  # for messages
        self.model = model
        self.retries = retries
        self.backoff_s = backoff_s
        self._backoff = wait_exponential(multiplier=backoff_s, max=timeout_s) + wait_random(0, backoff_s / 2)
        self.batch_size = batch_size
        self.max_connections = max_connections
        self.choice_field = choice_field
        self.max_choice_tokens = max_choice_tokens
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout_s = timeout_s
        self.closed = threading.Event()  # set by close(): ends any backoff wait at once
        self.client = httpx.Client(timeout=timeout_s, headers=headers,
                                   limits=httpx.Limits(max_connections=max_connections,
                                                       max_keepalive_connections=max_connections))
        self.pool = EndpointPool(urls, self.client, failures_to_open, cooldown_s, health_interval_s)

    def _post(self, path: str, body: dict) -> dict:
        tried: set[str] = set()  # endpoints this request has tried: a retry fails over to another
        retrying = Retrying(
            retry=retry_if_exception_type(_Transient),
            wait=lambda state: self._wait(state, tried),
            stop=stop_after_attempt(self.retries + 1) | self._past_deadline, sleep=self.closed.wait, reraise=True)
        try:
            return retrying(self._attempt, path, body, tried)
        except _Transient as exc:
            tries = retrying.statistics.get("attempt_number", 1)
            raise BackendUnavailable(f"{self.url}{path}: no answer after {tries} tries; last: {exc}{exc.why_stopped}"
                                     ) from None

    def _attempt(self, path: str, body: dict, tried: set[str]) -> dict:
        """One request to the pool's best endpoint within what is left of the deadline;
        `_Transient` when a retry (on another endpoint, if there is one) may help."""
        left = remaining(self.timeout_s)
        if left is not None and left <= 0.001:
            raise DeadlineExceeded(f"{self.url}{path}: the deadline passed before the request was sent")
        if self.closed.is_set():
            raise BackendUnavailable(f"{self.url}{path}: the backend is closed")
        got = self.pool.acquire(tried)
        if got is None:
            raise _Transient(f"every endpoint's circuit is open ({self.pool.stats()[0]['last_error']}, ...)",
                             self.pool.cooldown_s / 2)
        endpoint, probe = got
        tried.add(endpoint.url)
        url = endpoint.url + path
        released = False

        def release(ok: bool, error: str = "", **kw) -> None:
            nonlocal released
            released = True
            self.pool.release(endpoint, ok, error, probe=probe, **kw)

        try:
            try:
                r = self.client.post(url, json=body, timeout=left)
            except httpx.TimeoutException as exc:
                if left is not None and left < self.timeout_s:  # the caller's deadline, not the endpoint
                    release(False, counts=False)
                    raise DeadlineExceeded(f"{url}: no answer within the request's deadline ({left:.2f}s)") from None
                release(False, str(exc))
                raise _Transient(f"{url}: {type(exc).__name__}: {exc}") from None
            except httpx.TransportError as exc:  # refused, reset
                release(False, str(exc), refused=isinstance(exc, httpx.ConnectError))
                raise _Transient(f"{url}: {type(exc).__name__}: {exc}") from None
            if r.status_code == 429 or r.status_code >= 500:  # busy or broken there: try again (elsewhere)
                release(r.status_code == 429, f"HTTP {r.status_code}")
                retry_after = None
                if r.status_code == 429:
                    try:
                        retry_after = float(r.headers.get("retry-after", ""))
                    except ValueError:
                        pass
                raise _Transient(f"{url}: HTTP {r.status_code}: {r.text[:300]}", retry_after)
            release(True)  # it answered: whatever it said, it is up
        finally:
            if not released:  # any other error (a closed client, a decoding error): never leave it counted
                self.pool.release(endpoint, False, "unexpected error", probe=probe)
        if r.status_code == 200:
            return r.json()
        last = f"HTTP {r.status_code}: {r.text[:300]}"
        if r.status_code in (401, 403, 404):  # a wrong key, URL or model: every request will fail
            raise BackendUnavailable(f"{url}: {last}")
        raise BackendError(f"{url}: {last}")  # this request is wrong: retrying won't help

    def _wait(self, state: RetryCallState, tried: set[str]) -> float:
        """No wait when another endpoint can take the retry (failover); else exponential backoff
        with jitter, or the server's Retry-After — advice, capped at `timeout_s`, not a blank
        cheque."""
        if self.pool.has_other(tried):
            return 0.0
        exc = state.outcome.exception() if state.outcome else None
        given = getattr(exc, "retry_after", None)
        wait = given if given is not None and 0.0 <= given else self._backoff(state)
        return min(wait, self.timeout_s)

    def _past_deadline(self, state: RetryCallState) -> bool:
        """Stop now when the next wait would pass the deadline (say so), or `close()` was called."""
        left = remaining(None)
        if self.closed.is_set():
            return True
        if left is not None and state.upcoming_sleep >= left:
            exc = state.outcome.exception() if state.outcome else None
            if isinstance(exc, _Transient):
                exc.why_stopped = f" (a retry in {state.upcoming_sleep:.2f}s would pass the deadline)"
            return True
        return False

    def choose(self, prompts: list[str], choices: list[str]) -> list[ChoiceResult]:
        results: list[ChoiceResult] = []
        k = min(20, len(choices))
        for start in range(0, len(prompts), self.batch_size):
            batch = list(prompts[start:start + self.batch_size])
            body = {"model": self.model, "prompt": batch, "max_tokens": self.max_choice_tokens, "temperature": 0.0,
                    "logprobs": k, self.choice_field: list(choices)}
            if self.choice_field == "structured_outputs":
                body[self.choice_field] = {"choice": list(choices)}
            data = self._post("/completions", body)
            by_index = sorted(data["choices"], key=lambda c: c["index"])
            if len(by_index) != len(batch):
                raise BackendError(f"{self.url}/completions: {len(by_index)} answers for {len(batch)} prompts")
            for c in by_index:
                lp = c.get("logprobs") or {}
                top = (lp.get("top_logprobs") or [{}])[0] or {}
                path = sum(x for x in (lp.get("token_logprobs") or []) if x is not None) if lp else None
                results.append(distribution_from_logprobs(c["text"], top, list(choices), path))
        return results

    def generate_json(self, prompts: list[str], schemas: list[dict], max_tokens: int) -> list[JsonResult]:
        """Greedy JSON under each prompt's schema: POST /v1/completions with
        `response_format={"type": "json_schema", "json_schema": {"name": "fields", "schema": ...}}`
        and `logprobs`, one request per prompt, at most `max_connections` at once, each with the
        retries, failover and deadline of `choose` (the caller's deadline holds in every thread).

        `logprob` is the sum of the returned token logprobs. `cascade llm serve` returns them
        renormalised over the tokens the grammar allowed (the constrained distribution); vLLM v1
        masks the logits with its grammar bitmask before its sampler takes logprobs from them,
        so its sum should be the same quantity (not tested here). A server that returns no
        logprobs gives logprob 0.0 (no confidence information: treat it as unknown).

        Raises:
            BackendError when the server refuses a request (a schema it cannot compile: 400),
            BackendUnavailable when it cannot answer. An answer that is not JSON (a server that
            ignored `response_format`) comes back with `value` None.
        """
        if len(schemas) != len(prompts):
            raise ValueError(f"schemas: {len(schemas)} for {len(prompts)} prompts")
        if not prompts:
            return []

        def one(prompt: str, schema: dict) -> JsonResult:
            body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                    "logprobs": 1,
                    "response_format": {"type": "json_schema", "json_schema": {"name": "fields", "schema": schema}}}
            data = self._post("/completions", body)
            choices = data.get("choices") or []
            if len(choices) != 1:
                raise BackendError(f"{self.url}/completions: {len(choices)} answers for 1 prompt")
            c = choices[0]
            lp = c.get("logprobs") or {}
            logprob = sum(x for x in (lp.get("token_logprobs") or []) if x is not None)
            return json_result(c["text"], logprob, c.get("finish_reason"))

        workers = max(1, min(len(prompts), self.max_connections))
        with ThreadPoolExecutor(workers, thread_name_prefix="openai-json") as pool:
            # Each task runs in a copy of this thread's context: the deadline (a ContextVar) with it.
            futures = [pool.submit(contextvars.copy_context().run, one, p, s) for p, s in zip(prompts, schemas)]
            try:
                return [f.result() for f in futures]
            except BaseException:  # one failed: the rest are not worth waiting for
                for f in futures:
                    f.cancel()
                raise

    def stats(self) -> dict:
        return {"endpoints": self.pool.stats()}

    def close(self) -> None:
        self.closed.set()
        self.pool.close()
        self.client.close()
