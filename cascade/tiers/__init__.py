"""Tier kinds, resolved lazily: `kind -> (module, factory)` so that naming a kind in a config
imports only what that kind needs (the large-model tier may pull in heavy clients)."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cascade.config import TierConfig
    from cascade.types import Tier

TIER_KINDS: dict[str, tuple[str, str]] = {
    "rules": ("cascade.tiers.rules", "build_rules_tier"),
    "majority": ("cascade.tiers.majority", "build_majority_tier"),
    "student": ("cascade.tiers.student", "build_student_tier"),
    "ensemble": ("cascade.tiers.ensemble", "build_ensemble_tier"),  # students' probabilities averaged
    "llm": ("serving.llm_tier", "build_llm_tier"),  # no torch; its backends decide
}


def parse_tier_options(kind: str, options: dict):
    """Validate a tier's `options` with its kind's own model (each kind's module has a
    `parse_options`); raises pydantic's ValidationError or a ValueError naming the key."""
    module_name, _ = TIER_KINDS[kind]
    return importlib.import_module(module_name).parse_options(options)


def build_tier(spec: TierConfig, base_dir: Path) -> Tier:
    """Instantiate the tier a config entry describes; relative paths resolve against `base_dir`."""
    if spec.kind not in TIER_KINDS:
        raise ValueError(f"unknown tier kind {spec.kind!r}; known: {sorted(TIER_KINDS)}")
    module_name, factory = TIER_KINDS[spec.kind]
    module = importlib.import_module(module_name)
    return getattr(module, factory)(spec, base_dir)
