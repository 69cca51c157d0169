"""The HTTP API as OpenAI and vLLM clients use it: the real `openai` client against the Serve app,
and every response parsed with `openai.types`."""

from __future__ import annotations

import json

import openai
import pytest
import requests
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from serve_harness import API_KEY

MSGS = [{"role": "user", "content": "Where does the river run?"}]


@pytest.fixture(scope="module")
def client(serve_app):
    return openai.OpenAI(base_url=serve_app.url, api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def base(serve_app):
    return serve_app.url.removesuffix("/v1")


def post(base, path, body, key=API_KEY):
    return requests.post(base + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def test_the_standard_streaming_loop_works_and_streams_end_as_openai_s_do(client):
    """`for chunk in stream: chunk.choices[0].delta.content` — no chunk without choices unless usage was asked."""
    full = client.chat.completions.create(model="target", messages=MSGS, max_tokens=8, temperature=0).choices[0].message.content
    stream = client.chat.completions.create(model="target", messages=MSGS, max_tokens=8, temperature=0, stream=True)
    text, chunks = "", []
    for chunk in stream:
        chunks.append(chunk)
        text += chunk.choices[0].delta.content or ""
    assert text == full
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length" and all(c.usage is None for c in chunks)
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    # completions too
    parts = [c.choices[0].text for c in client.completions.create(model="target", prompt="The river", max_tokens=6, stream=True)]
    assert "".join(parts) and len(parts) >= 2


def test_stream_options_include_usage_adds_one_last_usage_chunk(client):
    chunks = list(
        client.chat.completions.create(
            model="target", messages=MSGS, max_tokens=5, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert all(c.choices and c.usage is None for c in chunks[:-1])
    comp = list(client.completions.create(model="target", prompt="Two", max_tokens=4, stream=True, stream_options={"include_usage": True}))
    assert comp[-1].choices == [] and comp[-1].usage.total_tokens == comp[-1].usage.prompt_tokens + 4


def test_content_parts_and_assistant_null_content(client):
    parts = [{"type": "text", "text": "Where does the river"}, {"type": "text", "text": "run?"}]
    a = client.chat.completions.create(model="target", messages=[{"role": "user", "content": parts}], max_tokens=6, temperature=0)
    b = client.chat.completions.create(
        model="target", messages=[{"role": "user", "content": "Where does the river\nrun?"}], max_tokens=6, temperature=0
    )
    assert a.choices[0].message.content == b.choices[0].message.content  # text parts joined as vLLM does
    msgs = [*MSGS, {"role": "assistant", "content": None}, {"role": "user", "content": "And then?"}]
    r = client.chat.completions.create(model="target", messages=msgs, max_tokens=3)
    assert isinstance(r, ChatCompletion) and r.choices[0].message.role == "assistant"
    with pytest.raises(openai.BadRequestError, match="image_url"):
        client.chat.completions.create(
            model="target", messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
        )


def test_models_list_and_retrieve(client):
    ids = [m.id for m in client.models.list().data]
    assert "target" in ids and "speculative" in ids
    m = client.models.retrieve("speculative")
    assert isinstance(m, Model) and m.id == "speculative" and m.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_completion_logprobs_with_top_alternatives(client):
    r = client.completions.create(model="target", prompt="The river", max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 5 == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert "".join(lp.tokens) == r.choices[0].text
    for tok, tlp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 3 and tlp <= 0
        assert max(top.values()) == pytest.approx(tlp, abs=1e-4)  # greedy: the chosen token is the most likely
    assert lp.text_offset == sorted(lp.text_offset)


def test_chat_logprobs_and_top_logprobs(client):
    r = client.chat.completions.create(model="target", messages=MSGS, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 4
    for item in content:
        assert len(item.top_logprobs) == 2 and item.logprob <= 0
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob, abs=1e-4)
        assert bytes(item.bytes).decode("utf-8", "replace") == item.token
    plain = client.chat.completions.create(model="target", messages=MSGS, max_tokens=2, logprobs=True)
    assert all(item.top_logprobs == [] for item in plain.choices[0].logprobs.content)


def test_logprobs_of_a_multi_model_pipeline_are_the_output_model_s(client):
    r = client.completions.create(model="speculative", prompt="The river", max_tokens=5, temperature=0, logprobs=1)
    t = client.completions.create(model="target", prompt="The river", max_tokens=5, temperature=0, logprobs=1)
    assert r.choices[0].text == t.choices[0].text  # greedy speculative = the target's own greedy output
    assert r.choices[0].logprobs.token_logprobs == pytest.approx(t.choices[0].logprobs.token_logprobs, abs=1e-4)


def test_echo_and_token_id_prompts(client, base):
    ids = post(base, "/tokenize", {"model": "target", "prompt": "The river"}).json()["tokens"]
    by_text = client.completions.create(model="target", prompt="The river", max_tokens=4, temperature=0)
    by_ids = client.completions.create(model="target", prompt=ids, max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    two = client.completions.create(model="target", prompt=[ids, ids], max_tokens=4, temperature=0)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[1].text == by_text.choices[0].text
    echo = client.completions.create(model="target", prompt="The river", max_tokens=4, temperature=0, echo=True, logprobs=1)
    assert echo.choices[0].text == "The river" + by_text.choices[0].text
    lp = echo.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.tokens) == len(ids) + 4
    assert "".join(lp.tokens) == echo.choices[0].text


def test_tokenize_detokenize_version_health(base):
    tok = post(base, "/tokenize", {"model": "target", "prompt": "The river"}).json()
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] > 0
    assert post(base, "/detokenize", {"model": "target", "tokens": tok["tokens"]}).json()["prompt"] == "The river"
    chat = post(base, "/tokenize", {"model": "sp", "messages": MSGS}).json()
    assert chat["count"] > tok["count"]
    assert requests.get(base + "/version", timeout=10).json()["version"]
    health = requests.get(base + "/health", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_bearer_scheme_is_case_insensitive(base):
    body = {"model": "target", "prompt": "x", "max_tokens": 1}
    for scheme in ("Bearer", "bearer", "BEARER"):
        r = requests.post(base + "/v1/completions", json=body, headers={"Authorization": f"{scheme} {API_KEY}"}, timeout=60)
        assert r.status_code == 200, (scheme, r.text)


def test_every_response_parses_with_openai_types(client, base):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    raw = post(base, "/v1/completions", {"model": "target", "prompt": ["a", "b"], "max_tokens": 3, "n": 2, "logprobs": 2}).json()
    c = Completion.model_validate(raw)
    assert [ch.index for ch in c.choices] == [0, 1, 2, 3] and raw["collab"]["choices"]
    raw = post(base, "/v1/chat/completions", {"model": "target", "messages": MSGS, "max_tokens": 3, "logprobs": True, "top_logprobs": 1}).json()
    ChatCompletion.model_validate(raw)
    Model.model_validate(requests.get(base + "/v1/models/target", headers=headers, timeout=10).json())
    with requests.post(
        base + "/v1/chat/completions", json={"model": "target", "messages": MSGS, "max_tokens": 3, "stream": True, "n": 2},
        headers=headers, stream=True, timeout=60,
    ) as r:  # fmt: skip
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == b"data: [DONE]"
    chunks = [ChatCompletionChunk.model_validate(json.loads(ln[6:])) for ln in lines[:-1]]
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1}
    assert sorted(ch.index for c in chunks for ch in c.choices if ch.finish_reason) == [0, 1]


def test_sampling_extras_are_refused_where_the_engine_does_not_sample(client):
    """Pipelines that sample outside the engine refuse the extras with a 400 naming the field."""
    with pytest.raises(openai.BadRequestError, match="frequency_penalty"):
        client.completions.create(model="speculative", prompt="x", max_tokens=2, frequency_penalty=1.0)
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.completions.create(model="vote", prompt="x", max_tokens=2, logit_bias={"5": 1})
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        client.completions.create(model="target", prompt="x", max_tokens=2, logit_bias={"99999": 1})
    assert client.completions.create(model="speculative", prompt="x", max_tokens=2, frequency_penalty=0).choices  # a no-op value


def test_sampling_extras_reach_the_engine(client, base):
    """logit_bias with greedy decoding forces one token (min_tokens keeps EOS away), streamed or not."""
    tok = post(base, "/tokenize", {"model": "target", "prompt": " the", "add_special_tokens": False}).json()["tokens"][-1]
    text = post(base, "/detokenize", {"model": "target", "tokens": [tok]}).json()["prompt"]
    r = client.completions.create(
        model="target", prompt="The river", max_tokens=4, temperature=0, logit_bias={str(tok): 100}, extra_body={"min_tokens": 4}
    )
    assert r.choices[0].text == text * 4 and r.usage.completion_tokens == 4
    streamed = client.completions.create(
        model="target", prompt="The river", max_tokens=4, temperature=0, logit_bias={str(tok): 100}, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text * 4
    assert client.completions.create(model="vote", prompt="x", max_tokens=2, frequency_penalty=0.5).choices
