"""Large-model backends behind one interface, resolved lazily by name so that choosing `openai`
never imports torch and choosing `builtin` never imports vLLM.

    backend = build_backend("builtin", model_dir="models/large-clinc150")
    results = backend.choose(prompts, choices=["<|balance|>", "<|transfer|>"])
"""

from __future__ import annotations

import importlib

from serving.backends.base import ChoiceResult, LLMBackend

BACKENDS: dict[str, tuple[str, str]] = {
    "builtin": ("serving.backends.builtin", "BuiltinBackend"),
    "vllm": ("serving.backends.vllm_backend", "VLLMBackend"),
    "openai": ("serving.backends.openai_http", "OpenAIBackend"),
}


def build_backend(name: str, **options) -> LLMBackend:
    if name not in BACKENDS:
        raise ValueError(f"backend: unknown {name!r}; known: {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name]
    return getattr(importlib.import_module(module), cls)(**options)


__all__ = ["BACKENDS", "ChoiceResult", "LLMBackend", "build_backend"]
