"""The large-model tier: the task's prompt and labels, answered by a backend (builtin engine,
vLLM, or any OpenAI-compatible server). This module imports no torch: the backend decides.

    [[tiers]]
    name = "llm"
    kind = "llm"
    path = "models/large-clinc150"      # model dir: cascade.json gives labels and prompt template
    options = { backend = "builtin" }   # or "vllm", or "openai" with url = "...", model = "..."

Choices are the model's label tokens (`<|label|>`) when it was fine-tuned by `cascade train
large`; for any other model set `options.labels` (and `options.template`), and the label names
themselves are the choices (`options.choice_prefix`, default " ", goes before each).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cascade.config import ConfigError, TierConfig
from cascade.types import CostMeter, Prediction


class LLMTierOptions(BaseModel):
    """The tier's own keys; every other key in `options` belongs to the backend, whose own
    model (serving/backends/options.py) rejects what it does not know."""

    model_config = ConfigDict(extra="forbid")

    backend: str = Field(default="builtin", description="builtin | vllm | openai")
    labels: list[str] | None = Field(default=None, min_length=1)
    template: str | None = Field(default=None, description="prompt with {text}")
    choice_prefix: str = " "
    max_text_chars: int = Field(default=2000, ge=1, le=1_000_000)


def parse_options(options: dict) -> tuple[LLMTierOptions, BaseModel]:
    """The tier's options and its backend's, each validated; a ValidationError's `loc` names the
    key as written in `options`."""
    from serving.backends.options import BACKEND_OPTIONS

    own = {k: v for k, v in options.items() if k in LLMTierOptions.model_fields}
    tier = LLMTierOptions.model_validate(own)
    if tier.backend not in BACKEND_OPTIONS:
        raise ValueError(f"options.backend: {tier.backend!r} is not one of {', '.join(BACKEND_OPTIONS)}")
    rest = {k: v for k, v in options.items() if k not in LLMTierOptions.model_fields}
    return tier, BACKEND_OPTIONS[tier.backend].model_validate(rest)


@dataclass
class LLMTier:
    name: str
    backend: object  # serving.backends.LLMBackend
    labels: list[str]
    choices: list[str]
    template: str
    max_text_chars: int = 2000
    meter: CostMeter = field(default_factory=CostMeter)

    def predict_batch(self, texts: list[str]) -> list[Prediction | None]:
        t0 = time.perf_counter()
        prompts = [self.template.format(text=t[: self.max_text_chars]) for t in texts]
        results = self.backend.choose(prompts, self.choices)
        preds = [Prediction(self.labels[r.index], float(r.prob), self.name,
                            scores={lab: float(p) for lab, p in zip(self.labels, r.scores)}) for r in results]
        self.meter.add(len(texts), time.perf_counter() - t0)
        return preds

    @property
    def cost(self) -> float:
        return self.meter.mean_ms

    def close(self) -> None:
        self.backend.close()

    def shared_engine(self):
        """(async engine, model dir) when the backend runs the built-in engine in this process,
        for the app to serve the OpenAI routes on the same continuous batch; else None."""
        engine = getattr(self.backend, "async_engine", None)
        return None if engine is None else (engine, self.backend.model_dir)


def build_llm_tier(spec: TierConfig, base_dir: Path) -> LLMTier:
    from serving.backends import build_backend

    where = f"tier {spec.name!r}"
    try:
        tier_opts, backend_opts = parse_options(spec.options)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"{where}: options.{key}: {first['msg']}") from None
    model_dir = spec.resolve_path(base_dir) if spec.path else None
    meta = {}
    if model_dir is not None:
        if not model_dir.is_dir():
            raise ConfigError(f"{where}: {model_dir}: not a directory (the large model's dir)")
        meta_file = model_dir / "cascade.json"
        if meta_file.exists():
            try:
                meta = json.loads(meta_file.read_text())
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{meta_file}: not valid JSON ({exc})") from None
        elif tier_opts.labels is None:
            raise ConfigError(f"{where}: {meta_file} not found; give options.labels for a model not "
                              "fine-tuned by `cascade train large`")
    labels = list(tier_opts.labels or meta.get("labels") or [])
    if not labels:
        raise ConfigError(f"{where}: no labels (options.labels, or a model dir with cascade.json)")
    template = tier_opts.template or meta.get("prompt_template") or "Request: {text}\nIntent:"
    if "labels" in meta and labels == meta["labels"]:
        choices = [f"<|{lab}|>" for lab in labels]  # the fine-tuned model's label tokens
    else:
        choices = [tier_opts.choice_prefix + lab for lab in labels]
    kwargs = backend_opts.model_dump(exclude_unset=True)
    if tier_opts.backend in ("builtin", "vllm"):
        if model_dir is None:
            raise ConfigError(f"{where}: backend {tier_opts.backend!r} needs `path` (the model dir)")
        if tier_opts.backend == "builtin":
            for name in ("config.json", "tokenizer.json"):
                if not (model_dir / name).exists():
                    raise ConfigError(f"{where}: {model_dir / name}: not found (the built-in engine needs the "
                                      "model's config.json, tokenizer.json and model.safetensors)")
        kwargs["model_dir"] = model_dir
    try:
        backend = build_backend(tier_opts.backend, **kwargs)
    except ValueError as exc:  # the engine config's own bounds
        raise ConfigError(f"{where}: options.{exc}") from None
    return LLMTier(spec.name, backend, labels, choices, template, tier_opts.max_text_chars)
