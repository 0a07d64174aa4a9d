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

Extraction (a model dir whose cascade.json has `task_kind` extract or joint): after the label
(joint), the backend writes the fields as JSON under `cascade.fields.fields_json_schema` — keys
from the schema (for joint, the fields the label was seen with in training), each value a span of
the text — so every answer is valid JSON and no value is invented. The answer's confidence is
its probability: the label's times the JSON's (the product of the constrained conditionals).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cascade.config import ConfigError, TierConfig
from cascade.fields import FIELDS_CUE, fields_from_json, fields_json_schema, schema_violation
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
    max_field_tokens: int = Field(default=128, ge=8, le=4096, description="longest fields JSON answer")
    max_span_words: int = Field(default=12, ge=1, le=64, description="longest value, in words")


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


# (tier key, text) -> (the answer, the seconds it took), while `remembered_answers` is active
_REMEMBERED: dict[tuple, tuple[Prediction, float]] | None = None


@contextlib.contextmanager
def remembered_answers() -> Iterator[dict]:
    """Within it, a classification large-model tier asked a text it already answered (the same
    model dir, backend options, prompt and labels, in any tier instance in this process) gives
    the same answer again without asking the backend, under the asking tier's name. A flywheel
    round asks the large model about every val text in calibration and again in the gate's
    measurements (the new version, the current one, and the large model alone when calibration
    failed); the answers cannot differ, only cost. A remembered
    answer is charged to the tier's meter at what it cost when asked, so `Tier.cost` (the
    calibration's cost model) is unchanged. Cleared on exit; not used by serving."""
    global _REMEMBERED
    outer, _REMEMBERED = _REMEMBERED, {} if _REMEMBERED is None else _REMEMBERED
    try:
        yield _REMEMBERED
    finally:
        _REMEMBERED = outer


@dataclass
class LLMTier:
    name: str
    backend: object  # serving.backends.LLMBackend
    labels: list[str]
    choices: list[str]
    template: str
    max_text_chars: int = 2000
    meter: CostMeter = field(default_factory=CostMeter)
    task_kind: str = "classify"
    fields: list[str] = field(default_factory=list)
    label_fields: dict[str, list[str]] = field(default_factory=dict)
    max_field_tokens: int = 128
    max_span_words: int = 12
    # JSON answers: how many, how many cut at max_field_tokens, how many outside their schema
    # (a backend that does not constrain); in eval reports and /metrics through `stats`.
    json_counts: dict[str, int] = field(default_factory=lambda: {"answers": 0, "cut": 0, "invalid": 0})
    # what makes two instances answer alike (`remembered_answers`): model dir, backend options
    key: tuple = ()

    def predict_batch(self, texts: list[str]) -> list[Prediction | None]:
        memo = _REMEMBERED
        if memo is None or self.task_kind != "classify" or not self.key:
            return self._predict_batch(texts)
        keys = [(self.key, self.template, tuple(self.choices), t[: self.max_text_chars]) for t in texts]
        first: dict[tuple, int] = {}  # a key not remembered -> the first index asking it
        for i, k in enumerate(keys):
            if k not in memo:
                first.setdefault(k, i)
        if first:
            metered = self.meter.seconds
            fresh = self._predict_batch([texts[i] for i in first.values()])
            each = (self.meter.seconds - metered) / len(first)  # what the meter charged each
            for k, pred in zip(first, fresh):
                if pred is not None:
                    memo[k] = (pred, each)
        out: list[Prediction | None] = []
        recalled, seconds = 0, 0.0
        for i, k in enumerate(keys):
            if k not in memo:  # the backend gave it no answer
                out.append(None)
                continue
            pred, cost_s = memo[k]
            if first.get(k) != i:
                recalled, seconds = recalled + 1, seconds + cost_s
            out.append(replace(pred, tier=self.name, scores=None if pred.scores is None else dict(pred.scores)))
        self.meter.add(recalled, seconds)
        return out

    def _predict_batch(self, texts: list[str]) -> list[Prediction | None]:
        t0 = time.perf_counter()
        prompts = [self.template.format(text=t[: self.max_text_chars]) for t in texts]
        if self.task_kind == "extract":
            preds = [Prediction("", 1.0, self.name) for _ in texts]
            heads = prompts
        else:
            results = self.backend.choose(prompts, self.choices)
            preds = [Prediction(self.labels[r.index], float(r.prob), self.name,
                                scores={lab: float(p) for lab, p in zip(self.labels, r.scores)}) for r in results]
            heads = [p + self.choices[r.index] for p, r in zip(prompts, results)]
        if self.task_kind != "classify":
            self._extract(texts, heads, preds)
        self.meter.add(len(texts), time.perf_counter() - t0)
        return preds

    def _extract(self, texts: list[str], heads: list[str], preds: list[Prediction]) -> None:
        """Fill in each prediction's fields from the backend's constrained JSON."""
        names = [self.label_fields.get(p.label, self.fields) if self.label_fields else self.fields for p in preds]
        schemas = [fields_json_schema(t, n, self.max_span_words) for t, n in zip(texts, names)]
        answers = self.backend.generate_json([h + FIELDS_CUE for h in heads], schemas, self.max_field_tokens)
        for pred, text, n, schema, answer in zip(preds, texts, names, schemas, answers):
            self.json_counts["answers"] += 1
            if not answer.complete:
                self.json_counts["cut"] += 1
            elif schema_violation(answer.value, schema) is not None:
                self.json_counts["invalid"] += 1
            pred.fields = fields_from_json(text, answer.value, n)
            pred.confidence = float(pred.confidence * math.exp(min(0.0, answer.logprob)))

    def stats(self) -> dict:
        return {"json": dict(self.json_counts)} if self.task_kind != "classify" else {}

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
    if not labels and meta.get("task_kind") != "extract":
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
    task_kind = meta.get("task_kind", "classify")
    key = (tier_opts.backend, str(model_dir.resolve()) if model_dir else None,
           json.dumps(backend_opts.model_dump(mode="json", exclude_unset=True), sort_keys=True))
    return LLMTier(spec.name, backend, labels, choices, template, tier_opts.max_text_chars,
                   task_kind=task_kind, fields=list(meta.get("fields") or []),
                   label_fields=dict(meta.get("label_fields") or {}),
                   max_field_tokens=tier_opts.max_field_tokens, max_span_words=tier_opts.max_span_words, key=key)
