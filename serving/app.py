"""The FastAPI apps: `create_app` (`cascade serve`: the cascade, and the large model's OpenAI
routes when its tier runs in-process) and `create_llm_app` (`cascade llm serve`: one large model).
Route groups are built by their owners (serving/openai_api.py) and mounted here. Both share the
edge in serving/http.py (one error shape `{"error": {"message", "type", "code", "param"}}`, API
keys on every route but the probes, a body byte limit), the access log and request metrics of
serving/observability.py, and readiness from serving/startup.py: the port opens at once, the
models load behind it.

    CASCADE_CONFIG=cascade.toml uvicorn --factory serving.app:create_app --port 8000
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from cascade.config import ConfigError, ServingConfig
from cascade.textcheck import TextError, clean_text
from cascade.types import ItemFailure, Prediction
from serving.http import ERROR_RESPONSES, APIError, EdgeMiddleware, api_keys_from_env, install_error_handlers
from serving.observability import AccessLog, EngineCollector, HTTPMetrics
from serving.startup import Startup, exit_on_load_error, load_in_background, warm_up
from serving.traffic_log import version_id

# An item without an answer: the status its request gets.
FAILURE_STATUS = {"item_failed": 422, "deadline_exceeded": 504, "overloaded": 429, "tier_failed": 503}
CONFIG_ENV = "CASCADE_CONFIG"  # the config `create_app()` serves when called with none (uvicorn --factory)


# --- /v1/classify: the request and response models (in the OpenAPI schema) --------------------


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(default=None, description="one text")
    texts: list[str] | None = Field(default=None, description="several texts, answered in order")
    input: str | list[str] | None = Field(default=None, description="`text` or `texts` under vLLM's /classify name")
    model: str | None = Field(default=None, description="optional; when given, must be the served task's name")
    top_k: int | None = Field(default=None, ge=1, le=1000,
                              description="add each result's `scores`: its k most likely labels, sorted")
    explain: bool = Field(default=False, description="add every tier's prediction on the way (`trail`)")
    timeout_s: float | None = Field(default=None, gt=0.0, le=3600.0,
                                    description="this request's deadline in seconds (default: [serving] "
                                                "request_timeout_s)")


class LabelScore(BaseModel):
    label: str
    score: float = Field(description="the answering tier's probability for this label")


class TierPrediction(BaseModel):
    tier: str
    label: str
    confidence: float


class ClassifyResult(BaseModel):
    index: int = Field(description="the text's position in the request")
    label: str
    confidence: float = Field(description="calibrated probability that `label` is right (6 decimals)")
    tier: str = Field(description="the tier that answered")
    degraded: bool = Field(description="an earlier tier's answer, given because a later one failed or was busy")
    fields: dict[str, list[str]] = Field(default_factory=dict, description="extracted fields (extract/joint "
                                         "tasks): name -> values, each a span of the text, in text order")
    latency_ms: float = Field(description="time in the tiers, queueing included (3 decimals)")
    scores: list[LabelScore] | None = Field(default=None, description="with `top_k`: most likely first")
    trail: list[TierPrediction] | None = Field(default=None, description="with `explain`: every tier on the way")


class Usage(BaseModel):
    items: int
    tiers: dict[str, int] = Field(description="items answered by each tier (every tier listed)")


class ClassifyResponse(BaseModel):
    id: str
    object: Literal["classification"] = "classification"
    created: int = Field(description="Unix time")
    model: str = Field(description="the served task's name")
    results: list[ClassifyResult]
    usage: Usage


def result_of(index: int, p: Prediction, top_k: int | None) -> ClassifyResult:
    scores = None
    if top_k is not None:
        dist = p.scores or {p.label: p.confidence}  # a rule has no distribution: its one answer
        ranked = sorted(dist.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]
        scores = [LabelScore(label=k, score=round(float(v), 6)) for k, v in ranked]
    trail = None if p.trail is None else [
        TierPrediction(tier=t.tier, label=t.label, confidence=round(float(t.confidence), 6)) for t in p.trail]
    return ClassifyResult(index=index, label=p.label, confidence=round(float(p.confidence), 6), tier=p.tier,
                          degraded=p.degraded, fields=dict(p.fields or {}), latency_ms=round(p.latency_ms, 3),
                          scores=scores, trail=trail)


def checked_texts(body: ClassifyRequest, limits: ServingConfig) -> tuple[list[str], list[str]]:
    """The request's texts, cleaned, and each one's field name for errors (`texts[1]`)."""
    given = [(name, value) for name, value in (("text", body.text), ("texts", body.texts), ("input", body.input))
             if value is not None]
    if len(given) != 1:
        raise APIError(422, "missing_text", "give exactly one of `text`, `texts` and `input`",
                       given[1][0] if len(given) > 1 else "text")
    name, value = given[0]
    texts = [value] if isinstance(value, str) else value
    names = [name] if isinstance(value, str) else [f"{name}[{i}]" for i in range(len(texts))]
    if not texts:
        raise APIError(422, "empty_list", f"{name}: empty list", name)
    if len(texts) > limits.max_batch_items:
        raise APIError(413, "too_many_items", f"{name}: {len(texts)} items, the limit is {limits.max_batch_items}",
                       name)
    if body.timeout_s is not None and body.timeout_s > limits.max_request_timeout_s:
        raise APIError(422, "timeout_too_long", f"timeout_s: {body.timeout_s} is over the limit of "
                                                f"{limits.max_request_timeout_s}", "timeout_s")
    out = []
    for field, t in zip(names, texts):
        if len(t) > limits.max_text_chars:
            raise APIError(413, "text_too_long", f"{field}: {len(t)} characters, the limit is "
                                                 f"{limits.max_text_chars}", field)
        try:
            out.append(clean_text(t, field))
        except TextError as exc:
            raise APIError(422, exc.code, str(exc), field) from None
    return out, names


# --- cascade serve ---------------------------------------------------------------------------


def create_app(config_path: str | Path | None = None, service=None, on_load_error=None) -> FastAPI:
    """`cascade serve`: POST /v1/classify, /healthz, /readyz, /metrics; and the large model's
    OpenAI routes when its tier runs the built-in engine in this process.

    With no `service`, the tiers load in the background once the server starts (`/readyz` says
    how far); `on_load_error(message)` hears a failed load (default: log it and end the
    process). With no `config_path`, the config is `$CASCADE_CONFIG` (`uvicorn --factory`)."""
    from contextlib import asynccontextmanager

    from cascade.config import build_cascade, load_config
    from serving.service import CascadeService, Overloaded

    if config_path is None:
        if not os.environ.get(CONFIG_ENV):
            raise ConfigError(f"no config: pass create_app(config_path) or set {CONFIG_ENV}=path/to/cascade.toml")
        config_path = os.environ[CONFIG_ENV]
    config_path = Path(config_path)
    config = load_config(config_path)  # its keys and types fail here, before anything listens
    limits = config.serving
    startup = Startup([spec.name for spec in config.tiers])
    registry = CollectorRegistry()

    def load():
        def on_tier(name, tier):
            if tier is None:
                startup.set(name, "loading")
            else:
                startup.set(name, "warming")
                warm_up(tier)
                startup.set(name, "ready")

        return build_cascade(config, config_path.parent, on_tier=on_tier)

    async def loaded(svc) -> None:
        import gc

        # Everything loaded (tokenizers, rule packs, sessions) lives as long as the process: out
        # of the collector's reach, a full collection under load no longer walks it.
        gc.freeze()
        await svc.start()
        app.state.service = svc
        _mount_llm_routes(app, svc, limits, registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = None
        if service is not None:
            for name in startup.state:
                startup.state[name] = "ready"
            await loaded(service)
        else:
            task = await load_in_background(startup, lambda: CascadeService.from_config(
                load(), config, config_path.parent, version_id(config_path)), loaded,
                                            on_load_error or exit_on_load_error)
        yield
        if task is not None and not task.done():
            task.cancel()
        svc = getattr(app.state, "service", None)
        if svc is not None:
            await svc.stop()  # uvicorn has drained in-flight requests before this runs

    app = FastAPI(title="cascade", version=_version(), lifespan=lifespan, responses=ERROR_RESPONSES)
    app.state.startup = startup
    app.state.version = (config, config_path)  # what is served now: a reload replaces it
    install_error_handlers(app)

    @app.post("/v1/classify", response_model=ClassifyResponse, response_model_exclude_none=True,
              responses={404: ERROR_RESPONSES[422], 504: ERROR_RESPONSES[422]})
    async def classify(body: ClassifyRequest, request: Request, response: Response):
        svc = request.app.state.service  # this request finishes on it, even if a reload comes meanwhile
        if svc.version is not None:  # the version that answers, as its traffic-log entries record it
            response.headers["X-Cascade-Version"] = svc.version
        model_name = request.app.state.version[0].task.name
        if body.model is not None and body.model != model_name:
            raise APIError(404, "model_not_found", f"model: {body.model!r} is not served here (this is "
                                                   f"{model_name!r})", "model")
        limits = request.app.state.version[0].serving  # the served version's own limits
        texts, names = checked_texts(body, limits)
        try:
            answers = await svc.classify(texts, body.explain, body.timeout_s, request.scope.get("state", {}).get(
                "request_id"))
        except Overloaded as exc:
            raise APIError(429, "overloaded", f"overloaded: {exc}; retry later", None,
                           {"Retry-After": str(int(exc.retry_after_s))}) from exc
        for field, a in zip(names, answers):
            if isinstance(a, ItemFailure):
                status = FAILURE_STATUS.get(a.code, 503)
                headers = {"Retry-After": str(limits.retry_after_s)} if status in (429, 503) else None
                raise APIError(status, a.code, f"{field}: {a.message}", field, headers)
        per_tier = {t.name: 0 for t in svc.cascade.tiers}
        for a in answers:
            per_tier[a.tier] = per_tier.get(a.tier, 0) + 1
        return ClassifyResponse(id=f"cls-{uuid.uuid4().hex}", created=int(time.time()), model=model_name,
                                results=[result_of(i, a, body.top_k) for i, a in enumerate(answers)],
                                usage=Usage(items=len(answers), tiers=per_tier))

    reloading = asyncio.Lock()

    @app.post("/admin/reload", response_model=ReloadResponse, responses={403: ERROR_RESPONSES[422],
                                                                          409: ERROR_RESPONSES[422]})
    async def reload(request: Request, body: ReloadRequest | None = None):
        """Move to another cascade version (its cascade.toml; default: this config's path again,
        e.g. a symlink pointing at the promoted version) without losing a request: the new
        version loads beside the old one, takes every request from then on, and the old one
        stops once the requests it accepted have finished. Rollback is the same call."""
        if not api_keys_from_env(limits.api_keys_env) and (request.client is None or
                                                           request.client.host not in LOOPBACK):
            raise APIError(403, "forbidden", "/admin/reload: with no API keys set, only loopback clients may "
                                             "reload", None)
        if getattr(request.app.state, "service", None) is None:
            raise APIError(503, "not_ready", f"/admin/reload: {startup.not_ready() or 'starting'}; retry later",
                           None, {"Retry-After": str(limits.retry_after_s)})
        if reloading.locked():
            raise APIError(409, "reload_in_progress", "/admin/reload: a reload is already running", None)
        async with reloading:
            return await _reload(request.app, Path(body.config) if body and body.config else None, limits)

    @app.get("/healthz")
    async def healthz() -> dict:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        """Readiness: 200 once every tier is loaded and warm and the service takes requests; 503
        with each tier's state before."""
        status, body = startup.report()
        if status == 200 and getattr(app.state, "service", None) is None:  # tiers warm, service starting
            status, body = 503, {**body, "status": "loading", "service": "starting"}
        return JSONResponse(body, status_code=status)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        svc = getattr(request.app.state, "service", None)
        text = generate_latest(registry) + (generate_latest(svc.metrics.registry) if svc is not None else b"")
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    def shed(scope) -> str | None:
        svc = getattr(app.state, "service", None)
        # the cascade's own route and the large model's OpenAI routes mounted beside it
        return svc.shed_now() if svc is not None and scope["path"].startswith("/v1/") else None

    def unavailable(scope) -> str | None:
        if not scope["path"].startswith("/v1/"):
            return None
        why = startup.not_ready()
        if why is None and getattr(app.state, "service", None) is None:
            why = "the service is starting"
        return why

    return _with_edge(app, limits, HTTPMetrics(registry, "cascade serve"), shed, unavailable)


LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    config: str | None = Field(default=None, description="the version's cascade.toml (default: the served path)")


class ReloadResponse(BaseModel):
    status: Literal["reloaded"] = "reloaded"
    config: str
    tiers: list[str]
    reused: list[str] = Field(description="tiers handed on unchanged (a large model is not loaded twice)")
    drained: bool = Field(description="every request the old version accepted finished on it in time")
    seconds: float


async def _reload(app: FastAPI, path: Path | None, limits: ServingConfig) -> ReloadResponse:
    from cascade.config import build_cascade, load_config
    from serving.service import CascadeService

    t0 = time.monotonic()
    old_config, old_path = app.state.version
    path = path or old_path
    old = app.state.service
    reused, built = [], []

    def make_tier(spec, base_dir):
        """An llm tier whose kind, options and model path are unchanged is handed on, so a new
        student version does not reload the large model (nor drop the OpenAI routes on it)."""
        from cascade.tiers import build_tier

        for old_spec, tier in zip(old_config.tiers, old.cascade.tiers):
            before = old_spec.resolve_path(old_path.parent).resolve() if old_spec.path else None
            after = spec.resolve_path(base_dir).resolve() if spec.path else None
            same = (old_spec.kind, old_spec.options, before) == (spec.kind, spec.options, after)
            if spec.kind == "llm" and same and old_spec.name == spec.name:
                reused.append(tier)
                return tier
        built.append(build_tier(spec, base_dir))
        return built[-1]

    def load():
        config = load_config(path)
        return config, CascadeService.from_config(build_cascade(config, path.parent, make_tier=make_tier), config,
                                                  path.parent, version_id(path))

    def close_built() -> None:
        for tier in built:  # what a failed or refused reload loaded: engine threads, pools, models
            close = getattr(tier, "close", None)
            if callable(close):
                close()

    try:
        config, new = await asyncio.to_thread(load)
    except Exception as exc:  # the old version keeps serving; the caller hears why
        from serving.startup import load_error_message

        await asyncio.to_thread(close_built)
        raise APIError(422, "reload_failed", f"reload of {path}: {load_error_message(exc)}; still serving "
                                             f"{old_path}", "config") from None
    served = [t for t in old.cascade.tiers if callable(getattr(t, "shared_engine", None)) and t.shared_engine()]
    if any(not any(t is r for r in reused) for t in served):
        # the OpenAI routes are bound to that engine: they cannot move to a new one in place
        await asyncio.to_thread(close_built)
        if new.traffic_log is not None:
            new.traffic_log.close()
        raise APIError(409, "engine_in_use", f"reload of {path}: it changes the in-process large-model tier whose "
                                             "engine also serves the OpenAI routes; restart to change it (or keep "
                                             "its kind, path and options), still serving "
                                             f"{old_path}", "config")
    await new.start()
    app.state.service, app.state.version = new, (config, path)  # from here on, new requests go to `new`
    drained = await old.drain(limits.max_request_timeout_s)
    await old.stop(keep=reused)
    return ReloadResponse(config=str(path), tiers=[t.name for t in new.cascade.tiers],
                          reused=[t.name for t in reused], drained=drained, seconds=round(time.monotonic() - t0, 3))


def _version() -> str:
    from cascade import __version__

    return __version__


def _mount_llm_routes(app: FastAPI, service, limits: ServingConfig, registry: CollectorRegistry) -> None:
    """An llm tier on the built-in engine shares its engine with OpenAI-compatible routes,
    behind the same API keys and limits as /v1/classify; its engine metrics join /metrics."""
    from serving.openai_api import build_openai_router

    for tier in service.cascade.tiers:
        shared = tier.shared_engine() if callable(getattr(tier, "shared_engine", None)) else None
        if shared is not None:
            engine, model_dir = shared
            app.include_router(build_openai_router(engine, model_dir.name, model_dir, limits))
            app.openapi_schema = None  # regenerated with the new routes
            registry.register(EngineCollector(lambda: engine.engine))
            return


# --- cascade llm serve -----------------------------------------------------------------------


def create_llm_app(model_dir: str | Path, model_name: str | None = None, engine=None,
                   limits: ServingConfig | None = None, engine_config=None, on_load_error=None) -> FastAPI:
    """An app serving one large model from an HF dir through the built-in engine, like `vllm
    serve`: the OpenAI routes, `/health` (200 once the engine is loaded), `/healthz`, `/metrics`
    (the engine's state), an access log. API keys from `limits.api_keys_env` (CASCADE_API_KEYS)
    as in `cascade serve`. With no `engine`, it loads from `model_dir` (with `engine_config`) in
    the background once the server starts."""
    from contextlib import asynccontextmanager

    from serving.openai_api import build_openai_router

    limits = limits or ServingConfig()
    model_dir = Path(model_dir)
    name = model_name or model_dir.name
    startup = Startup(["engine"])
    registry = CollectorRegistry()

    def load():
        from serving.engine.async_engine import AsyncEngine
        from serving.engine.engine import LLMEngine

        startup.set("engine", "loading")
        return AsyncEngine(LLMEngine.from_model_dir(model_dir, engine_config))

    async def loaded(async_engine) -> None:
        app.state.engine = async_engine
        app.include_router(build_openai_router(async_engine, name, model_dir, limits))
        app.openapi_schema = None
        startup.set("engine", "ready")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = None
        if engine is not None:
            await loaded(engine)
        else:
            task = await load_in_background(startup, load, loaded, on_load_error or exit_on_load_error)
        yield
        if task is not None and not task.done():
            task.cancel()

    app = FastAPI(title="cascade large model", version=_version(), lifespan=lifespan, responses=ERROR_RESPONSES)
    app.state.engine = None
    app.state.startup = startup
    install_error_handlers(app)
    registry.register(EngineCollector(lambda: app.state.engine.engine if app.state.engine is not None else None))

    @app.get("/healthz")
    async def healthz() -> dict:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/health")
    async def health():
        """vLLM's probe: 200 once the engine is loaded and its thread runs, else 503."""
        status, body = startup.report()
        running = app.state.engine is not None and app.state.engine.alive()
        if status == 200 and not running:
            status, body = 503, {"status": "failed", "error": "the engine thread has stopped"}
        return JSONResponse(body, status_code=status)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    def unavailable(scope) -> str | None:
        return startup.not_ready() if scope["path"].startswith("/v1/") else None

    # No loop-lag shedding here: the engine thread's Python work shares this loop's GIL by
    # design, and `max_llm_requests` is this server's admission.
    return _with_edge(app, limits, HTTPMetrics(registry, "cascade llm serve"), None, unavailable)


def _with_edge(app: FastAPI, limits: ServingConfig, metrics: HTTPMetrics, shed=None, unavailable=None):
    """The app behind auth, the body limit, readiness and early load shedding (ASGI middleware),
    and outermost the access log that sees every answer, the edge's own included."""
    app.add_middleware(EdgeMiddleware, keys=api_keys_from_env(limits.api_keys_env),
                       public_paths=list(limits.public_paths), max_body_bytes=limits.max_body_bytes, shed=shed,
                       unavailable=unavailable, retry_after_s=limits.retry_after_s)
    app.add_middleware(AccessLog, metrics=metrics, routes_of=app)
    return app
