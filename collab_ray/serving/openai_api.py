"""The OpenAI-compatible HTTP API over a `Coordinator` (FastAPI; `model` names a pipeline).

`GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (with `stream`, `n`,
`temperature`, `top_p`, `max_tokens`, `stop`, `seed`, `logprobs`). Every response carries `usage`
and a `collab` field: per-model calls, tokens and latency, and the strategy's own metadata.
Errors use OpenAI's JSON shape: 400 bad parameters, 401 bad key, 404 unknown pipeline, 503 a
model is unavailable.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from collab_ray.config import ServerConfig
from collab_ray.core.sampling import SamplingParams
from collab_ray.core.strategy import Request, StrategyResult
from collab_ray.serving.coordinator import Coordinator, PipelineNotFound
from collab_ray.serving.handle_backend import ModelUnavailable


class _Params(BaseModel):
    """Sampling fields shared by both endpoints (OpenAI defaults)."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="Pipeline name.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Alias of max_tokens (chat).")
    temperature: float = Field(1.0, ge=0, le=2, description="Sampling temperature; 0 = greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    n: int = Field(1, ge=1, le=16, description="Completions to return.")
    stream: bool = Field(False, description="Stream server-sent events.")
    stop: str | list[str] | None = Field(None, description="Stop strings.")
    seed: int | None = Field(None, ge=0, description="Seed for reproducible sampling.")
    ignore_eos: bool = Field(False, description="Keep generating past end-of-sequence (vLLM extension).")

    def sampling(self, default_max: int, server: ServerConfig, logprobs: int | None) -> SamplingParams:
        max_tokens = self.max_tokens or self.max_completion_tokens or default_max
        server.check_max_tokens(max_tokens)
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
            stop=self.stop, seed=self.seed, logprobs=logprobs, ignore_eos=self.ignore_eos,
        )  # fmt: skip


class CompletionBody(_Params):
    prompt: str | list[str] = Field(description="Prompt text (a list is served as a batch).")
    logprobs: int | None = Field(None, ge=0, le=20, description="Return log-probs of each token.")

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v):
        if (isinstance(v, str) and not v) or (isinstance(v, list) and (not v or any(not p for p in v))):
            raise ValueError("prompt must be a non-empty string")
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatBody(_Params):
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation.")
    logprobs: bool = Field(False, description="Return log-probs of each token.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="Unused: alternatives are not returned.")


def error(status: int, message: str, type_: str, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


def _usage(results: list[StrategyResult]) -> dict:
    prompt = results[0].usage.prompt_tokens
    completion = sum(r.usage.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _collab(results: list[StrategyResult]) -> dict:
    return {"choices": [_jsonable(r.meta) for r in results]} if len(results) > 1 else _jsonable(results[0].meta)


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def create_app(coordinator: Coordinator, api_key: str | None = None) -> FastAPI:
    """The FastAPI app; `api_key` (when set) is required as `Authorization: Bearer <key>`."""
    server = coordinator.config.server
    app = FastAPI(title="collab_ray", description="OpenAI-compatible API over collaborating LLMs")

    @app.middleware("http")
    async def auth_and_errors(request: HTTPRequest, call_next):
        if api_key is not None:
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                return error(401, "missing or wrong API key (Authorization: Bearer …)", "authentication_error")
        try:
            return await call_next(request)
        except PipelineNotFound as e:
            return error(404, str(e), "invalid_request_error", "model")
        except (ModelUnavailable, asyncio.TimeoutError) as e:
            return error(503, f"model unavailable: {e}", "service_unavailable")
        except (ValueError, ValidationError) as e:
            return error(400, str(e), "invalid_request_error")

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: HTTPRequest, exc: RequestValidationError):
        parts = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"] if p != "body")
            parts.append(f"{loc}: {err['msg']}" + (f" (got {err['input']!r})" if "input" in err else ""))
        return error(400, "; ".join(parts) or "malformed request", "invalid_request_error")

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        data = [
            {"id": name, "object": "model", "created": created, "owned_by": "collab_ray", "strategy": p.strategy.name}
            for name, p in coordinator.pipelines.items()
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        coordinator.pipeline(body.model)
        params = body.sampling(16, server, body.logprobs)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if body.stream:
            if len(prompts) > 1:
                raise ValueError("stream with a list of prompts is not supported; send one prompt")
            return _stream(body, Request(prompt=prompts[0], params=params), "text_completion")
        per_prompt = await asyncio.gather(*(coordinator.run(body.model, Request(prompt=p, params=params), body.n) for p in prompts))
        results = [r for rs in per_prompt for r in rs]
        choices = []
        for i, r in enumerate(results):
            lp = await _completion_logprobs(body.model, r) if body.logprobs is not None else None
            choices.append({"index": i, "text": r.text, "finish_reason": r.finish_reason, "logprobs": lp})
        usage = _usage(results)
        usage["prompt_tokens"] = sum(rs[0].usage.prompt_tokens for rs in per_prompt)
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return _response("text_completion", body.model, choices, usage, _collab(results))

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody):
        coordinator.pipeline(body.model)
        params = body.sampling(server.max_tokens_limit, server, 0 if body.logprobs else None)
        request = Request(messages=[m.model_dump() for m in body.messages], params=params)
        if body.stream:
            return _stream(body, request, "chat.completion.chunk")
        results = await coordinator.run(body.model, request, body.n)
        choices = []
        for i, r in enumerate(results):
            lp = {"content": await _chat_logprobs(body.model, r)} if body.logprobs else None
            message = {"role": "assistant", "content": r.text}
            choices.append({"index": i, "message": message, "finish_reason": r.finish_reason, "logprobs": lp})
        return _response("chat.completion", body.model, choices, _usage(results), _collab(results))

    def _response(obj: str, model: str, choices: list, usage: dict, collab: dict) -> dict:
        prefix = "chatcmpl" if obj.startswith("chat") else "cmpl"
        return {
            "id": f"{prefix}-{uuid.uuid4().hex}", "object": obj, "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage, "collab": collab,
        }  # fmt: skip

    def _stream(body: _Params, request: Request, obj: str) -> StreamingResponse:
        """Server-sent events: text deltas as the strategy emits them, then finish reasons, usage and collab."""
        queue: asyncio.Queue = asyncio.Queue()
        rid = f"{'chatcmpl' if obj.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex}"
        chat = obj.startswith("chat")

        def chunk(choices: list, **extra) -> str:
            payload = {"id": rid, "object": obj, "created": int(time.time()), "model": body.model, "choices": choices, **extra}
            return f"data: {json.dumps(payload)}\n\n"

        def choice(i: int, text: str | None, finish: str | None) -> dict:
            if chat:
                delta = {} if text is None else {"role": "assistant", "content": text}
                return {"index": i, "delta": delta, "finish_reason": finish}
            return {"index": i, "text": text or "", "finish_reason": finish}

        def emitter(i: int):
            async def emit(delta: str) -> None:
                await queue.put(chunk([choice(i, delta, None)]))

            return emit

        async def produce():
            try:
                results = await coordinator.run(body.model, request, body.n, [emitter(i) for i in range(body.n)])
                await queue.put(chunk([choice(i, None, r.finish_reason) for i, r in enumerate(results)]))
                await queue.put(chunk([], usage=_usage(results), collab=_collab(results)))
            except Exception as e:  # the stream is open: report in-band, as OpenAI does
                status = 503 if isinstance(e, (ModelUnavailable, asyncio.TimeoutError)) else 400 if isinstance(e, ValueError) else 500
                await queue.put(f"data: {json.dumps({'error': {'message': str(e), 'code': status}})}\n\n")
            await queue.put(None)

        async def events():
            task = asyncio.ensure_future(produce())
            try:
                while (item := await queue.get()) is not None:
                    yield item
                yield "data: [DONE]\n\n"
            finally:
                task.cancel()

        return StreamingResponse(events(), media_type="text/event-stream")

    async def _token_texts(pipeline: str, r: StrategyResult) -> list[str]:
        backend = coordinator.pipeline(pipeline).models[r.meta["output_model"]]
        return list(await asyncio.gather(*(backend.decode([t], False) for t in r.token_ids)))

    async def _completion_logprobs(pipeline: str, r: StrategyResult) -> dict | None:
        if r.token_ids is None or r.logprobs is None or "output_model" not in r.meta:
            return None
        tokens = await _token_texts(pipeline, r)
        offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
        return {"tokens": tokens, "token_logprobs": r.logprobs, "top_logprobs": None, "text_offset": offsets}

    async def _chat_logprobs(pipeline: str, r: StrategyResult) -> list | None:
        if r.token_ids is None or r.logprobs is None or "output_model" not in r.meta:
            return None
        tokens = await _token_texts(pipeline, r)
        return [
            {"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []} for t, lp in zip(tokens, r.logprobs)
        ]

    return app
