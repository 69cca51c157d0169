"""The HTTP API against malformed and hostile requests: each gets the expected 4xx in OpenAI's shape
(`{"error": {"message", "type", "param", "code"}}`, no traceback, path, address or actor id, the
request id in the body and the `x-request-id` header), and the server stays healthy after every one.
"""

from __future__ import annotations

import json

import pytest
import requests

from serve_harness import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}
JSON = {**AUTH, "Content-Type": "application/json"}
C = "/v1/completions"
CH = "/v1/chat/completions"
OK_MSGS = [{"role": "user", "content": "hi"}]


def comp(**fields):
    return {"model": "target", "prompt": "The river", "max_tokens": 2, **fields}


def chat(**fields):
    return {"model": "target", "messages": OK_MSGS, "max_tokens": 2, **fields}


def case(id_, status, body=None, *, path=C, method="POST", param=None, raw=None, headers=None, contains=None):
    return pytest.param(method, path, body, raw, headers, status, param, contains, id=id_)


# fields of the completions endpoint and values of a wrong JSON type for each (no coercion)
WRONG_TYPES = {
    "model": [42, None, ["target"]],
    "prompt": [42, None, {"text": "x"}, [1.5], [["a"]], True],
    "max_tokens": ["16", 1.5, True],
    "temperature": ["0.5", [0.5], True],
    "top_p": ["1", {}],
    "top_k": ["5", 2.5],
    "n": ["2", 1.0],
    "stream": ["yes", 1],
    "stop": [5, [1, 2], {"s": 1}],
    "seed": ["7", 7.5],
    "ignore_eos": ["yes", 1, "true"],
    "frequency_penalty": ["0.1"],
    "presence_penalty": [[0.1]],
    "repetition_penalty": ["1.1"],
    "logit_bias": [[1, 2], "x", {"5": "1"}],
    "min_tokens": ["2", 1.5],
    "user": [5],
    "logprobs": ["1", True, 1.5],
    "echo": ["yes", 0],
    "best_of": ["2"],
    "stream_options": ["x", {"include_usage": "yes"}],
}

OUT_OF_RANGE = [
    ("max_tokens", 0), ("max_tokens", -1), ("max_tokens", 10**9), ("max_tokens", 2**64),
    ("temperature", -0.1), ("temperature", 2.5), ("temperature", 1e308), ("top_p", 0), ("top_p", 1.5),
    ("top_k", -2), ("n", 0), ("n", 129), ("seed", -1), ("seed", 2**63), ("seed", 2**64), ("seed", 10**30),
    ("logprobs", 21), ("logprobs", -1), ("frequency_penalty", 2.5), ("presence_penalty", -2.5),
    ("repetition_penalty", 0), ("repetition_penalty", 11), ("min_tokens", -1), ("best_of", 0),
]  # fmt: skip

UNSUPPORTED = [
    ("suffix", "def f():"), ("best_of", 3), ("tools", [{"type": "function", "function": {"name": "f"}}]),
    ("functions", [{"name": "f"}]), ("stop_token_ids", [2]), ("guided_json", {"type": "object"}),
    ("guided_regex", "a+"), ("guided_choice", ["a"]), ("use_beam_search", True), ("min_p", 0.1),
    ("response_format", {"type": "json_object"}), ("prompt_logprobs", 1), ("made_up_field", 1),
    ("frequency_penalty", 0.5, "speculative"), ("logit_bias", {"5": 10}, "fuse"), ("logit_bias", {"5": 10}, "vote"), ("min_tokens", 2, "fuse"),
    ("repetition_penalty", 1.2, "contrastive"),
]  # fmt: skip

CASES = [
    # ---- wrong JSON types, field by field: 400 naming the field ----
    *[case(f"type-{f}-{json.dumps(v)[:20]}", 400, comp(**{f: v}), param=f) for f, vs in WRONG_TYPES.items() for v in vs],
    # ---- values out of bounds ----
    *[case(f"range-{f}-{str(v)[:12]}", 400, comp(**{f: v}), param=f) for f, v in OUT_OF_RANGE],
    # ---- known but unsupported fields, and unknown ones ----
    *[case(f"unsupported-{u[0]}-{u[2] if len(u) > 2 else 'target'}", 400, comp(model=u[2] if len(u) > 2 else "target", **{u[0]: u[1]}), param=u[0])
      for u in UNSUPPORTED],  # fmt: skip
    case("stream_options-without-stream", 400, comp(stream_options={"include_usage": True}), param="stream_options"),
    case("continuous-usage-stats", 400, comp(stream=True, stream_options={"continuous_usage_stats": True}), param="stream_options.continuous_usage_stats"),
    case("logprobs-with-stream", 400, comp(stream=True, logprobs=1), param="logprobs"),
    case("echo-with-stream", 400, comp(stream=True, echo=True), param="echo"),
    case("logprobs-compress", 400, comp(model="compress", logprobs=1), param="logprobs"),
    case("stream-list-of-prompts", 400, comp(stream=True, prompt=["a", "b"]), param="prompt"),
    # ---- prompts ----
    case("prompt-empty", 400, comp(prompt=""), param="prompt"),
    case("prompt-list-empty", 400, comp(prompt=[]), param="prompt"),
    case("prompt-list-with-empty", 400, comp(prompt=["a", ""]), param="prompt"),
    case("prompt-over-context", 400, comp(prompt="river " * 3000), param="prompt", contains="context"),
    case("prompt-over-context-list", 400, comp(prompt=["ok", "river " * 3000]), param="prompt"),
    case("prompt-ids-outside-vocab", 400, comp(prompt=[1, 99999]), param="prompt", contains="99999"),
    case("prompt-ids-negative", 400, comp(prompt=[1, -5]), param="prompt"),
    case("prompt-ids-huge", 400, comp(prompt=[2**40]), param="prompt"),
    case("prompt-ids-nested-outside", 400, comp(prompt=[[1, 286], [700000]]), param="prompt"),
    case("prompt-ids-empty-inner", 400, comp(prompt=[[]]), param="prompt"),
    case("choices-over-limit", 400, comp(prompt=["a"] * 5, n=16), param="n", contains="64"),
    case("stop-too-many", 400, comp(stop=[f"s{i}" for i in range(17)]), param="stop"),
    case("stop-empty-string", 400, comp(stop=[""]), param="stop"),
    case("stop-too-long", 400, comp(stop="x" * 300), param="stop"),
    case("min-over-max", 400, comp(min_tokens=5, max_tokens=2)),
    case("logit-bias-301", 400, comp(logit_bias={str(i): 1 for i in range(301)}), param="logit_bias"),
    # ---- model names ----
    case("model-unknown", 404, comp(model="nope"), param="model"),
    case("model-empty", 400, comp(model=""), param="model"),
    case("model-long", 400, comp(model="m" * 300), param="model"),
    case("model-missing", 400, {"prompt": "x"}, param="model"),
    case("prompt-missing", 400, {"model": "target"}, param="prompt"),
    # ---- chat ----
    case("chat-messages-missing", 400, {"model": "target"}, path=CH, param="messages"),
    case("chat-messages-empty", 400, chat(messages=[]), path=CH, param="messages"),
    case("chat-messages-not-list", 400, chat(messages="hi"), path=CH, param="messages"),
    case("chat-role-bad", 400, chat(messages=[{"role": "wizard", "content": "x"}]), path=CH, param="messages.0.role"),
    case("chat-role-missing", 400, chat(messages=[{"content": "x"}]), path=CH, param="messages.0.role"),
    case("chat-content-int", 400, chat(messages=[{"role": "user", "content": 5}]), path=CH, param="messages.0.content"),
    case("chat-content-null-user", 400, chat(messages=[{"role": "user", "content": None}]), path=CH, param="messages.0.content"),
    case("chat-image-part", 400, chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]),
         path=CH, param="messages.0.content.0.type", contains="image_url"),  # fmt: skip
    case("chat-audio-part", 400, chat(messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]),
         path=CH, param="messages.0.content.0.type"),  # fmt: skip
    case("chat-text-part-no-text", 400, chat(messages=[{"role": "user", "content": [{"type": "text"}]}]), path=CH),
    case("chat-tool-role", 400, chat(messages=[*OK_MSGS, {"role": "tool", "content": "r", "tool_call_id": "c1"}]), path=CH, param="messages.1.role"),
    case("chat-tool-calls", 400, chat(messages=[*OK_MSGS, {"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]}]), path=CH,
         param="messages.1.tool_calls"),  # fmt: skip
    case("chat-message-extra-field", 400, chat(messages=[{"role": "user", "content": "x", "mood": "happy"}]), path=CH, param="messages.0.mood"),
    case("chat-top-logprobs-alone", 400, chat(top_logprobs=2), path=CH, param="top_logprobs"),
    case("chat-top-logprobs-21", 400, chat(logprobs=True, top_logprobs=21), path=CH, param="top_logprobs"),
    case("chat-logprobs-int", 400, chat(logprobs=1), path=CH, param="logprobs"),
    case("chat-max-completion-str", 400, chat(max_completion_tokens="5"), path=CH, param="max_completion_tokens"),
    case("chat-max-both-differ", 400, chat(max_completion_tokens=3), path=CH, param="max_completion_tokens"),
    case("chat-json-object", 400, chat(response_format={"type": "json_object"}), path=CH, param="response_format"),
    case("chat-json-schema", 400, chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}), path=CH,
         param="response_format"),  # fmt: skip
    case("chat-format-unknown", 400, chat(response_format={"type": "yaml"}), path=CH, param="response_format.type"),
    case("chat-tools", 400, chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), path=CH, param="tools"),
    case("chat-tool-choice-required", 400, chat(tool_choice="required"), path=CH, param="tool_choice"),
    case("chat-tool-choice-object", 400, chat(tool_choice={"type": "function", "function": {"name": "f"}}), path=CH, param="tool_choice"),
    case("chat-echo", 400, chat(echo=True), path=CH, param="echo"),
    case("chat-over-context", 400, chat(messages=[{"role": "user", "content": "river " * 3000}]), path=CH, param="messages"),
    case("chat-logprobs-federated", 400, chat(model="federated", logprobs=True), path=CH, param="logprobs"),
    case("chat-n-over-limit", 400, chat(n=65), path=CH, param="n"),
    # ---- broken text ----
    case("surrogate-prompt", 400, raw=b'{"model": "target", "prompt": "a\\ud800b"}', param="prompt", contains="surrogate"),
    case("surrogate-low", 400, raw=b'{"model": "target", "prompt": "a\\udfffb"}', param="prompt"),
    case("surrogate-chat", 400, raw=b'{"model": "target", "messages": [{"role": "user", "content": "\\ud83d"}]}', path=CH,
         param="messages.0.content"),  # fmt: skip
    case("surrogate-stop", 400, raw=b'{"model": "target", "prompt": "x", "stop": ["\\udc00"]}', param="stop.0"),
    case("surrogate-key", 400, raw=b'{"model": "target", "prompt": "x", "\\ud800": 1}'),
    case("nul-prompt", 400, comp(prompt="a\x00b"), param="prompt", contains="NUL"),
    case("nul-model", 400, comp(model="tar\x00get"), param="model"),
    case("nul-chat", 400, chat(messages=[{"role": "user", "content": "\x00"}]), path=CH, param="messages.0.content"),
    case("invalid-utf8", 400, raw=b'{"model": "target", "prompt": "\xff\xfe"}', contains="UTF-8"),
    case("invalid-utf8-overlong", 400, raw=b'{"model": "target", "prompt": "\xc0\xaf"}'),
    case("utf16-body", 400, raw='{"model": "target", "prompt": "x"}'.encode("utf-16")),
    # ---- JSON ----
    case("json-invalid", 400, raw=b"{not json", contains="JSON"),
    case("json-truncated", 400, raw=b'{"model": "target", "prompt": "x"'),
    case("json-empty-body", 400, raw=b""),
    case("json-array", 422, raw=b"[1, 2]"),
    case("json-string", 422, raw=b'"hello"'),
    case("json-null", 422, raw=b"null"),
    case("json-deep-100k", 400, raw=b"[" * 100_000 + b"]" * 100_000, contains="deep"),
    case("json-deep-object", 400, raw=b'{"model": "target", "prompt": "x", "user": ' + b'{"a":' * 50 + b"1" + b"}" * 50 + b"}"),
    case("json-deep-prompt", 400, raw=b'{"model": "target", "prompt": ' + b"[" * 40 + b"1" + b"]" * 40 + b"}"),
    case("json-nan", 400, raw=b'{"model": "target", "prompt": "x", "temperature": NaN}'),
    case("json-infinity", 400, raw=b'{"model": "target", "prompt": "x", "temperature": Infinity}'),
    case("json-huge-int", 400, raw=b'{"model": "target", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}"),
    case("json-huge-float", 400, raw=b'{"model": "target", "prompt": "x", "temperature": 1e999}'),
    case("json-trailing-garbage", 400, raw=b'{"model": "target", "prompt": "x"} xyz'),
    # ---- content types ----
    case("ctype-text", 415, comp(), headers={**AUTH, "Content-Type": "text/plain"}),
    case("ctype-form", 415, comp(), headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"}),
    case("ctype-missing", 415, comp(), headers=AUTH),
    case("ctype-multipart", 415, comp(), headers={**AUTH, "Content-Type": "multipart/form-data; boundary=x"}),
    case("ctype-xml", 415, comp(), path=CH, headers={**AUTH, "Content-Type": "application/xml"}),
    # ---- methods and paths ----
    case("get-completions", 405, method="GET"),
    case("put-chat", 405, path=CH, method="PUT"),
    case("delete-models", 405, path="/v1/models", method="DELETE"),
    case("post-models", 405, {}, path="/v1/models"),
    case("post-health", 405, {}, path="/health"),
    case("patch-completions", 405, method="PATCH"),
    case("unknown-v1-path", 404, path="/v1/engines", method="GET"),
    case("unknown-root-path", 404, path="/admin", method="GET"),
    case("v2-path", 404, path="/v2/models", method="GET"),
    case("traversal-path", 404, path="/v1/../../etc/passwd", method="GET"),
    case("unknown-model-retrieve", 404, path="/v1/models/nope", method="GET", param="model"),
    case("docs-disabled", 404, path="/docs", method="GET"),
    case("openapi-disabled", 404, path="/openapi.json", method="GET"),
    # ---- auth ----
    case("auth-missing", 401, comp(), headers={"Content-Type": "application/json"}),
    case("auth-wrong-key", 401, comp(), headers={"Content-Type": "application/json", "Authorization": "Bearer nope"}),
    case("auth-no-scheme", 401, comp(), headers={"Content-Type": "application/json", "Authorization": API_KEY}),
    case("auth-basic", 401, comp(), headers={"Content-Type": "application/json", "Authorization": f"Basic {API_KEY}"}),
    case("auth-bearer-only", 401, comp(), headers={"Content-Type": "application/json", "Authorization": "Bearer"}),
    case("auth-models", 401, path="/v1/models", method="GET", headers={}),
    case("auth-tokenize", 401, {"model": "target", "prompt": "x"}, path="/tokenize", headers={"Content-Type": "application/json"}),
    # ---- limits ----
    case("body-over-limit", 413, raw=b'{"model": "target", "prompt": "' + b"x" * (5 * 1024 * 1024) + b'"}'),
    # ---- tokenize / detokenize ----
    case("tokenize-neither", 400, {"model": "target"}, path="/tokenize"),
    case("tokenize-both", 400, {"model": "target", "prompt": "x", "messages": OK_MSGS}, path="/tokenize"),
    case("tokenize-unknown-model", 404, {"model": "nope", "prompt": "x"}, path="/tokenize", param="model"),
    case("tokenize-prompt-int", 400, {"model": "target", "prompt": 5}, path="/tokenize", param="prompt"),
    case("detokenize-outside-vocab", 400, {"model": "target", "tokens": [1, 100000]}, path="/detokenize", param="tokens"),
    case("detokenize-negative", 400, {"model": "target", "tokens": [-1]}, path="/detokenize", param="tokens.0"),
    case("detokenize-strings", 400, {"model": "target", "tokens": ["a"]}, path="/detokenize", param="tokens.0"),
]

LEAKS = ("Traceback", 'File "', "site-packages", "pid=", "ray::", "Actor", "192.0.2", "127.0.0.1", "\x1b[", ".py")


def test_the_table_holds_at_least_120_requests():
    assert len(CASES) >= 120, len(CASES)


@pytest.fixture(scope="module")
def base(serve_app):
    return serve_app.url.removesuffix("/v1")


@pytest.mark.parametrize("method, path, body, raw, headers, status, param, contains", CASES)
def test_hostile_request_gets_an_openai_error_and_the_server_stays_healthy(base, method, path, body, raw, headers, status, param, contains):
    data = raw if raw is not None else (None if body is None else json.dumps(body))
    r = requests.request(method, base + path, data=data, headers=JSON if headers is None else headers, timeout=60)
    assert r.status_code == status, r.text[:500]
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and 0 < len(err["message"]) <= 500, err
    assert not any(leak in err["message"] for leak in LEAKS), err["message"]
    if param is not None:  # the field, or a part of it (stream_options.include_usage, logit_bias.5)
        assert err["param"] == param or str(err["param"]).startswith(param + "."), err
    if contains is not None:
        assert contains in err["message"], err["message"]
    assert len(r.content) < 2000  # never the input echoed back whole
    rid = r.headers.get("x-request-id")
    assert rid and err.get("request_id") == rid
    assert requests.get(base + "/health", timeout=30).status_code == 200
