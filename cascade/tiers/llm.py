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

from cascade.config import TierConfig
from cascade.types import CostMeter, Prediction

BACKEND_OPTIONS = {"builtin": {"block_size", "num_blocks", "memory_gb", "enable_prefix_caching", "max_num_seqs",
                               "max_num_batched_tokens", "long_prefill_chunk", "dtype", "threads", "timeout_s"},
                   "vllm": {"tensor_parallel_size", "gpu_memory_utilization", "max_model_len", "max_logprobs"},
                   "openai": {"url", "model", "api_key", "timeout_s", "retries", "backoff_s", "max_connections",
                              "batch_size", "choice_field", "max_choice_tokens"}}
TIER_OPTIONS = {"backend", "labels", "template", "choice_prefix", "max_text_chars"}


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


def build_llm_tier(spec: TierConfig, base_dir: Path) -> LLMTier:
    from serving.backends import build_backend

    opts = dict(spec.options)
    backend_name = opts.pop("backend", "builtin")
    where = f"tier {spec.name!r}"
    if backend_name not in BACKEND_OPTIONS:
        raise ValueError(f"{where}: options.backend {backend_name!r} is not one of {', '.join(BACKEND_OPTIONS)}")
    unknown = set(opts) - BACKEND_OPTIONS[backend_name] - TIER_OPTIONS
    if unknown:
        raise ValueError(f"{where}: options {sorted(unknown)} are not known for backend {backend_name!r}; known: "
                         f"{sorted(BACKEND_OPTIONS[backend_name] | TIER_OPTIONS)}")
    model_dir = spec.resolve_path(base_dir) if spec.path else None
    meta = {}
    if model_dir is not None:
        meta_file = model_dir / "cascade.json"
        if meta_file.exists():
            meta = json.loads(meta_file.read_text())
        elif "labels" not in opts:
            raise FileNotFoundError(f"{where}: {meta_file} not found; give options.labels for a model not "
                                    "fine-tuned by `cascade train large`")
    labels = list(opts.pop("labels", None) or meta.get("labels") or [])
    if not labels:
        raise ValueError(f"{where}: no labels (options.labels, or a model dir with cascade.json)")
    template = opts.pop("template", None) or meta.get("prompt_template") or "Request: {text}\nIntent:"
    prefix = opts.pop("choice_prefix", " ")
    max_chars = int(opts.pop("max_text_chars", 2000))
    if "labels" in meta and labels == meta["labels"]:
        choices = [f"<|{lab}|>" for lab in labels]  # the fine-tuned model's label tokens
    else:
        choices = [prefix + lab for lab in labels]
    if backend_name in ("builtin", "vllm"):
        if model_dir is None:
            raise ValueError(f"{where}: backend {backend_name!r} needs `path` (the model dir)")
        opts["model_dir"] = model_dir
    backend = build_backend(backend_name, **opts)
    return LLMTier(spec.name, backend, labels, choices, template, max_chars)
