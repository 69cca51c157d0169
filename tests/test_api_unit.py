"""The HTTP API in-process (no Ray): the ASGI app over a coordinator of fake models, for what is hard
to provoke on the real server — per-key concurrency, model errors carrying tracebacks, request ids
in the server log — and the error helpers."""

from __future__ import annotations

import asyncio
import json
import logging


from collab_ray.config import parse_config
from collab_ray.core.errors import ModelAtCapacity
from collab_ray.core.types import Generation, ModelInfo, Proposal, SessionStart, Usage
from collab_ray.serving.api_errors import root_cause, scrub
from collab_ray.serving.coordinator import Coordinator
from collab_ray.serving.openai_api import classify, create_app

KEY = "k-123"
RAY_TRACE = (
    "\x1b[36mray::ServeReplica:collab:model-target.handle_request()\x1b[39m (pid=4242, ip=10.0.3.7, "
    "actor_id=8f1c2b6a9d7e4f30a1b2c3d4e5f60718293a4b5c)\nTraceback (most recent call last):\n"
    '  File "/usr/lib/python3.11/site-packages/ray/serve/_private/replica.py", line 1, in x\n'
    "ValueError: prompt has 900 tokens, leaving no room in the context of 'target'"
)


class FakeModel:
    """A ModelBackend stand-in: text is bytes mod 100, generation returns 'ok' (or waits/fails on demand)."""

    def __init__(self):
        self.gate: asyncio.Event | None = None
        self.fail: Exception | None = None
        self.proposals_before_failing = 0  # streams: proposals that succeed before `fail` is raised

    async def info(self):
        return ModelInfo("fake", 100, (0,), None, None, (0,), False, 64)

    async def token_strings(self):
        return [chr(97 + i % 26) for i in range(100)]

    async def encode(self, text, add_special_tokens=True):
        return [b % 100 for b in text.encode()]

    async def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids)

    async def apply_chat_template(self, messages, add_generation_prompt=True):
        return "\n".join(m["content"] for m in messages)

    async def generate(self, prompts, params):
        if self.fail is not None:
            raise self.fail
        if self.gate is not None:
            await self.gate.wait()
        return [Generation("ok", [1, 2], [-0.1, -0.2], "length", Usage(len(p), 2)) for p in prompts]

    async def open_session(self, prompt_ids, *, session_id=None, top_k=None):
        return SessionStart(session_id or "s", len(prompt_ids), None)

    async def propose(self, session_id, k, params, *, top_k=None):
        if self.fail is not None:
            if self.proposals_before_failing <= 0:
                raise self.fail
            self.proposals_before_failing -= 1
        return Proposal([1] * k, None)

    async def close_session(self, session_id):
        pass


def make_app(**server):
    config = parse_config({"models": {"m": {"source": "tiny:llama-bpe"}}, "server": server})
    model = FakeModel()
    return create_app(Coordinator(config, {"m": model}), api_key=KEY), model


async def call(app, method: str, path: str, body=None, headers: dict | None = None):
    """One request through the ASGI app: (status, headers, parsed or raw body)."""
    data = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json", **(headers or {})}
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000),
    }  # fmt: skip
    inbox = [{"type": "http.request", "body": data, "more_body": False}]
    sent = []

    async def receive():
        if inbox:
            return inbox.pop(0)
        await asyncio.Event().wait()

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    start = sent[0]
    raw = b"".join(m.get("body", b"") for m in sent[1:])
    hdrs = {k.decode(): v.decode() for k, v in start["headers"]}
    try:
        return start["status"], hdrs, json.loads(raw)
    except ValueError:
        return start["status"], hdrs, raw


COMPLETION = {"model": "m", "prompt": "hello", "max_tokens": 2}


def test_concurrent_requests_per_key_are_limited_with_429():
    async def scenario():
        app, model = make_app(max_concurrent_requests_per_key=2)
        model.gate = asyncio.Event()
        first = [asyncio.ensure_future(call(app, "POST", "/v1/completions", COMPLETION)) for _ in range(2)]
        await asyncio.sleep(0.05)
        third = await call(app, "POST", "/v1/completions", COMPLETION)
        health = await call(app, "GET", "/health")  # not counted against the key
        model.gate.set()
        done = await asyncio.gather(*first)
        after = await call(app, "POST", "/v1/completions", COMPLETION)
        chat = await call(app, "POST", "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 3})
        return third, health, done, after, chat

    third, health, done, after, chat = asyncio.run(scenario())
    assert chat[0] == 200 and [c["message"]["content"] for c in chat[2]["choices"]] == ["ok"] * 3
    assert third[0] == 429 and third[2]["error"]["type"] == "rate_limit_error" and "limit 2" in third[2]["error"]["message"]
    assert third[1]["retry-after"] == "1"
    assert health[0] == 200
    assert [d[0] for d in done] == [200, 200] and after[0] == 200


def test_model_errors_reach_the_client_without_traceback_and_the_log_has_it_under_the_request_id():
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("collab_ray.api").addHandler(handler)
    try:

        async def scenario():
            app, model = make_app()
            model.fail = ValueError(RAY_TRACE)
            bad = await call(app, "POST", "/v1/completions", COMPLETION)
            model.fail = RuntimeError("CUDA error at /opt/conda/lib/libtorch.so on 10.1.2.3")
            boom = await call(app, "POST", "/v1/completions", COMPLETION)
            model.fail = RuntimeError("failure at /srv/app.py")
            early = await call(app, "POST", "/v1/completions", {**COMPLETION, "stream": True})
            model.proposals_before_failing = 2
            stream = await call(app, "POST", "/v1/completions", {**COMPLETION, "max_tokens": 40, "stream": True})
            return bad, boom, early, stream

        bad, boom, early, stream = asyncio.run(scenario())
    finally:
        logging.getLogger("collab_ray.api").removeHandler(handler)
    status, headers, body = bad
    assert status == 400 and body["error"]["message"] == "ValueError: prompt has 900 tokens, leaving no room in the context of 'target'"
    status, headers, body = boom
    assert status == 500 and "internal error" in body["error"]["message"] and "CUDA" not in body["error"]["message"]
    rid = headers["x-request-id"]
    assert body["error"]["request_id"] == rid
    logged = [r for r in records if rid in r.getMessage()]
    assert logged and logged[0].exc_info is not None  # the full traceback is in the server log
    status, _, body = early  # failed before its first token: the real status, not a 200 stream
    assert status == 500 and body["error"]["type"] == "internal_server_error" and "/srv" not in body["error"]["message"]
    status, _, raw = stream  # failed mid-way: an OpenAI error event, then [DONE]
    events = [json.loads(line[6:]) for line in raw.decode().split("\n\n") if line.startswith("data: {")]
    assert status == 200 and events[0]["choices"][0]["text"] and "/srv" not in events[-1]["error"]["message"]
    assert events[-1]["error"]["type"] == "internal_server_error" and raw.decode().rstrip().endswith("data: [DONE]")


def test_body_size_prompt_tokens_and_choices_limits():
    async def scenario():
        app, _ = make_app(max_body_bytes=2048, max_prompt_tokens=10, max_choices_per_request=4)
        big = await call(app, "POST", "/v1/completions", {**COMPLETION, "prompt": "x" * 3000})
        declared = await call(app, "POST", "/v1/completions", b"{}", headers={"content-length": "999999"})
        long = await call(app, "POST", "/v1/completions", {**COMPLETION, "prompt": "x" * 11})
        fits = await call(app, "POST", "/v1/completions", {**COMPLETION, "prompt": "x" * 10})
        many = await call(app, "POST", "/v1/completions", {**COMPLETION, "prompt": ["a", "b", "c"], "n": 2})
        chat = await call(app, "POST", "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        return big, declared, long, fits, many, chat

    big, declared, long, fits, many, chat = asyncio.run(scenario())
    assert chat[0] == 400 and chat[2]["error"]["param"] == "messages"  # the rendered chat is over 10 tokens
    assert big[0] == 413 and declared[0] == 413
    assert long[0] == 400 and "limit is 10" in long[2]["error"]["message"] and long[2]["error"]["param"] == "prompt"
    assert fits[0] == 200
    assert many[0] == 400 and many[2]["error"]["param"] == "n"


def test_scrub_removes_tracebacks_paths_addresses_and_ids():
    text = scrub(RAY_TRACE)
    assert text == "ValueError: prompt has 900 tokens, leaving no room in the context of 'target'"
    line = scrub("\x1b[31mfailed\x1b[0m at /home/u/x/y.py on 192.168.1.20:6379 actor 8f1c2b6a9d7e4f30a1b2c3d4e5f60718 pid=77")
    assert line == "failed at <path> on <address> actor <id> pid=<pid>"
    assert len(scrub("x" * 5000)) == 500


def test_classify_unwraps_ray_errors():
    class Wrapped(Exception):
        def __init__(self, cause):
            super().__init__(RAY_TRACE)
            self.cause = cause

    inner = ValueError("bad prompt")
    assert root_cause(Wrapped(inner)) is inner
    assert classify(Wrapped(inner)).status == 400 and classify(Wrapped(inner)).message == "bad prompt"
    assert classify(asyncio.TimeoutError()).status == 503
    busy = classify(ModelAtCapacity("model 'm': 900 tokens of KV cache, more than its budget"))
    assert busy.status == 503 and busy.headers == {"retry-after": "1"} and "budget" in busy.message
    assert classify(KeyError("x")).status == 500
