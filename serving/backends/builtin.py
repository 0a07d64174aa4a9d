"""The built-in paged-KV engine as a backend (the CPU default). Its `async_engine` is what the
HTTP app mounts the OpenAI routes on, so the cascade tier and direct LLM clients share one
continuous batch."""

from __future__ import annotations

from pathlib import Path

from serving.backends.base import ChoiceResult
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
        outs = self.async_engine.run_sync(list(prompts), params, timeout=self.timeout_s)
        return [ChoiceResult(o.choice, o.choice_prob, o.choice_scores) for o in outs]

    def complete(self, prompts: list[str], max_tokens: int = 64, temperature: float = 0.0,
                 stop: list[str] | None = None) -> list[str]:
        params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, stop=list(stop or []))
                  for _ in prompts]
        return [o.text for o in self.async_engine.run_sync(list(prompts), params, timeout=self.timeout_s)]

    def close(self) -> None:
        self.async_engine.shutdown()
