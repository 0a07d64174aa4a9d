"""The built-in paged-KV engine as a backend (the CPU default). Its `async_engine` is what the
HTTP app mounts the OpenAI routes on, so the cascade tier and direct LLM clients share one
continuous batch."""

from __future__ import annotations

from pathlib import Path

from cascade.deadline import remaining
from cascade.types import DeadlineExceeded
from serving.backends.base import ChoiceResult, JsonResult, json_result
from serving.engine.async_engine import AsyncEngine
from serving.engine.config import EngineConfig
from serving.engine.engine import LLMEngine
from serving.engine.sampling import SamplingParams


class BuiltinBackend:
    name = "builtin"

    def __init__(self, model_dir: str | Path, timeout_s: float | None = 600.0, **engine_options):
        self.model_dir = Path(model_dir)
        self.engine = LLMEngine.from_model_dir(self.model_dir, EngineConfig.default(**engine_options))
        self.async_engine = AsyncEngine(self.engine)
        self.timeout_s = timeout_s

    def choose(self, prompts: list[str], choices: list[str]) -> list[ChoiceResult]:
        params = [SamplingParams(max_tokens=1, choices=list(choices)) for _ in prompts]
        return [ChoiceResult(o.choice, o.choice_prob, o.choice_scores) for o in self._run(prompts, params)]

    def generate_json(self, prompts: list[str], schemas: list[dict], max_tokens: int) -> list[JsonResult]:
        """Greedy under each prompt's schema (the engine's `json_schema`); `logprob` is the
        engine's constrained `cumulative_logprob`. A schema the engine cannot compile raises
        `RequestError` naming `json_schema`."""
        if len(schemas) != len(prompts):
            raise ValueError(f"schemas: {len(schemas)} for {len(prompts)} prompts")
        params = [SamplingParams(max_tokens=max_tokens, temperature=0.0, json_schema=s) for s in schemas]
        return [json_result(o.text, o.cumulative_logprob or 0.0, o.finish_reason) for o in self._run(prompts, params)]

    def _run(self, prompts: list[str], params: list[SamplingParams]):
        """All final outputs, waiting at most until the caller's deadline (then the requests
        are aborted, their blocks freed)."""
        timeout = remaining(self.timeout_s)
        try:
            return self.async_engine.run_sync(list(prompts), params, timeout=timeout)
        except TimeoutError:
            raise DeadlineExceeded(f"the engine did not answer {len(prompts)} prompts within {timeout:.2f}s") from None

    def close(self) -> None:
        self.async_engine.shutdown()
