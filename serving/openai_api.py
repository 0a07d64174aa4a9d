"""OpenAI-compatible routes for the large model: /v1/completions, /v1/chat/completions, /v1/models.

Request and response shapes are OpenAI's, so the official `openai` client works unchanged
(streaming too, as server-sent events). Extensions, named as vLLM names them so clients of
either work with both: `guided_choice` (constrain the output to one of these strings),
`guided_json` / `guided_regex` (JSON under a schema, a regex match) and `seed`. OpenAI's own
`response_format` (`text`, `json_object`, `json_schema`) is served on both routes, streaming
too. Route handlers are thin: validate, turn the body into `SamplingParams`, and read the
engine's outputs.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from cascade.config import ServingConfig
from serving.engine.async_engine import AsyncEngine
from serving.engine.engine import RequestError, RequestOutput
from serving.engine.sampling import SamplingParams
from serving.engine.structured import check_grammar
from serving.http import APIError, error_body

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _valid_unicode(value: str) -> str:
    """A lone surrogate would reach the tokenizer and fail there: refuse it here, by field."""
    for i, ch in enumerate(value):
        if "\ud800" <= ch <= "\udfff":
            raise ValueError(f"lone surrogate U+{ord(ch):04X} at character {i}; strings must be valid Unicode")
    return value


# Every string a client sends to the model.
Text = Annotated[str, AfterValidator(_valid_unicode)]


class JsonSchemaFormat(BaseModel):
    """OpenAI's `response_format.json_schema`: the schema under `schema`; `name` and `strict`
    are taken and not needed (the output always follows the schema)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = Field(default="response", max_length=64)
    description: str | None = None
    schema_: dict = Field(default_factory=dict, alias="schema")  # {} (no "schema") is any JSON
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs a `json_schema` object: {"name": ..., "schema": {...}}')
        return self


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=1, description="only n=1 is served")
    stream: bool = False
    stop: Text | Annotated[list[Text], Field(max_length=16)] | None = None
    # torch's generators take seeds in [-2^63, 2^64)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    guided_choice: list[Text] | None = Field(default=None, min_length=1, max_length=4096)
    response_format: ResponseFormat | None = None
    guided_json: dict | Text | None = None  # vLLM's: a schema, or a schema as JSON text
    guided_regex: Text | None = None

    def structured(self) -> tuple[str | None, dict | None, str | None]:
        """(the field that asked for a grammar, its JSON schema, its regex); (None, None, None)
        when none did. Raises ValueError naming the field when more than one constraint is given."""
        asked = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            asked.append(("response_format", {"type": "object"}, None))
        elif rf is not None and rf.type == "json_schema":
            asked.append(("response_format.json_schema.schema", rf.json_schema.schema_, None))
        if self.guided_json is not None:
            schema = self.guided_json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError as exc:
                    raise ValueError(f"guided_json: not valid JSON ({exc})") from None
            asked.append(("guided_json", schema, None))
        if self.guided_regex is not None:
            asked.append(("guided_regex", None, self.guided_regex))
        if self.guided_choice is not None:
            asked.append(("guided_choice", None, None))
        if len(asked) > 1:
            raise ValueError(f"{asked[1][0]}: give at most one of response_format (json), guided_json, guided_regex "
                             f"and guided_choice")
        return asked[0] if asked and asked[0][0] != "guided_choice" else (None, None, None)

    def sampling(self, default_max: int, logprobs: int | None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        _, schema, regex = self.structured()
        return SamplingParams(max_tokens=self.max_tokens or default_max, temperature=self.temperature,
                              top_p=self.top_p, seed=self.seed, stop=stop, logprobs=logprobs,
                              choices=self.guided_choice, json_schema=schema, regex=regex)


class CompletionRequest(SamplingFields):
    prompt: Text | list[Text] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: Literal[False] = False


class ContentPart(BaseModel):
    """One part of a chat message's content; only text parts are read (others are ignored)."""

    model_config = ConfigDict(extra="ignore")

    type: str
    text: Text | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Text | list[ContentPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content if part.type == "text")


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


def load_chat_template(model_dir: Path) -> str:
    """The model's own template (chat_template.jinja, or tokenizer_config.json's), else ChatML."""
    f = model_dir / "chat_template.jinja"
    if f.exists():
        return f.read_text()
    cfg = model_dir / "tokenizer_config.json"
    if cfg.exists():
        tpl = json.loads(cfg.read_text()).get("chat_template")
        if isinstance(tpl, str):
            return tpl
    return CHATML


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


class AdmittedStream(StreamingResponse):
    """A stream that gives its admission slot back exactly once however it ends: finished, the
    client gone mid-stream, or gone before the first byte (a generator's own `finally` does not
    run if it never started)."""

    def __init__(self, content, release, **kwargs):
        super().__init__(content, **kwargs)
        self._release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


class EngineAdmission:
    """Engine requests in flight from these routes, bounded (429 past `max_llm_requests`), so
    that one client's burst cannot queue unbounded work in front of the cascade's own tier."""

    def __init__(self, limit: int):
        self.limit, self.in_flight = limit, 0

    def take(self, n: int) -> None:
        if self.in_flight + n > self.limit:
            raise APIError(429, "overloaded", f"overloaded: {self.in_flight} engine requests in flight, the limit "
                                              f"is {self.limit}; retry later", None, {"Retry-After": "1"})
        self.in_flight += n

    def give(self, n: int) -> None:
        self.in_flight -= n


def build_openai_router(engine: AsyncEngine, model_name: str, model_dir: Path | None = None,
                        limits: ServingConfig | None = None) -> APIRouter:
    """/v1/models, /v1/completions and /v1/chat/completions over `engine` (`OpenAIRoutes`)."""
    routes = OpenAIRoutes(engine, model_name, model_dir, limits or ServingConfig())
    router = APIRouter()
    router.get("/v1/models")(routes.models)
    router.post("/v1/completions")(routes.completions)
    router.post("/v1/chat/completions")(routes.chat)
    return router


class OpenAIRoutes:
    """The OpenAI-compatible handlers: the request checks they share, then one method per route."""

    def __init__(self, engine: AsyncEngine, model_name: str, model_dir: Path | None, limits: ServingConfig):
        import jinja2

        self.engine, self.model_name, self.limits = engine, model_name, limits
        self.admission = EngineAdmission(limits.max_llm_requests)
        env = jinja2.Environment(loader=jinja2.BaseLoader(), autoescape=False)
        self.chat_template = env.from_string(load_chat_template(model_dir) if model_dir else CHATML)
        self.tokenizer = engine.engine.tokenizer
        self.created = int(time.time())
        self.max_len = engine.engine.max_model_len

    # --- checks and pieces the routes share ---

    def check_model(self, name: str | None) -> None:
        if name not in (None, self.model_name):
            raise APIError(404, "model_not_found", f"model: {name!r} is not served here; this server has "
                                                   f"{self.model_name!r}", "model")

    def check_max_tokens(self, value: int | None, field: str) -> None:
        if value is not None and value > self.max_len:
            raise APIError(422, "max_tokens_too_large", f"{field}: {value} is more than the model's length "
                                                        f"{self.max_len}", field)

    def logprobs_json(self, out: RequestOutput) -> dict | None:
        if out.logprobs is None:
            return None
        decode = self.tokenizer.decode
        # Decoded strings, as OpenAI returns them (not the byte-level BPE symbols).
        toks = [decode([t], skip_special_tokens=False) for t in out.token_ids[: len(out.logprobs)]]
        return {"tokens": toks, "token_logprobs": [lp for lp, _ in out.logprobs],
                "top_logprobs": [{decode([t], skip_special_tokens=False): v for t, v in top.items()}
                                 for _, top in out.logprobs],
                "text_offset": []}

    @staticmethod
    def request_error(exc: RequestError, grammar_field: str | None) -> APIError:
        """The engine's refusal as the route's error: a grammar it cannot compile names the field
        the client used (`response_format.json_schema.schema`, `guided_json`, ...)."""
        message = str(exc)
        field = message.split(":")[0]
        if grammar_field is not None and field in ("json_schema", "regex"):
            return APIError(400, "invalid_response_format", grammar_field + message[len(field):], grammar_field)
        return APIError(400, "invalid_prompt", message, "prompt")

    async def check_structured(self, req: SamplingFields) -> str | None:
        """Compile the request's grammar, if it has one, before anything is queued or streamed
        (off the event loop: a large schema must not stall other requests). Returns the field
        that asked for it."""
        try:
            field, schema, regex = req.structured()
        except ValueError as exc:
            raise APIError(422, "invalid_sampling", str(exc), str(exc).split(":")[0]) from exc
        if field is not None:
            try:
                await asyncio.to_thread(check_grammar, schema, regex)
            except ValueError as exc:
                raise self.request_error(RequestError(str(exc)), field) from exc
        return field

    @staticmethod
    def sampling(req: SamplingFields, default_max_tokens: int, logprobs: int | None) -> SamplingParams:
        try:
            return req.sampling(default_max_tokens, logprobs)
        except ValueError as exc:
            raise APIError(422, "invalid_sampling", str(exc), str(exc).split(":")[0]) from exc

    async def final(self, prompt, params: SamplingParams, grammar_field: str | None = None) -> RequestOutput:
        last = None
        try:
            async for out in self.engine.stream(prompt, params):
                last = out
        except RequestError as exc:
            raise self.request_error(exc, grammar_field) from exc
        return last

    @staticmethod
    def usage(outs: list[RequestOutput]) -> dict:
        p, c = sum(o.prompt_tokens for o in outs), sum(len(o.token_ids) for o in outs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def streamed(self, events) -> AdmittedStream:
        """An SSE response holding one admission slot until the stream ends."""
        return AdmittedStream(events, lambda: self.admission.give(1), media_type="text/event-stream")

    # --- the routes ---

    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "cascade"}]}

    async def completions(self, req: CompletionRequest):
        self.check_model(req.model)
        prompts = req.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise APIError(422, "empty_list", "prompt: empty list", "prompt")
        if len(prompts) > self.limits.max_prompts:
            raise APIError(413, "too_many_prompts", f"prompt: {len(prompts)} prompts, the limit is "
                                                    f"{self.limits.max_prompts}", "prompt")
        self.check_max_tokens(req.max_tokens, "max_tokens")
        grammar_field = await self.check_structured(req)
        params = self.sampling(req, 16, req.logprobs)
        cid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            if len(prompts) != 1:
                raise APIError(422, "stream_one_prompt", "prompt: streaming takes one prompt", "prompt")
            self.admission.take(1)
            return self.streamed(self._completion_events(prompts[0], params, grammar_field, cid, now))
        outs = await self._complete_all(prompts, params, grammar_field)
        return {"id": cid, "object": "text_completion", "created": now, "model": self.model_name,
                "choices": [{"index": i, "text": o.text, "logprobs": self.logprobs_json(o),
                             "finish_reason": o.finish_reason} for i, o in enumerate(outs)],
                "usage": self.usage(outs)}

    async def _completion_events(self, prompt, params: SamplingParams, grammar_field: str | None, cid: str, now: int):
        try:
            async for out in self.engine.stream(prompt, params):
                if out.delta or out.finished:
                    yield sse({"id": cid, "object": "text_completion", "created": now, "model": self.model_name,
                               "choices": [{"index": 0, "text": out.delta, "logprobs": None,
                                            "finish_reason": out.finish_reason}]})
        except RequestError as exc:
            err = self.request_error(exc, grammar_field)
            yield sse(error_body(400, err.code, err.message, err.param))
        yield sse("[DONE]")

    async def _complete_all(self, prompts: list, params: SamplingParams, grammar_field: str | None
                            ) -> list[RequestOutput]:
        """Every prompt to its end, concurrently; one that fails (or a client that leaves) stops
        the others in the engine."""
        self.admission.take(len(prompts))
        tasks = [asyncio.ensure_future(self.final(p, SamplingParams(**vars(params)), grammar_field)) for p in prompts]
        try:
            return await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            self.admission.give(len(prompts))

    async def chat(self, req: ChatRequest):
        self.check_model(req.model)
        prompt = self.chat_template.render(messages=[{"role": m.role, "content": m.text()} for m in req.messages],
                                           add_generation_prompt=True, bos_token="", eos_token="")
        if req.logprobs:
            raise APIError(422, "unsupported", "logprobs: not served on chat completions; use /v1/completions "
                                               "with `logprobs`", "logprobs")
        self.check_max_tokens(req.max_tokens, "max_tokens")
        self.check_max_tokens(req.max_completion_tokens, "max_completion_tokens")
        grammar_field = await self.check_structured(req)
        params = self.sampling(req, min(256, self.max_len - 1), None)
        if req.max_completion_tokens:
            params.max_tokens = req.max_completion_tokens
        cid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        self.admission.take(1)
        if req.stream:
            return self.streamed(self._chat_events(prompt, params, grammar_field, cid, now))
        try:
            out = await self.final(prompt, params, grammar_field)
        finally:
            self.admission.give(1)
        return {"id": cid, "object": "chat.completion", "created": now, "model": self.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                             "logprobs": None, "finish_reason": out.finish_reason}],
                "usage": self.usage([out])}

    async def _chat_events(self, prompt: str, params: SamplingParams, grammar_field: str | None, cid: str, now: int):
        head = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": self.model_name}
        yield sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None}]})
        try:
            async for out in self.engine.stream(prompt, params):
                if out.delta:
                    yield sse({**head, "choices": [{"index": 0, "delta": {"content": out.delta},
                                                    "finish_reason": None}]})
                if out.finished:
                    yield sse({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": out.finish_reason}]})
        except RequestError as exc:
            err = self.request_error(exc, grammar_field)
            yield sse(error_body(400, err.code, err.message, "messages" if err.param == "prompt" else err.param))
        yield sse("[DONE]")
