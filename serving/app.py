"""The FastAPI app. Route groups are built by their owners and mounted here:
the large model's OpenAI-compatible routes (serving/openai_api.py) when a large model is served
in-process. Errors are JSON `{"error": {"message", "type", "param"}}`, with a message that names
the field.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


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
