"""Any OpenAI-compatible server (`vllm serve`, `cascade llm serve`, ...) over HTTP.

One pooled `httpx.Client` (keep-alive connections, bounded pool) and retries with exponential
backoff on connection errors, 429 (honouring Retry-After) and 5xx — all inside the caller's
deadline (`cascade.deadline`): each attempt's timeout is what is left of it, no backoff sleeps
past it, and the waits are an Event that `close()` ends at once. The official `openai`
client was considered: its retries cannot be bounded by a total deadline (each attempt gets
the full timeout, and it sleeps up to 60 s on Retry-After), which is what hung requests here.
Labels use `/v1/completions` with `guided_choice` (vLLM's and our extension) and the first
position's `logprobs` for the distribution; a batch of prompts goes in one request.
No torch here.
"""

from __future__ import annotations

import threading

import httpx

from cascade.deadline import remaining
from cascade.types import DeadlineExceeded, TierUnavailable
from serving.backends.base import ChoiceResult, distribution_from_logprobs


class BackendError(RuntimeError):
    """The server refused the request itself (a 4xx other than 429): retrying will not help."""


class BackendUnavailable(BackendError, TierUnavailable):
    """The server could not answer within the retries or the deadline; the message says what it
    last said."""


class OpenAIBackend:
    name = "openai"

    def __init__(self, url: str, model: str, api_key: str | None = None, timeout_s: float = 30.0,
                 retries: int = 3, backoff_s: float = 0.5, max_connections: int = 16, batch_size: int = 32,
                 choice_field: str = "guided_choice", max_choice_tokens: int = 16):
        self.url = url.rstrip("/")
        if not self.url.endswith("/v1"):
            self.url += "/v1"
        self.model = model
        self.retries = retries
        self.backoff_s = backoff_s
        self.batch_size = batch_size
        self.choice_field = choice_field
        self.max_choice_tokens = max_choice_tokens
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout_s = timeout_s
        self.closed = threading.Event()  # set by close(): ends any backoff wait at once
        self.client = httpx.Client(timeout=timeout_s, headers=headers,
                                   limits=httpx.Limits(max_connections=max_connections,
                                                       max_keepalive_connections=max_connections))

    def _post(self, path: str, body: dict) -> dict:
        last, tries = "", 0
        for attempt in range(self.retries + 1):
            left = remaining(self.timeout_s)
            if left is not None and left <= 0.001 and tries == 0:
                raise DeadlineExceeded(f"{self.url}{path}: the deadline passed before the request was sent")
            if left is not None and left <= 0.001 or self.closed.is_set():
                break
            tries += 1
            try:
                r = self.client.post(self.url + path, json=body, timeout=left)
            except httpx.TransportError as exc:  # refused, reset, timed out
                last = f"{type(exc).__name__}: {exc}"
                wait = self.backoff_s * 2**attempt
            else:
                if r.status_code == 200:
                    return r.json()
                last = f"HTTP {r.status_code}: {r.text[:300]}"
                if r.status_code in (401, 403, 404):  # a wrong key, URL or model: every request will fail
                    raise BackendUnavailable(f"{self.url}{path}: {last}")
                if r.status_code != 429 and r.status_code < 500:
                    raise BackendError(f"{self.url}{path}: {last}")  # this request is wrong: retrying won't help
                wait = self.backoff_s * 2**attempt
                if r.status_code == 429:
                    try:
                        wait = float(r.headers.get("retry-after", wait))
                    except ValueError:
                        pass
            if attempt == self.retries:
                break
            if not 0.0 <= wait:  # negative or NaN
                wait = self.backoff_s
            wait = min(wait, self.timeout_s)  # a server's Retry-After is advice, not a blank cheque
            left = remaining(None)
            if left is not None and wait >= left:  # the deadline comes first: say so now
                last += f" (a retry in {wait:.2f}s would pass the deadline)"
                break
            if self.closed.wait(wait):
                break
        raise BackendUnavailable(f"{self.url}{path}: no answer after {tries} tries; last: {last}")

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

    def close(self) -> None:
        self.closed.set()
        self.client.close()
