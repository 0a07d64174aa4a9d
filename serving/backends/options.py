"""Each backend's options as a pydantic model with `extra="forbid"`, so a misspelt key in
`cascade.toml` is an error naming the tier and key when the config loads. Light: no torch, no
vLLM, no HTTP client imported here. The builtin backend's options are the engine config's own
fields (serving/engine/config.py), not a copied list; their bounds are checked by the engine
config itself when the backend is built.
"""

from __future__ import annotations

import dataclasses
import typing

from pydantic import BaseModel, ConfigDict, Field, create_model

from serving.engine.config import CacheConfig, EngineConfig, SchedulerConfig


class OpenAIOptions(BaseModel):
    """Any OpenAI-compatible server (vLLM, `cascade llm serve`)."""

    model_config = ConfigDict(extra="forbid")

    url: str | list[str] = Field(min_length=1, description="base URL, e.g. http://host:8000/v1, or a list of "
                                                         "replicas' URLs: a pool with failover")
    model: str = Field(min_length=1, description="the model name the server serves")
    api_key: str | None = None
    timeout_s: float = Field(default=30.0, gt=0.0, le=3600.0, description="per attempt, and never past the deadline")
    retries: int = Field(default=3, ge=0, le=20)
    backoff_s: float = Field(default=0.5, ge=0.0, le=60.0)
    max_connections: int = Field(default=16, ge=1, le=4096)
    batch_size: int = Field(default=32, ge=1, le=4096, description="prompts per HTTP request")
    choice_field: str = Field(default="guided_choice", description="guided_choice, or structured_outputs (vLLM)")
    max_choice_tokens: int = Field(default=16, ge=1, le=4096)
    failures_to_open: int = Field(default=3, ge=1, le=1000, description="a pool endpoint's breaker opens after "
                                                                         "this many failures in a row")
    cooldown_s: float = Field(default=5.0, gt=0.0, le=3600.0, description="an open breaker's wait before a probe")
    health_interval_s: float = Field(default=2.0, ge=0.0, le=3600.0, description="pool health checks (0: none)")


class VLLMOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tensor_parallel_size: int = Field(default=1, ge=1)
    gpu_memory_utilization: float = Field(default=0.85, gt=0.0, le=1.0)
    max_model_len: int | None = Field(default=None, ge=2)
    max_logprobs: int = Field(default=20, ge=1)


def _engine_fields() -> dict:
    fields = {}
    for cls in (CacheConfig, SchedulerConfig, EngineConfig):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in ("cache", "scheduler"):
                continue
            fields[f.name] = (hints[f.name], f.default)
    return fields


BuiltinOptions = create_model(
    "BuiltinOptions", __config__=ConfigDict(extra="forbid"),
    timeout_s=(float | None, Field(default=600.0, gt=0.0, description="longest a batch may take")),
    **_engine_fields())
BuiltinOptions.__doc__ = "The built-in engine: EngineConfig's fields (cache, scheduler, engine) and timeout_s."

BACKEND_OPTIONS: dict[str, type[BaseModel]] = {"builtin": BuiltinOptions, "vllm": VLLMOptions,
                                                "openai": OpenAIOptions}
