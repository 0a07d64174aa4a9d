"""What both apps tell their operators: an access log with request ids, request metrics by
status code, the build, and logs as text or JSON lines.

`AccessLog` is the outermost ASGI middleware, so it sees every request — the 401s, 413s and
early 429s the edge answers before any route runs included. Each request gets an id: the
client's `X-Request-ID` when it sends a sane one (printable ASCII, at most 128 characters),
else a fresh one; the id is echoed in the response's `X-Request-ID` and in the log line.
"""

from __future__ import annotations

import json
import logging
import platform
import re
import sys
import time
import uuid

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

# One series per counter, not a `_created` twin each: nothing here reads them, and they double
# what a scrape carries (prometheus_client's own switch; process-wide).
disable_created_metrics()

access_log = logging.getLogger("cascade.access")
REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")
DURATION_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)


class HTTPMetrics:
    """Every request by path and status code, and how long it took end to end."""

    def __init__(self, registry: CollectorRegistry, app_name: str):
        self.requests = Counter("cascade_requests_total", "HTTP requests by path and status code",
                                ["path", "code"], registry=registry)
        self.duration = Histogram("cascade_request_duration_seconds", "HTTP request time, first byte in to "
                                  "last byte out", ["path"], registry=registry, buckets=DURATION_BUCKETS)
        build = Gauge("cascade_build_info", "the running build (always 1)",
                      ["version", "app", "python", "onnxruntime"], registry=registry)
        build.labels(_version(), app_name, platform.python_version(), _onnxruntime_version()).set(1)


def _version() -> str:
    from cascade import __version__

    return __version__


def _onnxruntime_version() -> str:
    try:
        from importlib.metadata import version

        return version("onnxruntime")
    except Exception:  # not installed: the label says so rather than failing the app
        return "none"


class AccessLog:
    """ASGI middleware: a request id for every request, one log line and the metrics for each.

    Paths are counted by their route's template (e.g. /v1/classify) — the route that answered,
    or for an answer the edge gave first (a 401, an early 429), the route `routes_of` would
    have sent it to; a path no route matches is "other", so a scanner probing random URLs
    cannot grow the metric's label set."""

    def __init__(self, app, metrics: HTTPMetrics, routes_of):
        self.app, self.metrics, self.routes_of = app, metrics, routes_of

    def route_path(self, scope) -> str:
        from starlette.routing import Match

        route = scope.get("route")  # set by the router on the scope it was handed
        if route is None:
            for candidate in self.routes_of.routes:
                match, child = candidate.matches(scope)
                if match is not Match.NONE:
                    route = child.get("route", candidate)
                    break
        return getattr(route, "path", None) or "other"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), "")
        rid = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        status = 500  # what the client sees if the app dies before it answers

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - start
            path = self.route_path(scope)
            self.metrics.requests.labels(path, str(status)).inc()
            self.metrics.duration.labels(path).observe(elapsed)
            client = scope.get("client")
            # the path as sent (percent-encoded): a decoded "%0A" would forge a log line
            raw = scope.get("raw_path") or scope["path"].encode()
            shown = raw.decode("latin-1") if isinstance(raw, bytes) else str(raw)
            access_log.info("%s %s %d %.1fms", scope["method"], shown, status, 1000 * elapsed,
                            extra={"request_id": rid, "client": f"{client[0]}:{client[1]}" if client else "-",
                                   "method": scope["method"], "path": shown, "status": status,
                                   "duration_ms": round(1000 * elapsed, 2)})


# --- logs ------------------------------------------------------------------------------------

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
_ACCESS_FIELDS = ("request_id", "client", "method", "path", "status", "duration_ms")


class JSONLines(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and the access fields."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        for name in _ACCESS_FIELDS:
            if hasattr(record, name):
                out[name] = getattr(record, name)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class _Text(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", None)
        return f"{line} [{rid}]" if rid else line


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    """Root logging for a server process: one stderr handler; uvicorn's loggers go through it
    (their own access log stays off: `AccessLog` writes one line per request, with its id)."""
    if level not in LOG_LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(LOG_LEVELS)}")
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        formatter = JSONLines()
        formatter.converter = time.gmtime
    else:
        formatter = _Text("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True


# --- the large model's engine ----------------------------------------------------------------


class EngineCollector:
    """The built-in engine's state at scrape time, named after vLLM's metrics: requests running
    and waiting, KV blocks used and free, prefix-cache hit rate, tokens, time to first token.
    `get_engine` returns the LLMEngine, or None while it loads (nothing is exported then)."""

    def __init__(self, get_engine):
        self.get_engine = get_engine

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        from serving.engine.engine import TTFT_BUCKETS

        engine = self.get_engine()
        if engine is None:
            return
        kv, sched, c = engine.kv, engine.scheduler, engine.counters
        gauges = {
            "cascade_llm_requests_running": ("requests in the running batch", len(sched.running)),
            "cascade_llm_requests_waiting": ("requests queued for the batch", len(sched.waiting)),
            "cascade_llm_kv_blocks_used": ("KV-cache blocks held by requests", kv.num_used_blocks),
            "cascade_llm_kv_blocks_free": ("KV-cache blocks free (cached prefixes included)", kv.num_free_blocks),
            "cascade_llm_prefix_cache_hit_rate": ("share of admitted prompt tokens found in the prefix cache",
                                                  kv.prefix_hits_tokens / max(1, kv.prefix_queries_tokens)),
            "cascade_llm_generation_tokens_per_second": ("tokens generated per second over the last 10 s",
                                                         c.tokens_per_s()),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        counters = {
            "cascade_llm_prompt_tokens": ("prompt tokens admitted", c.prompt_tokens),
            "cascade_llm_generation_tokens": ("tokens generated", c.generation_tokens),
            "cascade_llm_requests_finished": ("requests finished", c.requests_finished),
            "cascade_llm_preemptions": ("requests preempted for KV blocks", sched.num_preemptions),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=value)
        cumulative = [(str(le), n) for le, n in zip(TTFT_BUCKETS, list(c.ttft_buckets))]
        yield HistogramMetricFamily("cascade_llm_time_to_first_token_seconds", "arrival to first generated token",
                                    buckets=[*cumulative, ("+Inf", c.ttft_count)], sum_value=c.ttft_sum)
