"""The strategy registry, pipelines and per-model metering (the `single` strategy)."""

import pytest

from collab_ray.core import ConfigError, SamplingParams
from collab_ray.core.pipeline import Pipeline
from collab_ray.core.strategy import Request, get_strategy, load_strategies
from conftest import run


def test_single_equals_backend_generate(backends):
    models = backends(m="tiny:llama-bpe")
    params = SamplingParams(temperature=0, max_tokens=12)
    result = run(Pipeline("single", models).run(Request(prompt="The river", params=params)))
    (gen,) = run(models["m"].generate(["The river"], params))
    assert result.text == gen.text and result.token_ids == gen.token_ids
    assert result.meta["strategy"] == "single"
    stats = result.meta["models"]["m"]
    assert stats["calls"] == 1 and stats["completion_tokens"] == 12 and stats["latency_s"] > 0


def test_single_streaming_equals_non_streaming(backends):
    models = backends(m="tiny:llama-bpe")
    deltas = []

    async def emit(text):
        deltas.append(text)

    for params in (SamplingParams(temperature=0, max_tokens=15), SamplingParams(temperature=0, max_tokens=30, stop=["the"])):
        deltas.clear()
        request = Request(prompt="The river", params=params)
        streamed = run(Pipeline("single", models).run(request, emit))
        plain = run(Pipeline("single", models).run(request))
        assert streamed.text == plain.text == "".join(deltas) and streamed.finish_reason == plain.finish_reason
        # the streamed ids may run past a stop string to the end of their decoding chunk
        assert streamed.token_ids[: len(plain.token_ids)] == plain.token_ids


def test_single_chat_uses_the_chat_template(backends):
    models = backends(m="tiny:llama-bpe")
    msgs = [{"role": "user", "content": "hi"}]
    result = run(Pipeline("single", models).run(Request(messages=msgs, params=SamplingParams(temperature=0, max_tokens=4))))
    prompt = run(models["m"].apply_chat_template(msgs))
    assert result.usage.prompt_tokens == len(run(models["m"].encode(prompt)))


def test_registry_errors_name_the_value(backends):
    assert "single" in load_strategies()
    with pytest.raises(ConfigError, match="'nope'"):
        get_strategy("nope")
    with pytest.raises(ConfigError, match="at most 1"):
        Pipeline("single", backends(a="tiny:llama-bpe", b="tiny:llama-bpe"))
    with pytest.raises(ValueError, match="exactly one of prompt or messages"):
        Request()
