"""The OpenAI-compatible HTTP API over a `Coordinator` (FastAPI; `model` names a pipeline).

Endpoints: `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/completions`,
`POST /v1/chat/completions` (streaming too), vLLM's `POST /tokenize` and `POST /detokenize`, and
unauthenticated `GET /health`, `GET /version` and `GET /metrics` (Prometheus text).

Requests are validated strictly (`api_protocol`): an unknown or unsupported field, or a value of
the wrong JSON type, is a 400 naming the field. Every error has OpenAI's shape (`api_errors`) and
the request id that is also in the `x-request-id` header and in the server log, which holds the
full traceback. Limits (`server:` in the config): body size (413), prompt tokens (400 before any
model work), prompts × `n` per request (400), concurrent requests per API key (429).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import sys
import time
import uuid
from importlib import metadata
from typing import Any

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from collab_ray.config import ServerConfig
from collab_ray.core.errors import CollabError, ModelUnavailable, SessionNotFound
from collab_ray.core.sampling import SamplingParams
from collab_ray.core.strategy import Request, StrategyResult, render_prompt
from collab_ray.core.vocab import detect_style, normalize_token
from collab_ray.serving.api_errors import APIError, bad, error_response, root_cause, scrub, shorten
from collab_ray.serving.api_metrics import CONTENT_TYPE, Metrics
from collab_ray.serving.api_protocol import (
    ChatBody,
    ChatMessage,
    CompletionBody,
    DetokenizeBody,
    TokenizeBody,
    UnsupportedField,
)
from collab_ray.serving.coordinator import Coordinator, PipelineNotFound
from collab_ray.serving.handle_backend import REQUEST_SCOPE

log = logging.getLogger("collab_ray.api")
access_log = logging.getLogger("collab_ray.access")

MAX_JSON_DEPTH = 32
CLIENT_CLOSED = 499  # nginx's status for a request the client abandoned
# the model a pipeline's output tokens (and token-id prompts, logit_bias, /tokenize) belong to
OUTPUT_ROLE = {"speculative": "target", "compress": "target", "federated": "remote", "contrastive": "expert", "proxy": "base", "verify": "llm"}
# strategies whose output model reads a rewritten prompt or whose answer is rewritten text:
# their tokens' log-probs cannot be given against the request's prompt
NO_LOGPROBS = {"compress": "its output model reads a compressed prompt", "federated": "its output model reads a masked prompt"}
# sampling extras, applied by the engine's sampler (core.sampling.process_logits with the request's
# histories); only strategies whose every sampled token comes from the engine accept them, and
# logit_bias (token ids of one vocabulary) only single-model pipelines
EXTRAS = ("frequency_penalty", "presence_penalty", "repetition_penalty", "logit_bias", "min_tokens")
EXTRAS_STRATEGIES = {"single", "route", "cascade", "vote", "rank", "moa", "compress", "detect"}
EXTRAS_NOOP = {"frequency_penalty": 0, "presence_penalty": 0, "repetition_penalty": 1, "logit_bias": {}, "min_tokens": 0}
PROTECTED = ("/v1/", "/tokenize", "/detokenize")
ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat", "/tokenize": "tokenize", "/detokenize": "detokenize"}


def _version() -> str:
    try:
        return metadata.version("collab_ray")
    except metadata.PackageNotFoundError:
        return "unknown"


def _serve_access_line(record: logging.LogRecord) -> bool:
    return not getattr(record, "serve_access_log", False)


def _setup_logging(access: bool) -> None:
    """Access lines and errors to stderr (the replica's log) at INFO, once per process; our access
    line (with the status a stream really ended with) replaces Ray Serve's own in this replica."""
    serve_logger = logging.getLogger("ray.serve")
    if access and _serve_access_line not in serve_logger.filters:
        serve_logger.addFilter(_serve_access_line)
    for logger in (access_log, log):
        if not logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False


# ---- errors ---------------------------------------------------------------------------------------
def classify(exc: BaseException) -> APIError:
    """Any exception raised while answering -> the APIError the client sees (never a traceback)."""
    if isinstance(exc, APIError):
        return exc
    cause = root_cause(exc)
    if isinstance(cause, APIError):
        return cause
    if isinstance(cause, PipelineNotFound):
        return APIError(404, str(cause), "model", "model_not_found")
    if isinstance(cause, ModelUnavailable):
        return APIError(503, f"{cause}; try again later", None, "model_unavailable")
    if isinstance(cause, (SessionNotFound, asyncio.TimeoutError, TimeoutError)):
        return APIError(503, f"a model did not answer in time, try again ({type(cause).__name__})", None, "model_unavailable")
    if type(cause).__module__.startswith("ray"):
        return APIError(503, f"a model is unavailable, try again ({type(cause).__name__})")
    if isinstance(cause, (ValueError, CollabError)):
        return APIError(400, str(cause))
    return APIError(500, "internal error; the server log has the details under this request id")


def _validation_error(e: ValidationError) -> APIError:
    """The first bad field of a pydantic error, named, with its shortened value."""
    errors = e.errors(include_url=False)
    for err in errors:
        ctx_err = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_err, UnsupportedField):
            return bad(ctx_err.field, f"{ctx_err.field}: {ctx_err}", "unsupported_parameter")
    first = errors[0]
    param = _param(first["loc"])
    same = [err for err in errors if _param(err["loc"]) == param]
    if first["type"] == "extra_forbidden":
        return bad(param, f"{param}: unknown field (not part of this API)", "unknown_parameter")
    if first["type"] == "missing":
        return bad(param, f"{param}: field required")
    msgs = list(dict.fromkeys(err["msg"] for err in same))
    got = f" (got {shorten(first['input'])})" if "input" in first and not isinstance(first["input"], dict) else ""
    what = msgs[0] if len(msgs) == 1 else "expected " + " or ".join(m.removeprefix("Input should be ") for m in msgs[:4])
    return bad(param or None, f"{param or 'body'}: {what}{got}")


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _param(loc) -> str:
    """A pydantic error location as a field path, without union-member tags."""
    parts = []
    for p in loc:
        if isinstance(p, int):
            parts.append(str(p))
        elif p and p[0].islower() and "[" not in p and p not in _TYPE_TAGS and not p.startswith("function-"):
            parts.append(p)
    return ".".join(parts)


# ---- request bodies -------------------------------------------------------------------------------
async def read_json(request: HTTPRequest) -> dict:
    """The JSON object of a POST body: 415 other content types, 400 bad UTF-8/JSON/text, 422 a non-object."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise APIError(415, f"Content-Type must be application/json, got {shorten(ctype or 'none')}", None, "unsupported_media_type")
    raw = await request.body()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the body is not valid UTF-8 (byte {e.start})", None, "invalid_encoding") from None
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise APIError(400, f"the JSON body is nested too deeply (at most {MAX_JSON_DEPTH} levels)", None, "invalid_json") from None
    except ValueError as e:
        raise APIError(400, f"the body is not valid JSON: {str(e)[:120]}", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(422, f"the JSON body must be an object, got {type(data).__name__}", None, "invalid_json")
    _check_text(data)
    return data


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _check_text(data: Any) -> None:
    """400 for nesting deeper than MAX_JSON_DEPTH, lone surrogates and NUL characters (path named)."""
    stack = [(data, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise APIError(400, f"the JSON body is nested too deeply (at most {MAX_JSON_DEPTH} levels)", None, "invalid_json")
        if isinstance(value, dict):
            for k, v in value.items():
                _check_string(k, path or "body", key=True)  # a bad key is named by where it is, not echoed
                stack.append((v, f"{path}.{k}" if path else str(k), depth + 1))
        elif isinstance(value, list):
            stack.extend((v, f"{path}.{i}", depth + 1) for i, v in enumerate(value))
        elif isinstance(value, str):
            _check_string(value, path)


def _check_string(s: str, path: str, key: bool = False) -> None:
    what = f"{path[:80]}: a key" if key else path[:80]
    if "\x00" in s:
        raise bad(path[:80], f"{what} contains a NUL character", "invalid_text")
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise bad(path[:80], f"{what} contains a lone surrogate (not valid Unicode)", "invalid_text") from None


def parse(model_cls, data: dict):
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e) from None


# ---- the app --------------------------------------------------------------------------------------
class _KeyLimiter:
    """Concurrent requests per API key (per ingress replica)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.active: dict[str, int] = {}

    def acquire(self, key: str) -> bool:
        if self.active.get(key, 0) >= self.limit:
            return False
        self.active[key] = self.active.get(key, 0) + 1
        return True

    def release(self, key: str) -> None:
        self.active[key] -= 1
        if not self.active[key]:
            del self.active[key]


class _Gate:
    """Pure ASGI middleware: request id, auth, body size, per-key concurrency, access log, metrics,
    and the last line of defence that turns any exception into an OpenAI-shaped error."""

    def __init__(self, app, api_key: str | None, server: ServerConfig, metrics: Metrics):
        self.app = app
        self.api_key = api_key
        self.server = server
        self.metrics = metrics
        self.limiter = _KeyLimiter(server.max_concurrent_requests_per_key)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given_id = _header(scope, b"x-request-id")  # Ray Serve's proxy sets it and echoes it in the response
        rid = given_id if given_id and len(given_id) <= 64 and given_id.replace("-", "").isalnum() else uuid.uuid4().hex
        echoed = given_id == rid
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        path, method = scope.get("path", ""), scope.get("method", "")
        start = time.perf_counter()
        status = {"code": 0, "started": False}

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                if not echoed:
                    headers.append((b"x-request-id", rid.encode()))
                message = {**message, "headers": headers}
            await send(message)

        async def reply(err: APIError):
            resp = error_response(err.status, err.message, err.param, err.code, rid, err.headers)
            await resp(scope, receive, send_with_id)

        key = "-"
        try:
            if path.startswith(PROTECTED):
                given = _bearer(_header(scope, b"authorization"))
                if self.api_key is not None and (given is None or not hmac.compare_digest(given.encode(), self.api_key.encode())):
                    return await reply(APIError(401, "missing or wrong API key (send Authorization: Bearer KEY)", None, "invalid_api_key"))
                key = hashlib.sha256((given or "-").encode()).hexdigest()[:16]
            if method == "POST":
                body = await self._read_body(scope, receive)
                if body is None:
                    limit = self.server.max_body_bytes
                    return await reply(APIError(413, f"the request body exceeds this server's limit of {limit} bytes", None, "body_too_large"))
                receive = _replay(body, receive)
            if path.startswith(PROTECTED) and not self.limiter.acquire(key):
                limit = self.server.max_concurrent_requests_per_key
                return await reply(APIError(429, f"too many concurrent requests for this API key (limit {limit})", None, "concurrency_limit"))
            if not path.startswith(PROTECTED):
                return await self.app(scope, receive, send_with_id)
            self.metrics.in_flight.inc()
            request_scope = REQUEST_SCOPE.set(uuid.uuid4().hex)  # its model calls travel together (a client may reuse ids)
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                REQUEST_SCOPE.reset(request_scope)
                self.metrics.in_flight.dec()
                self.limiter.release(key)
        except Exception as e:  # noqa: BLE001 - nothing may reach the client as a traceback
            err = classify(e)
            log.error("request %s %s %s failed: %s", rid, method, path, type(e).__name__, exc_info=e)
            if not status["started"]:
                await reply(err)
        finally:
            code = state.get("status_override") or status["code"] or 500
            ms = (time.perf_counter() - start) * 1000
            endpoint = ENDPOINTS.get(path)
            if endpoint:
                self.metrics.request_done(state.get("pipeline", ""), endpoint, code)
            if self.server.access_log:
                user = f" user={shorten(state['user'], 60)}" if state.get("user") else ""
                access_log.info("%s %s %s %d %.1fms%s", rid, method, path[:200], code, ms, user)

    async def _read_body(self, scope, receive) -> bytes | None:
        """The whole body, or None when it is larger than the limit (Content-Length or counted)."""
        limit = self.server.max_body_bytes
        length = _header(scope, b"content-length")
        if length and length.isdigit() and int(length) > limit:
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b""
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


def _bearer(value: str | None) -> str | None:
    """The key of `Authorization: Bearer KEY` (scheme case-insensitive), else None."""
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _replay(body: bytes, receive):
    done = False

    async def replay():
        nonlocal done
        if not done:
            done = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later: http.disconnect, so streams notice a client that left

    return replay


def create_app(coordinator: Coordinator, api_key: str | None = None) -> FastAPI:
    """The FastAPI app; `api_key` (when set) is required as `Authorization: Bearer <key>` on /v1, /tokenize, /detokenize."""
    server = coordinator.config.server
    _setup_logging(server.access_log)
    metrics = Metrics()
    api = _API(coordinator, server, metrics)
    app = FastAPI(
        title="collab_ray", description="OpenAI-compatible API over collaborating LLMs", docs_url=None, redoc_url=None, openapi_url=None
    )
    app.add_middleware(_Gate, api_key=api_key, server=server, metrics=metrics)
    app.state.metrics = metrics

    def rid(request: HTTPRequest) -> str | None:
        return request.scope.get("state", {}).get("request_id")

    @app.exception_handler(APIError)
    async def api_error(request: HTTPRequest, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.code, rid(request), exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: HTTPRequest, exc: StarletteHTTPException):
        if exc.status_code == 404:
            message, code = f"no such endpoint: {request.method} {shorten(request.url.path, 60)}", "not_found"
        elif exc.status_code == 405:
            message, code = f"method {shorten(request.method, 20)} is not allowed on {shorten(request.url.path, 60)}", "method_not_allowed"
        else:
            message, code = scrub(str(exc.detail)), None
        return error_response(exc.status_code, message, None, code, rid(request), getattr(exc, "headers", None), clean=False)

    @app.get("/health")
    async def health():
        return await api.health()

    @app.get("/version")
    async def version():
        return {"version": _version()}

    @app.get("/metrics")
    async def prometheus():
        await metrics.refresh_engine(coordinator.backends)
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [api.model_card(name) for name in coordinator.pipelines]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        coordinator.pipeline(model_id)
        return api.model_card(model_id)

    def post(body_cls, handler):
        async def endpoint(request: HTTPRequest):
            return await handler(request, parse(body_cls, await read_json(request)))

        return endpoint

    routes = {"/v1/completions": (CompletionBody, api.completions), "/v1/chat/completions": (ChatBody, api.chat),
              "/tokenize": (TokenizeBody, api.tokenize), "/detokenize": (DetokenizeBody, api.detokenize)}  # fmt: skip
    for path, (body_cls, handler) in routes.items():
        app.add_api_route(path, post(body_cls, handler), methods=["POST"])
    return app


class _API:
    """The endpoints' logic over the coordinator."""

    def __init__(self, coordinator: Coordinator, server: ServerConfig, metrics: Metrics):
        self.coordinator = coordinator
        self.server = server
        self.metrics = metrics
        self.created = int(time.time())
        self._styles: dict[int, tuple[str, list[str]]] = {}

    # ---- helpers ----------------------------------------------------------------------------
    def model_card(self, name: str) -> dict:
        p = self.coordinator.pipelines[name]
        return {"id": name, "object": "model", "created": self.created, "owned_by": "collab_ray", "strategy": p.strategy.name}

    def pipeline(self, request: HTTPRequest, name: str):
        pipe = self.coordinator.pipeline(name)
        request.scope["state"]["pipeline"] = name
        return pipe

    def output_backend(self, name: str):
        """(role, backend) whose vocabulary a pipeline's token ids are in."""
        pipe = self.coordinator.pipelines[name]
        role = OUTPUT_ROLE.get(pipe.strategy.name)
        if role not in pipe.models:
            role = next(iter(pipe.models))
        return role, pipe.models[role]

    async def health(self):
        async def ready(name, backend):
            handle = getattr(backend, "handle", None)
            try:
                call = handle.info.remote() if handle is not None else backend.info()
                await asyncio.wait_for(call, 10)
                return None
            except Exception as e:  # noqa: BLE001
                log.warning("health: model %s not ready: %s", name, type(e).__name__)
                return name

        down = [n for n in await asyncio.gather(*(ready(n, b) for n, b in self.coordinator.backends.items())) if n]
        if down:
            return error_response(503, f"models not ready: {', '.join(sorted(down))}", None, "not_ready")
        return {"status": "ok", "models": sorted(self.coordinator.backends)}

    def sampling(self, name: str, body, max_tokens: int | None, default_max: int, logprobs: int | None) -> SamplingParams:
        max_tokens = max_tokens or default_max
        if max_tokens > self.server.max_tokens_limit:
            raise bad("max_tokens", f"max_tokens {max_tokens} exceeds this server's limit of {self.server.max_tokens_limit}")
        stop = body.stop_list()
        if len(stop) > 16 or any(not s or len(s) > 256 for s in stop):
            raise bad("stop", f"stop: at most 16 strings of 1-256 characters, got {shorten(body.stop)}")
        if body.stream_options is not None and not body.stream:
            raise bad("stream_options", "stream_options: only allowed with stream: true")
        if body.stream_options is not None and body.stream_options.continuous_usage_stats:
            raise bad("stream_options.continuous_usage_stats", "stream_options.continuous_usage_stats is not supported", "unsupported_parameter")
        extras = {f: getattr(body, f) for f in EXTRAS if getattr(body, f) is not None and getattr(body, f) != EXTRAS_NOOP[f]}
        strategy = self.coordinator.pipelines[name].strategy.name
        refused = [f for f in extras if strategy not in EXTRAS_STRATEGIES or (f == "logit_bias" and strategy != "single")]
        if refused:
            field = refused[0]
            where = "single-model pipelines" if field == "logit_bias" else "pipelines whose tokens all come from the models' own sampler"
            message = f"{field} is not supported by pipeline {name!r} (strategy {strategy}): only {where} apply it"
            raise bad(field, message, "unsupported_parameter")
        top_k = body.top_k if body.top_k and body.top_k > 0 else 0
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                top_k=top_k,
                stop=stop,
                seed=body.seed,
                logprobs=logprobs,
                ignore_eos=bool(body.ignore_eos),
                **extras,
            )
        except ValidationError as e:
            raise _validation_error(e) from None

    async def check_extras(self, name: str, params: SamplingParams) -> None:
        """logit_bias token ids inside the output model's vocabulary."""
        if not params.logit_bias:
            return
        _, backend = self.output_backend(name)
        info = await backend.info()
        for token, _ in params.logit_bias:
            if token >= info.vocab_size:
                raise bad("logit_bias", f"logit_bias: token id {token} is outside the vocabulary of {info.vocab_size} tokens")

    async def check_prompt(self, name: str, request: Request, max_tokens_needed: int = 1) -> int:
        """Prompt tokens under every model of the pipeline; 400 over server.max_prompt_tokens or a context."""
        pipe = self.coordinator.pipelines[name]
        backends = list({id(b): (role, b) for role, b in pipe.models.items()}.values())

        async def count(role, backend):
            info, text = await asyncio.gather(backend.info(), render_prompt(backend, request))
            return role, info, len(await backend.encode(text))

        counts = await asyncio.gather(*(count(r, b) for r, b in backends))
        for role, info, n in counts:
            if n > self.server.max_prompt_tokens:
                raise bad("prompt" if request.prompt is not None else "messages",
                          f"the prompt has {n} tokens; this server's limit is {self.server.max_prompt_tokens}", "prompt_too_long")  # fmt: skip
            if info.max_context is not None and n + max_tokens_needed > info.max_context:
                raise bad("prompt" if request.prompt is not None else "messages",
                          f"the prompt has {n} tokens, which leaves no room in the context of model {role!r} "
                          f"({info.max_context} tokens)", "context_length_exceeded")  # fmt: skip
        return max(n for _, _, n in counts)

    def check_choices(self, prompts: int, n: int) -> None:
        if prompts * n > self.server.max_choices_per_request:
            limit = self.server.max_choices_per_request
            raise bad("n", f"{prompts} prompt(s) × n={n} exceeds this server's limit of {limit} choices per request")

    async def token_texts(self, backend, ids: list[int]) -> list[tuple[str, bytes]]:
        """Each token's text and bytes (special tokens: empty)."""
        key = id(backend)
        if key not in self._styles:
            strings, info = await asyncio.gather(backend.token_strings(), backend.info())
            self._styles[key] = (detect_style(strings), strings, set(info.special_token_ids) | set(info.eos_token_ids))
        style, strings, special = self._styles[key]
        out = []
        for t in ids:
            b = normalize_token(strings[t], style) if 0 <= t < len(strings) and t not in special else None
            if b is None:
                out.append(("", b""))
            else:
                out.append((b.decode("utf-8", errors="replace"), b))
        return out

    async def rescore(self, backend, prompt_ids: list[int], output_ids: list[int], k: int, with_prompt: bool):
        """Log-prob and top-k alternatives of each output token (and prompt token, `with_prompt`) under
        the model: [(token, logprob or None, [(alt, logprob)…])]. One session, appended in chunks."""
        import numpy as np

        start_len = 1 if with_prompt else len(prompt_ids)
        seq = prompt_ids + output_ids
        targets = seq[start_len:]
        session = await backend.open_session(seq[:start_len])
        rows = [np.asarray(session.logprobs)]
        try:
            rest = seq[start_len:-1] if targets else []
            for i in range(0, len(rest), 32):
                out = await backend.append(session.session_id, rest[i : i + 32], all_positions=True)
                rows.extend(np.asarray(out).reshape(-1, np.asarray(out).shape[-1]))
        finally:
            await backend.close_session(session.session_id)
        result = [(seq[0], None, [])] if with_prompt else []
        for tok, row in zip(targets, rows):
            top = np.argsort(-row)[:k] if k else []
            result.append((tok, float(row[tok]), [(int(a), float(row[a])) for a in top]))
        return result

    async def token_prompt(self, name: str, ids: list[int]) -> str:
        """A token-id prompt as text of the pipeline's output model; refused unless it round-trips."""
        role, backend = self.output_backend(name)
        info = await backend.info()
        if not ids:
            raise bad("prompt", "prompt: a token-id prompt must not be empty")
        bad_ids = [t for t in ids if t >= info.vocab_size]
        if bad_ids:
            raise bad("prompt", f"prompt: token id {bad_ids[0]} is outside the vocabulary of {info.vocab_size} tokens")
        text = await backend.decode(ids, True)
        if await backend.encode(text) != list(ids):
            raise bad("prompt", f"prompt: these token ids do not round-trip through the tokenizer of model {role!r} "
                      "(send what /tokenize returns, or text)")  # fmt: skip
        return text

    async def logprobs_for(self, name: str, request: Request, r: StrategyResult, k: int, echo: bool):
        """Rescored tokens of a result (and of its prompt with `echo`)."""
        pipe = self.coordinator.pipelines[name]
        role = r.meta.get("output_model")
        if r.token_ids is None or role not in pipe.models:
            raise APIError(500, f"pipeline {name!r} returned no output tokens to give log-probs of")
        backend = pipe.models[role]
        prompt_ids = await backend.encode(await render_prompt(backend, request))
        return backend, await self.rescore(backend, prompt_ids, list(r.token_ids), k, echo)

    def check_logprobs(self, name: str, field: str, stream: bool) -> None:
        strategy = self.coordinator.pipelines[name].strategy.name
        if strategy in NO_LOGPROBS:
            raise bad(field, f"{field} is not available for pipeline {name!r}: {NO_LOGPROBS[strategy]}", "unsupported_parameter")
        if stream:
            raise bad(field, f"{field} with stream is not supported; ask without stream", "unsupported_parameter")

    def record(self, request: HTTPRequest, name: str, endpoint: str, start: float, results: list, prompt_tokens: int) -> None:
        self.metrics.answered(name, endpoint, time.perf_counter() - start, results, prompt_tokens)

    def begin(self, http: HTTPRequest, body) -> tuple[str, int]:
        """(pipeline name, n) of a generation request; the pipeline must exist (404)."""
        http.scope["state"]["user"] = body.user
        self.pipeline(http, body.model)
        return body.model, body.n or 1

    # ---- endpoints --------------------------------------------------------------------------
    async def completions(self, http: HTTPRequest, body: CompletionBody):
        start = time.perf_counter()
        name, n = self.begin(http, body)
        if body.suffix:
            raise bad("suffix", "suffix (insertion) is not supported by this server", "unsupported_parameter")
        if body.best_of is not None and body.best_of != n:
            raise bad("best_of", f"best_of {body.best_of} != n {n} is not supported (no extra candidates are ranked)", "unsupported_parameter")
        if body.logprobs is not None:
            self.check_logprobs(name, "logprobs", bool(body.stream))
        if body.echo and body.stream:
            raise bad("echo", "echo with stream is not supported", "unsupported_parameter")
        raw = body.prompt
        if isinstance(raw, str):
            prompts: list = [raw]
        elif raw and all(isinstance(x, int) for x in raw):
            prompts = [list(raw)]
        else:
            prompts = list(raw)
        if not prompts:
            raise bad("prompt", "prompt: must not be empty")
        self.check_choices(len(prompts), n)
        params = self.sampling(name, body, body.max_tokens, 16, body.logprobs)
        await self.check_extras(name, params)
        texts = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if not p:
                    raise bad("prompt", "prompt: must be a non-empty string")
                texts.append(p)
            else:
                texts.append(await self.token_prompt(name, p))
        requests = [Request(prompt=t, params=params) for t in texts]
        await asyncio.gather(*(self.check_prompt(name, r) for r in requests))
        if body.stream:
            if len(requests) > 1:
                raise bad("prompt", "stream with a list of prompts is not supported; send one prompt", "unsupported_parameter")
            return await self.stream(http, body, requests[0], "text_completion", start)
        per_prompt = await asyncio.gather(*(self.coordinator.run(name, r, n) for r in requests))
        choices = []
        for p_i, (req, results) in enumerate(zip(requests, per_prompt)):
            for j, r in enumerate(results):
                text = (req.prompt + r.text) if body.echo else r.text
                lp = None
                if body.logprobs is not None:
                    backend, scored = await self.logprobs_for(name, req, r, body.logprobs, bool(body.echo))
                    lp = await self.completion_logprobs(backend, scored, r, text, bool(body.echo))
                choices.append({"index": p_i * n + j, "text": text, "finish_reason": r.finish_reason, "logprobs": lp})
        results = [r for rs in per_prompt for r in rs]
        prompt_tokens = sum(rs[0].usage.prompt_tokens for rs in per_prompt)
        usage = _usage(results, prompt_tokens)
        self.record(http, name, "completions", start, results, prompt_tokens)
        return _response("text_completion", name, choices, usage, _collab(results))

    async def completion_logprobs(self, backend, scored, r: StrategyResult, text: str, echo: bool) -> dict:
        ids = [t for t, _, _ in scored]
        alts = sorted({a for _, _, top in scored for a, _ in top})
        texts = await self.token_texts(backend, ids)
        alt_text = dict(zip(alts, [t for t, _ in await self.token_texts(backend, alts)]))
        offsets, pos = [], 0
        for t, _ in texts:
            offsets.append(pos)
            pos += len(t)
        top = []
        for _, lp, alt in scored:
            if lp is None:
                top.append(None)
                continue
            d: dict[str, float] = {}
            for a, alp in alt:
                d.setdefault(alt_text[a], alp)
            top.append(d)
        return {"tokens": [t for t, _ in texts], "token_logprobs": [lp for _, lp, _ in scored], "top_logprobs": top, "text_offset": offsets}

    async def chat(self, http: HTTPRequest, body: ChatBody):
        start = time.perf_counter()
        name, n = self.begin(http, body)
        if body.response_format is not None and body.response_format.type != "text":
            kind = body.response_format.type
            raise bad("response_format", f"response_format {kind!r} is not supported (constrained decoding); only 'text'", "unsupported_parameter")
        if body.tools:
            raise bad("tools", "tools (function calling) are not supported by this server", "unsupported_parameter")
        if body.tool_choice not in (None, "none", "auto"):
            raise bad("tool_choice", f"tool_choice {shorten(body.tool_choice)} is not supported (no tools); use 'none'", "unsupported_parameter")
        if body.top_logprobs is not None and not body.logprobs:
            raise bad("top_logprobs", "top_logprobs needs logprobs: true")
        if body.logprobs:
            self.check_logprobs(name, "logprobs", bool(body.stream))
        if body.max_tokens is not None and body.max_completion_tokens is not None and body.max_tokens != body.max_completion_tokens:
            raise bad("max_completion_tokens", "give max_tokens or max_completion_tokens, not two different values")
        self.check_choices(1, n)
        messages = [_message(i, m) for i, m in enumerate(body.messages)]
        k = (body.top_logprobs or 0) if body.logprobs else None
        params = self.sampling(name, body, body.max_completion_tokens or body.max_tokens, self.server.max_tokens_limit, k)
        await self.check_extras(name, params)
        request = Request(messages=messages, params=params)
        await self.check_prompt(name, request)
        if body.stream:
            return await self.stream(http, body, request, "chat.completion.chunk", start)
        results = await self.coordinator.run(name, request, n)
        choices = []
        for i, r in enumerate(results):
            lp = None
            if body.logprobs:
                backend, scored = await self.logprobs_for(name, request, r, k or 0, False)
                lp = {"content": await self.chat_logprobs(backend, scored), "refusal": None}
            message = {"role": "assistant", "content": r.text, "refusal": None, "tool_calls": None}
            choices.append({"index": i, "message": message, "finish_reason": r.finish_reason, "logprobs": lp})
        usage = _usage(results, results[0].usage.prompt_tokens)
        self.record(http, name, "chat", start, results, results[0].usage.prompt_tokens)
        return _response("chat.completion", name, choices, usage, _collab(results))

    async def chat_logprobs(self, backend, scored) -> list[dict]:
        ids = [t for t, _, _ in scored]
        alts = sorted({a for _, _, top in scored for a, _ in top})
        texts = await self.token_texts(backend, ids)
        alt_texts = dict(zip(alts, await self.token_texts(backend, alts)))
        out = []
        for (t, b), (_, lp, alt) in zip(texts, scored):
            top = [{"token": alt_texts[a][0], "logprob": alp, "bytes": list(alt_texts[a][1])} for a, alp in alt]
            out.append({"token": t, "logprob": lp, "bytes": list(b), "top_logprobs": top})
        return out

    async def tokenize(self, http: HTTPRequest, body: TokenizeBody):
        self.pipeline(http, body.model)
        _, backend = self.output_backend(body.model)
        info = await backend.info()
        if body.messages is not None:
            messages = [_message(i, m) for i, m in enumerate(body.messages)]
            if info.has_chat_template:
                text = await backend.apply_chat_template(messages, body.add_generation_prompt)
            else:
                text = await render_prompt(backend, Request(messages=messages))
        else:
            text = body.prompt
        if len(text) > self.server.max_body_bytes:
            raise bad("prompt", "prompt: too long")
        tokens = await backend.encode(text, body.add_special_tokens)
        return {"count": len(tokens), "max_model_len": info.max_context, "tokens": tokens}

    async def detokenize(self, http: HTTPRequest, body: DetokenizeBody):
        self.pipeline(http, body.model)
        _, backend = self.output_backend(body.model)
        info = await backend.info()
        bad_ids = [t for t in body.tokens if t >= info.vocab_size]
        if bad_ids:
            raise bad("tokens", f"tokens: id {bad_ids[0]} is outside the vocabulary of {info.vocab_size} tokens")
        return {"prompt": await backend.decode(body.tokens, True)}

    # ---- streaming --------------------------------------------------------------------------
    async def stream(self, http: HTTPRequest, body, request: Request, obj: str, start: float) -> StreamingResponse:
        """Server-sent events as OpenAI sends them: deltas, a chunk with the finish reasons, the usage
        chunk only with stream_options.include_usage, then [DONE]. The response starts with the first
        event, so a request that fails before it (a model at capacity) gets its real status; a later
        error becomes an error event."""
        name, n = body.model, body.n or 1
        chat = obj.startswith("chat")
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        queue: asyncio.Queue = asyncio.Queue()
        first = {"t": None}
        state = http.scope["state"]

        def chunk(choices: list, **extra) -> str:
            payload = {"id": rid, "object": obj, "created": created, "model": name, "choices": choices, **extra}
            if include_usage and "usage" not in payload:
                payload["usage"] = None
            return f"data: {json.dumps(payload)}\n\n"

        def choice(i: int, text: str | None, finish: str | None, role: bool = False) -> dict:
            if chat:
                delta = {} if text is None else {"content": text}
                if role:
                    delta = {"role": "assistant", "content": ""}
                return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}

        def emitter(i: int):
            async def emit(delta: str) -> None:
                if delta:
                    if first["t"] is None:
                        first["t"] = time.perf_counter()
                        self.metrics.ttft.labels(name).observe(first["t"] - start)
                    await queue.put(chunk([choice(i, delta, None)]))

            return emit

        async def produce():
            try:
                results = await self.coordinator.run(name, request, n, [emitter(i) for i in range(n)])
                await queue.put(chunk([choice(i, None, r.finish_reason) for i, r in enumerate(results)], collab=_collab(results)))
                prompt_tokens = results[0].usage.prompt_tokens
                if include_usage:
                    await queue.put(chunk([], usage=_usage(results, prompt_tokens)))
                self.record(http, name, "chat" if chat else "completions", start, results, prompt_tokens)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - reported in-band once the stream is open, as OpenAI does
                err = classify(e)
                level = logging.ERROR if err.status >= 500 else logging.WARNING
                log.log(level, "request %s: stream failed: %s", state.get("request_id"), type(e).__name__, exc_info=e)
                await queue.put(err)
            await queue.put(None)

        task = asyncio.ensure_future(produce())
        try:
            head = await queue.get()
        except BaseException:
            task.cancel()
            raise
        if isinstance(head, APIError):  # nothing sent yet: answer with the error's own status
            task.cancel()
            raise head

        async def events():
            finished = False
            try:
                if chat:
                    yield chunk([choice(i, None, None, role=True) for i in range(n)])
                item = head
                while item is not None:
                    if isinstance(item, APIError):
                        state["status_override"] = item.status
                        item = f"data: {json.dumps(item.body(state.get('request_id')))}\n\n"
                    yield item
                    item = await queue.get()
                yield "data: [DONE]\n\n"
                finished = True
            finally:
                if not finished:  # the client went away mid-stream: 499 in the access log and metrics
                    state["status_override"] = CLIENT_CLOSED
                task.cancel()

        return StreamingResponse(events(), media_type="text/event-stream", headers={"cache-control": "no-cache"})


def _message(i: int, m: ChatMessage) -> dict:
    """A validated chat message as the strategies' dict: text parts joined, tools refused."""
    where = f"messages.{i}"
    if m.role == "tool" or m.tool_call_id is not None:
        raise bad(f"{where}.role", f"{where}: tool messages are not supported (tools are not supported)", "unsupported_parameter")
    if m.tool_calls:
        raise bad(f"{where}.tool_calls", f"{where}.tool_calls: tools are not supported", "unsupported_parameter")
    if m.refusal is not None:
        raise bad(f"{where}.refusal", f"{where}.refusal: only null is supported", "unsupported_parameter")
    if m.content is None:
        if m.role != "assistant":
            raise bad(f"{where}.content", f"{where}.content: required for role {m.role!r}")
        content = ""
    elif isinstance(m.content, str):
        content = m.content
    else:
        texts = []
        for j, part in enumerate(m.content):
            if part.type != "text" or not hasattr(part, "text"):
                message = f"{where}.content.{j}: content part type {shorten(part.type)} is not supported (text only)"
                raise bad(f"{where}.content.{j}.type", message, "unsupported_content")
            texts.append(part.text)
        content = "\n".join(texts)
    out = {"role": "system" if m.role == "developer" else m.role, "content": content}
    if m.name is not None:
        out["name"] = m.name
    return out


def _usage(results: list[StrategyResult], prompt_tokens: int) -> dict:
    completion = sum(r.usage.completion_tokens for r in results)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def _collab(results: list[StrategyResult]) -> dict:
    return {"choices": [_jsonable(r.meta) for r in results]} if len(results) > 1 else _jsonable(results[0].meta)


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def _response(obj: str, model: str, choices: list, usage: dict, collab: dict) -> dict:
    prefix = "chatcmpl" if obj.startswith("chat") else "cmpl"
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}", "object": obj, "created": int(time.time()), "model": model,
        "choices": choices, "usage": usage, "collab": collab,
    }  # fmt: skip


__all__ = ["create_app", "classify", "read_json", "JSONResponse"]
