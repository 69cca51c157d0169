"""The Serve layer: the OpenAI API through the real `openai` client, batching, replicas, replay, errors."""

import asyncio
import json

import requests
import numpy as np
import openai
import pytest

from collab_ray.config import load_config, parse_config
from collab_ray.core import ConfigError, SamplingParams
from conftest import local_backend, run
from serve_harness import API_KEY
from test_backend import session_greedy


@pytest.fixture(scope="module")
def client(serve_app):
    return openai.OpenAI(base_url=serve_app.url, api_key=API_KEY, max_retries=0)


def test_list_models_names_every_model_pipeline(client):
    ids = {m.id for m in client.models.list().data}
    assert {"target", "draft", "sp", "target2"} <= ids


def test_completion_at_temperature_0_equals_in_process(client):
    r = client.completions.create(model="target", prompt="The river", max_tokens=12, temperature=0)
    (gen,) = run(local_backend("tiny:llama-bpe").generate(["The river"], SamplingParams(temperature=0, max_tokens=12)))
    assert r.choices[0].text == gen.text
    assert r.usage.completion_tokens == len(gen.token_ids) and r.usage.prompt_tokens == gen.usage.prompt_tokens
    collab = r.model_extra["collab"]
    assert collab["strategy"] == "single" and collab["models"]["target"]["calls"] == 1


def test_chat_equals_in_process_with_chat_template(client):
    msgs = [{"role": "user", "content": "Where does the river run?"}]
    r = client.chat.completions.create(model="sp", messages=msgs, max_tokens=10, temperature=0)
    sp = local_backend("tiny:llama-sp")
    (gen,) = run(sp.generate([run(sp.apply_chat_template(msgs))], SamplingParams(temperature=0, max_tokens=10)))
    assert r.choices[0].message.content == gen.text and r.choices[0].message.role == "assistant"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_reassembles_to_the_full_text(client):
    full = client.completions.create(model="target", prompt="Two plus", max_tokens=10, temperature=0).choices[0].text
    chunks = list(
        client.completions.create(
            model="target", prompt="Two plus", max_tokens=10, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    deltas = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert "".join(deltas) == full and len(deltas) > 1  # streamed incrementally
    assert chunks[-1].usage.completion_tokens == 10
    chat = list(
        client.chat.completions.create(
            model="target", messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0, stream=True
        )
    )
    assert any(c.choices and c.choices[0].finish_reason == "length" for c in chat)


def test_n_seeded_completions_are_reproducible(client):
    kwargs = dict(model="target", prompt="The baker", max_tokens=12, temperature=1.0, n=3, seed=11)
    a = client.completions.create(**kwargs)
    b = client.completions.create(**kwargs)
    assert len(a.choices) == 3 and [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # different seeds per choice
    assert a.usage.completion_tokens <= 36


def test_ignore_eos_generates_max_tokens(client):
    r = client.completions.create(model="target", prompt="The end.", max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 40 and r.choices[0].finish_reason == "length"


def test_logprobs_are_returned(client):
    r = client.completions.create(model="target", prompt="The river", max_tokens=5, temperature=0, logprobs=1)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 5 == len(lp.token_logprobs) and all(x <= 0 for x in lp.token_logprobs)
    assert "".join(lp.tokens) == r.choices[0].text


def test_error_statuses(serve_app, client):
    with pytest.raises(openai.NotFoundError, match="nope"):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="1000000"):
        client.completions.create(model="target", prompt="x", max_tokens=1_000_000)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="target", prompt="x", temperature=-1)
    wrong = openai.OpenAI(base_url=serve_app.url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model="target", prompt="x")
    assert requests.get(serve_app.url + "/models").status_code == 401  # no key at all


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        json.dumps({"model": "target", "prompt": ""}).encode(),
        json.dumps({"model": "target", "prompt": "x", "max_tokens": "many"}).encode(),
        json.dumps({"model": "target", "prompt": 42}).encode(),
        json.dumps({"model": "target", "prompt": "x", "max_tokens": 10**9}).encode(),
        json.dumps({"model": "target", "prompt": "x", "stop": [""]}).encode(),
        json.dumps({"prompt": "x"}).encode(),
        json.dumps({"model": "target", "prompt": "x", "n": 0}).encode(),
    ],
)
def test_malformed_requests_get_4xx_and_the_server_stays_up(serve_app, client, body):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    r = requests.post(serve_app.url + "/completions", data=body, headers=headers, timeout=30)
    assert 400 <= r.status_code < 500, r.text
    assert "message" in r.json()["error"]
    assert client.completions.create(model="target", prompt="ok", max_tokens=2).choices


def test_two_replicas_serve_eight_concurrent_sessions(serve_app):
    from collab_ray.serving.handle_backend import ServeBackend

    backend = ServeBackend(serve_app.handle("target2"), "target2")
    local = local_backend("tiny:llama-bpe")
    prompts = [run(local.encode(f"The river {i}")) for i in range(8)]
    expected = [run(session_greedy(local, p, 12)) for p in prompts]

    async def all_sessions():
        return await asyncio.gather(*(session_greedy(backend, p, 12) for p in prompts))

    assert run(all_sessions()) == expected


def test_killing_a_replica_mid_session_replays_or_fails_cleanly(serve_app):
    """Sessions on a killed replica are re-opened by replay elsewhere and finish with the right tokens."""
    import ray

    from collab_ray.serving.handle_backend import ModelUnavailable, ServeBackend

    backend = ServeBackend(serve_app.handle("target2"), "target2", call_timeout_s=60, retries=4)
    local = local_backend("tiny:llama-bpe")
    prompts = [run(local.encode(f"A small boat {i}")) for i in range(6)]
    expected = [run(session_greedy(local, p, 30)) for p in prompts]
    replicas = [
        a for a in ray.util.list_named_actors(all_namespaces=True) if "model-target2" in a["name"] and "REPLICA" in a["name"]
    ]
    assert len(replicas) == 2, replicas

    async def scenario():
        tasks = [asyncio.ensure_future(session_greedy(backend, p, 30)) for p in prompts]
        await asyncio.sleep(0.3)
        ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=False)
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = run(scenario())
    for got, want in zip(results, expected):
        if isinstance(got, Exception):
            assert isinstance(got, ModelUnavailable), got
        else:
            assert got == want
    assert sum(not isinstance(r, Exception) for r in results) >= len(prompts) // 2
    # the deployment recovers: new sessions work
    assert run(session_greedy(backend, prompts[0], 5)) == expected[0][:5]


def test_session_not_found_is_replayed(serve_app):
    from collab_ray.serving.handle_backend import ServeBackend

    backend = ServeBackend(serve_app.handle("target"), "target")
    local = local_backend("tiny:llama-bpe")
    prompt = run(local.encode("The library on the hill"))

    async def evicted_midway():
        s = await backend.open_session(prompt)
        first = await backend.append(s.session_id, [300, 301], all_positions=True)
        await backend._call("close_session", s.session_id)  # the server forgets it, the client does not
        again = await backend.append(s.session_id, [302])
        return first, again

    first, again = run(evicted_midway())
    s = run(local.open_session(prompt))
    ref = run(local.append(s.session_id, [300, 301, 302], all_positions=True))
    np.testing.assert_allclose(first, ref[:2], atol=1e-4)
    np.testing.assert_allclose(again, ref[2], atol=1e-4)
    assert backend.replays == 1


def test_config_errors_name_path_and_value(tmp_path):
    base = {"models": {"a": {"source": "tiny:llama-bpe"}}}
    cases = [
        ({**base, "pipelines": {"p": {"strategy": "nope", "models": ["a"]}}}, "pipelines.p.strategy", "'nope'"),
        ({**base, "pipelines": {"p": {"strategy": "single", "models": ["b"]}}}, "pipelines.p.models", "'b'"),
        ({**base, "pipelines": {"p": {"strategy": "single", "models": {"x": "a"}}}}, "pipelines.p.models", "single"),
        ({"models": {"a": {"source": "tiny:llama-bpe", "num_gpus": -1}}}, "models.a.num_gpus", "-1"),
        ({**base, "server": {"port": 99999}}, "server.port", "99999"),
        ({**base, "pipelines": {"a": {"strategy": "single", "models": ["a"]}}}, "pipelines.a", "already a model"),
    ]
    for data, path, value in cases:
        with pytest.raises(ConfigError) as err:
            parse_config(data, "c.yaml")
        assert path in str(err.value) and value in str(err.value), str(err.value)
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_shipped_configs_parse():
    for name in ("tiny.yaml", "demo.yaml"):
        config = load_config(f"deploy/{name}")
        assert set(config.models) <= set(config.all_pipelines())


def test_every_pipeline_of_tiny_yaml_answers_over_http_as_in_process(serve_app, client):
    from collab_ray.core.pipeline import Pipeline
    from collab_ray.core.strategy import Request

    config = serve_app.config
    messages = [{"role": "user", "content": "The river runs past the old mill. Where does the river run?"}]
    for name, pipe in config.pipelines.items():
        r = client.chat.completions.create(model=name, messages=messages, max_tokens=10, temperature=0, seed=3)
        models = {role: local_backend(config.models[m].source) for role, m in config.roles(name).items()}
        params = SamplingParams(temperature=0, max_tokens=10, seed=3)
        local = run(Pipeline(pipe.strategy, models, pipe.params).run(Request(messages=messages, params=params)))
        assert r.choices[0].message.content == local.text, name
        collab = r.model_extra["collab"]
        assert collab["strategy"] == pipe.strategy and set(collab["models"]) == set(models), name


def test_app_builder_takes_a_path_or_mapping_and_names_missing_args():
    from collab_ray.serving.app import app_builder

    assert app_builder({"config": "deploy/tiny.yaml"}) is not None
    assert app_builder({"config": {"models": {"m": {"source": "tiny:llama-bpe"}}}}) is not None
    with pytest.raises(ValueError, match="'config'"):
        app_builder({"cfg": "deploy/tiny.yaml"})
