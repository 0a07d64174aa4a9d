"""The FastAPI apps: `create_app` (`cascade serve`: the cascade, and the large model's OpenAI
routes when its tier runs in-process) and `create_llm_app` (`cascade llm serve`: one large model).
Route groups are built by their owners (serving/openai_api.py) and mounted here. Errors are JSON
`{"error": {"message", "type", "param"}}`, with a message that names the field.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field


def _field(loc: tuple) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        field = _field(first["loc"])
        msgs = "; ".join(f"{_field(e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
        return JSONResponse({"error": {"message": msgs, "type": "invalid_request_error", "param": field}},
                            status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, dict) else {"message": str(exc.detail)}
        body = {"message": detail.get("message", ""), "type": "invalid_request_error", "param": detail.get("param")}
        return JSONResponse({"error": body}, status_code=exc.status_code, headers=exc.headers)


def create_llm_app(model_dir: str | Path, model_name: str | None = None, engine=None) -> FastAPI:
    """An app serving one large model from an HF dir through the built-in engine."""
    from serving.engine.async_engine import AsyncEngine
    from serving.engine.engine import LLMEngine
    from serving.openai_api import build_openai_router

    model_dir = Path(model_dir)
    async_engine = engine or AsyncEngine(LLMEngine.from_model_dir(model_dir))
    app = FastAPI(title="cascade large model")
    install_error_handlers(app)
    app.include_router(build_openai_router(async_engine, model_name or model_dir.name, model_dir))

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    app.state.engine = async_engine
    return app


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(default=None, description="one text")
    texts: list[str] | None = Field(default=None, description="several texts, answered in order")
    explain: bool = Field(default=False, description="add every tier's prediction on the way")


def create_app(config_path: str | Path, service=None) -> FastAPI:
    """`cascade serve`: POST /v1/classify, /healthz, /readyz, /metrics; and the large model's
    OpenAI routes when its tier runs the built-in engine in this process."""
    import os
    from contextlib import asynccontextmanager

    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from cascade.config import build_cascade, load_config
    from serving.service import CascadeService, Overloaded

    config_path = Path(config_path)
    config = load_config(config_path)
    limits = config.serving
    keys = {k.strip() for k in os.environ.get(limits.api_keys_env, "").split(",") if k.strip()}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        nonlocal service
        if service is None:
            service = CascadeService(build_cascade(config, config_path.parent), limits.max_queue,
                                     limits.micro_batch_size, limits.micro_batch_ms, limits.tier_timeout_s)
        await service.start()
        app.state.service = service
        _mount_llm_routes(app, service, check_key)
        yield
        await service.stop()  # uvicorn has drained in-flight requests before this runs

    app = FastAPI(title="cascade", lifespan=lifespan)
    install_error_handlers(app)

    def check_key(request: Request) -> None:
        if not keys:
            return
        auth = request.headers.get("authorization", "")
        given = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else request.headers.get("x-api-key")
        if given not in keys:
            raise HTTPException(401, detail={"message": "missing or unknown API key (Authorization: Bearer KEY)",
                                             "param": "authorization"})

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest, request: Request):
        check_key(request)
        if (body.text is None) == (body.texts is None):
            raise HTTPException(422, detail={"message": "give exactly one of `text` and `texts`", "param": "text"})
        texts = [body.text] if body.text is not None else body.texts
        if not texts:
            raise HTTPException(422, detail={"message": "texts: empty list", "param": "texts"})
        if len(texts) > limits.max_batch_items:
            raise HTTPException(413, detail={"message": f"texts: {len(texts)} items, the limit is "
                                                        f"{limits.max_batch_items}", "param": "texts"})
        for i, t in enumerate(texts):
            if len(t) > limits.max_text_chars:
                field = "text" if body.text is not None else f"texts[{i}]"
                raise HTTPException(413, detail={"message": f"{field}: {len(t)} characters, the limit is "
                                                            f"{limits.max_text_chars}", "param": field})
        svc = request.app.state.service
        try:
            preds = await svc.classify(texts, body.explain)
        except Overloaded as exc:
            svc.metrics.requests.labels("429").inc()
            raise HTTPException(429, detail={"message": f"overloaded: {exc}; retry later"},
                                headers={"Retry-After": str(limits.retry_after_s)}) from exc
        except Exception:
            svc.metrics.requests.labels("500").inc()
            raise
        svc.metrics.requests.labels("200").inc()
        answers = [p.to_dict() for p in preds]
        return answers[0] if body.text is not None else {"predictions": answers}

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

    return app


def _mount_llm_routes(app: FastAPI, service, check_key) -> None:
    """An llm tier on the built-in engine shares its engine with OpenAI-compatible routes,
    behind the same API keys as /v1/classify."""
    from fastapi import Depends

    from serving.openai_api import build_openai_router

    for tier in service.cascade.tiers:
        backend = getattr(tier, "backend", None)
        engine = getattr(backend, "async_engine", None)
        if engine is not None:
            app.include_router(build_openai_router(engine, backend.model_dir.name, backend.model_dir),
                               dependencies=[Depends(check_key)])
            return
