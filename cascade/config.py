"""`cascade.toml`: the task, the tiers in order with their thresholds, and serving limits.

    [task]
    name = "clinc150"

    [[tiers]]
    name = "rules"
    kind = "rules"
    path = "rules/clinc150.toml"     # relative to this file
    threshold = 0.0
    options = { timeout_ms = 20 }

    [[tiers]]
    name = "fallback"
    kind = "majority"
    path = "data/clinc150"

Validated by pydantic; every error names the key (`tiers[1].threshold`) and the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cascade.tomlfile import read_toml


class ConfigError(ValueError):
    """A cascade config that cannot be used; the message names the file and key."""


class TierConfig(BaseModel):
    """One tier: what it is (`kind`), where its artifact lives, and its confidence threshold."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="unique name, reported as Prediction.tier")
    kind: str = Field(description="tier kind, see cascade.tiers.TIER_KINDS")
    path: str | None = Field(default=None, description="artifact path, relative to the config file")
    threshold: float = Field(default=0.0, ge=0.0, le=2.0,
                             description="answer when confidence >= threshold (above 1: never answers, as "
                                         "calibration may choose); ignored for the last tier")
    label_thresholds: dict[str, float] = Field(
        default_factory=dict,
        description="label -> threshold, replacing `threshold` when the tier answers that label; calibration "
                    "sets one for the out-of-scope label, whose confidence means 'none of the intents'")
    options: dict[str, Any] = Field(default_factory=dict, description="kind-specific settings")
    max_queue_wait_s: float | None = Field(default=None, gt=0.0, le=3600.0,
                                           description="serving: longest estimated queue wait at this tier before "
                                                       "new work is refused (default: [serving] max_queue_wait_s)")
    llm_agreement: float | None = Field(default=None, ge=0.0, le=1.0,
                                        description="the share of this tier's answers the large model agrees with, "
                                                    "as calibrated; audit sampling flags drift below it")

    @field_validator("label_thresholds")
    @classmethod
    def _thresholds_in_range(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in value.items() if not 0.0 <= v <= 2.0}
        if bad:
            raise ValueError(f"thresholds must be in [0, 2] (above 1: never answers), got {bad}")
        return value

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        from cascade.tiers import TIER_KINDS

        if kind not in TIER_KINDS:
            raise ValueError(f"unknown tier kind {kind!r}; known: {', '.join(sorted(TIER_KINDS))}")
        return kind

    def resolve_path(self, base_dir: Path) -> Path:
        assert self.path is not None
        p = Path(self.path)
        return p if p.is_absolute() else base_dir / p


class TaskConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    description: str = ""
    kind: Literal["classify", "extract", "joint"] = Field(
        default="classify", description="a label, fields (name -> spans of the text), or both")
    metric: Literal["accuracy", "exact_match", "joint"] | None = Field(
        default=None, description="what calibration holds to its target: label accuracy, fields exact "
                                  "match, or both right; default: accuracy / exact_match / joint by kind")

    @model_validator(mode="after")
    def _metric_fits_kind(self) -> TaskConfig:
        from cascade.metrics import METRICS

        if self.metric is not None and self.metric not in METRICS[self.kind]:
            raise ValueError(f"metric: {self.metric!r} does not apply to a {self.kind} task "
                             f"(one of {', '.join(METRICS[self.kind])})")
        return self

    @property
    def target_metric(self) -> str:
        from cascade.metrics import default_metric

        return self.metric or default_metric(self.kind)


class ServingConfig(BaseModel):
    """Limits of the HTTP endpoint and the batch runner."""

    model_config = ConfigDict(extra="forbid")

    max_text_chars: int = Field(default=4000, ge=1, le=1_000_000, description="longest text accepted (413 past it)")
    max_batch_items: int = Field(default=256, ge=1, le=100_000, description="most texts in one request (413 past it)")
    max_queue: int = Field(default=1024, ge=1, le=1_000_000, description="queued items before 429")
    micro_batch_ms: float = Field(default=5.0, ge=0.0, le=1000.0, description="how long a tier waits to fill a batch")
    micro_batch_size: int = Field(default=32, ge=1, le=4096, description="largest batch a tier runs at once")
    tier_timeout_s: float = Field(default=30.0, gt=0.0, le=3600.0,
                                  description="most one tier batch may take; backends bound their waits by it")
    request_timeout_s: float = Field(default=10.0, gt=0.0, le=3600.0,
                                     description="a request's deadline (a request may set a shorter or longer "
                                                 "`timeout_s`, up to max_request_timeout_s); past it: the best "
                                                 "earlier answer, degraded, or 504")
    max_request_timeout_s: float = Field(default=300.0, gt=0.0, le=3600.0,
                                         description="largest `timeout_s` a request may ask for")
    max_queue_wait_s: float = Field(default=1.0, gt=0.0, le=3600.0,
                                    description="longest estimated queue wait at a tier before new work is refused "
                                                "(429 at the first tier; `overload` at later ones)")
    max_loop_lag_s: float = Field(default=0.05, gt=0.0, le=60.0,
                                  description="when the server's event loop runs this far behind (CPU saturated), "
                                              "new requests get 429 before their body is read")
    overload: Literal["degrade", "reject"] = Field(
        default="degrade", description="an item a later tier cannot take in time: its earlier answer, degraded "
                                       "(degrade), or a 429 for its request (reject)")
    max_body_bytes: int = Field(default=1_048_576, ge=1024, le=1 << 30, description="largest request body (413)")
    max_prompts: int = Field(default=64, ge=1, le=100_000,
                             description="OpenAI routes: most prompts in one /v1/completions request (413)")
    max_llm_requests: int = Field(default=256, ge=1, le=1_000_000,
                                  description="OpenAI routes: engine requests in flight before 429")
    public_paths: list[str] = Field(default_factory=lambda: ["/healthz", "/readyz", "/health"],
                                    description="routes answered without an API key when keys are set")
    api_keys_env: str = Field(default="CASCADE_API_KEYS", min_length=1,
                              description="env var with comma-separated API keys; when set, requests need one")
    retry_after_s: int = Field(default=1, ge=1, le=3600, description="Retry-After sent with 429")


class TrafficLogConfig(BaseModel):
    """[traffic_log]: every answered item logged for the flywheel (serving/traffic_log.py)."""

    model_config = ConfigDict(extra="forbid")

    dir: str = Field(min_length=1, description="where segments go; relative paths resolve against cascade.toml")
    text: Literal["keep", "hash", "drop"] = Field(default="keep", description="the text itself, its sha256, or "
                                                                               "nothing")
    segment_mb: float = Field(default=64.0, gt=0.0, le=1 << 20, description="a segment rotates past this size")
    max_total_mb: float = Field(default=4096.0, gt=0.0, le=1 << 30,
                                description="oldest segments are deleted past this total")
    fsync_s: float = Field(default=1.0, ge=0.0, le=3600.0, description="how often written entries are fsynced")
    queue_items: int = Field(default=100_000, ge=1, le=100_000_000,
                             description="entries waiting for the writer before new ones are dropped")
    llm_top_k: int = Field(default=5, ge=0, le=1000, description="the large model's most probable labels logged "
                                                                  "with their probabilities (the flywheel's soft "
                                                                  "label); 0: its answer only")


class AuditConfig(BaseModel):
    """[audit]: a share of the cheap tiers' answers also asked of the large model, in the
    background, for live agreement and drift (serving/audit.py)."""

    model_config = ConfigDict(extra="forbid")

    share: float = Field(default=0.02, ge=0.0, le=1.0, description="share of cheap-tier answers audited")
    max_per_s: float = Field(default=2.0, gt=0.0, le=1e6, description="audits per second at most (the budget)")
    max_llm_wait_s: float = Field(default=0.05, ge=0.0, le=3600.0,
                                  description="low priority: audit only while the large model's queue would start "
                                              "it within this")
    timeout_s: float = Field(default=30.0, gt=0.0, le=3600.0, description="an audit's own deadline")
    confidence: float = Field(default=0.95, gt=0.5, lt=1.0, description="of the one-sided drift bound")


class CascadeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: TaskConfig
    tiers: list[TierConfig] = Field(min_length=1)
    serving: ServingConfig = Field(default_factory=ServingConfig)
    traffic_log: TrafficLogConfig | None = None
    audit: AuditConfig | None = None


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def parse_config(data: dict, where: str) -> CascadeConfig:
    try:
        config = CascadeConfig.model_validate(data)
    except ValidationError as exc:
        lines = [f"{where}: {_loc(e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ConfigError("invalid cascade config:\n  " + "\n  ".join(lines)) from exc
    check_tier_options(config, where)
    seen: set[str] = set()
    for i, tier in enumerate(config.tiers):
        if tier.name in seen:
            raise ConfigError(f"invalid cascade config:\n  {where}: tiers[{i}].name: {tier.name!r} "
                              "is used by an earlier tier; names must be unique")
        seen.add(tier.name)
    return config


def check_tier_options(config: CascadeConfig, where: str) -> None:
    """Every tier's `options` against its kind's typed model: a misspelt or mistyped key is an
    error naming the file, the tier and the key."""
    from cascade.tiers import parse_tier_options

    lines = []
    for i, tier in enumerate(config.tiers):
        at = f"{where}: tiers[{i}] ({tier.name!r}).options"
        try:
            parse_tier_options(tier.kind, tier.options)
        except ValidationError as exc:
            for e in exc.errors():
                key = _loc(e["loc"]) if e["loc"] else ""
                msg = "unknown key (misspelt?)" if e["type"] == "extra_forbidden" else e["msg"]
                lines.append(f"{at}.{key}: {msg}" if key else f"{at}: {msg}")
        except ValueError as exc:
            lines.append(f"{at}: {exc}")
    if lines:
        raise ConfigError("invalid cascade config:\n  " + "\n  ".join(lines))


def load_config(path: str | Path) -> CascadeConfig:
    path = Path(path)
    return parse_config(read_toml(path, ConfigError, "config"), str(path))


THRESHOLD_DECIMALS = 6


def readable_threshold(t: float) -> float:
    """A threshold as a person reads it: 6 decimals, rounded *up*, so the rounded config never
    lets a tier answer an item the calibrated one would have passed on (0.9107564635 -> 0.910757)."""
    import math

    scale = 10**THRESHOLD_DECIMALS
    return min(1.000001, math.ceil(t * scale - 1e-9) / scale)


def dump_config(config: CascadeConfig, path: str | Path) -> None:
    """Write a config atomically (used by `cascade calibrate` to store thresholds), thresholds
    rounded up to `THRESHOLD_DECIMALS`."""
    path = Path(path)
    data = config.model_dump(exclude_none=True)
    for tier in data["tiers"]:
        tier["threshold"] = readable_threshold(tier["threshold"])
        tier["label_thresholds"] = {k: readable_threshold(v) for k, v in tier.get("label_thresholds", {}).items()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(tomli_w.dumps(data), encoding="utf-8")
    tmp.replace(path)


def build_cascade(config: CascadeConfig, base_dir: str | Path, on_tier=None, make_tier=None):
    """Instantiate every tier and the router; paths resolve against `base_dir` (the config's dir).
    `on_tier(name, tier_or_None)` hears each tier before (None) and after it loads; `make_tier(spec,
    base_dir)` builds a tier in place of `cascade.tiers.build_tier` (e.g. one living elsewhere)."""
    from cascade.router import Cascade
    from cascade.tiers import build_tier

    base_dir = Path(base_dir)
    tiers = []
    for spec in config.tiers:
        if on_tier is not None:
            on_tier(spec.name, None)
        tiers.append((make_tier or build_tier)(spec, base_dir))
        if on_tier is not None:
            on_tier(spec.name, tiers[-1])
    return Cascade(tiers, [spec.threshold for spec in config.tiers],
                   label_thresholds=[dict(spec.label_thresholds) for spec in config.tiers])
