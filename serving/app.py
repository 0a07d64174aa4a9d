"""The FastAPI apps: `create_app` (`cascade serve`: the cascade, and the large model's OpenAI
routes when its tier runs in-process) and `create_llm_app` (`cascade llm serve`: one large model).
Route groups are built by their owners (serving/openai_api.py) and mounted here. Both share the
edge in serving/http.py: one error shape `{"error": {"message", "type", "code", "param"}}`, API
keys on every route but the probes, a body byte limit.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from cascade.config import ServingConfig
from cascade.textcheck import TextError, clean_text
from cascade.types import ItemFailure
from serving.http import ERROR_RESPONSES, APIError, EdgeMiddleware, api_keys_from_env, install_error_handlers

# An item without an answer: the status its request gets.
FAILURE_STATUS = {"item_failed": 422, "deadline_exceeded": 504, "overloaded": 429, "tier_failed": 503}


def create_llm_app(model_dir: str | Path, model_name: str | None = None, engine=None,
                   limits: ServingConfig | None = None) -> FastAPI:
    """An app serving one large model from an HF dir through the built-in engine; API keys from
    `limits.api_keys_env` (CASCADE_API_KEYS) as in `cascade serve`."""
    from serving.engine.async_engine import AsyncEngine
    from serving.engine.engine import LLMEngine
    from serving.openai_api import build_openai_router

    limits = limits or ServingConfig()
    model_dir = Path(model_dir)
    async_engine = engine or AsyncEngine(LLMEngine.from_model_dir(model_dir))
    app = FastAPI(title="cascade large model", responses=ERROR_RESPONSES)
    install_error_handlers(app)
    app.include_router(build_openai_router(async_engine, model_name or model_dir.name, model_dir, limits))

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    app.state.engine = async_engine
    # No loop-lag shedding here: the engine thread's Python work shares this loop's GIL by
    # design, and `max_llm_requests` is this server's admission.
    return _with_edge(app, limits)


def _with_edge(app: FastAPI, limits: ServingConfig, shed=None):
    """The app behind auth, the body limit and early load shedding (ASGI middleware, outermost)."""
    app.add_middleware(EdgeMiddleware, keys=api_keys_from_env(limits.api_keys_env),
                       public_paths=list(limits.public_paths), max_body_bytes=limits.max_body_bytes, shed=shed,
                       retry_after_s=limits.retry_after_s)
    return app


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(default=None, description="one text")
    texts: list[str] | None = Field(default=None, description="several texts, answered in order")
    explain: bool = Field(default=False, description="add every tier's prediction on the way")
    timeout_s: float | None = Field(default=None, gt=0.0, le=3600.0,
                                    description="this request's deadline in seconds (default: [serving] "
                                                "request_timeout_s)")


def create_app(config_path: str | Path, service=None) -> FastAPI:
    """`cascade serve`: POST /v1/classify, /healthz, /readyz, /metrics; and the large model's
    OpenAI routes when its tier runs the built-in engine in this process."""
    from contextlib import asynccontextmanager

    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from cascade.config import build_cascade, load_config
    from serving.service import CascadeService, Overloaded

    config_path = Path(config_path)
    config = load_config(config_path)
    limits = config.serving

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        nonlocal service
        if service is None:
            service = CascadeService.from_config(build_cascade(config, config_path.parent), config)
        await service.start()
        app.state.service = service
        _mount_llm_routes(app, service, limits)
        yield
        await service.stop()  # uvicorn has drained in-flight requests before this runs

    app = FastAPI(title="cascade", lifespan=lifespan, responses=ERROR_RESPONSES)
    install_error_handlers(app)

    def checked_texts(body: ClassifyRequest) -> list[str]:
        if (body.text is None) == (body.texts is None):
            raise APIError(422, "missing_text", "give exactly one of `text` and `texts`", "text")
        texts = [body.text] if body.text is not None else body.texts
        if not texts:
            raise APIError(422, "empty_list", "texts: empty list", "texts")
        if len(texts) > limits.max_batch_items:
            raise APIError(413, "too_many_items", f"texts: {len(texts)} items, the limit is {limits.max_batch_items}",
                           "texts")
        if body.timeout_s is not None and body.timeout_s > limits.max_request_timeout_s:
            raise APIError(422, "timeout_too_long", f"timeout_s: {body.timeout_s} is over the limit of "
                                                    f"{limits.max_request_timeout_s}", "timeout_s")
        out = []
        for i, t in enumerate(texts):
            field = "text" if body.text is not None else f"texts[{i}]"
            if len(t) > limits.max_text_chars:
                raise APIError(413, "text_too_long", f"{field}: {len(t)} characters, the limit is "
                                                     f"{limits.max_text_chars}", field)
            try:
                out.append(clean_text(t, field))
            except TextError as exc:
                raise APIError(422, exc.code, str(exc), field) from None
        return out

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest, request: Request):
        svc = request.app.state.service
        try:
            texts = checked_texts(body)
            try:
                answers = await svc.classify(texts, body.explain, body.timeout_s)
            except Overloaded as exc:
                raise APIError(429, "overloaded", f"overloaded: {exc}; retry later", None,
                               {"Retry-After": str(int(exc.retry_after_s))}) from exc
            for i, a in enumerate(answers):
                if isinstance(a, ItemFailure):
                    field = "text" if body.text is not None else f"texts[{i}]"
                    status = FAILURE_STATUS.get(a.code, 503)
                    headers = {"Retry-After": str(limits.retry_after_s)} if status in (429, 503) else None
                    raise APIError(status, a.code, f"{field}: {a.message}", field, headers)
        except APIError as exc:
            svc.metrics.requests.labels(str(exc.status)).inc()
            raise
        except Exception:
            svc.metrics.requests.labels("500").inc()
            raise
        svc.metrics.requests.labels("200").inc()
        out = [p.to_dict() for p in answers]
        return out[0] if body.text is not None else {"predictions": out}

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request):
        svc = getattr(request.app.state, "service", None)
        if svc is None or not svc.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ready", "tiers": [t.name for t in svc.cascade.tiers]}

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        return Response(generate_latest(request.app.state.service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def shed(scope) -> str | None:
        svc = getattr(app.state, "service", None)
        # the cascade's own route and the large model's OpenAI routes mounted beside it
        return svc.shed_now() if svc is not None and scope["path"].startswith("/v1/") else None

    return _with_edge(app, limits, shed)


def _mount_llm_routes(app: FastAPI, service, limits: ServingConfig) -> None:
    """An llm tier on the built-in engine shares its engine with OpenAI-compatible routes,
    behind the same API keys and limits as /v1/classify."""
    from serving.openai_api import build_openai_router

    for tier in service.cascade.tiers:
        shared = tier.shared_engine() if callable(getattr(tier, "shared_engine", None)) else None
        if shared is not None:
            engine, model_dir = shared
            app.include_router(build_openai_router(engine, model_dir.name, model_dir, limits))
            return
