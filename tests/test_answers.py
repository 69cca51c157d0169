"""Answers worth showing: `max_tokens` bounds every strategy's answer, and no strategy picks an answer
that only repeats the question (a base model's echo) while another model answered."""

import dataclasses

import numpy as np
import pytest
from conftest import local_backend, run

from collab_ray.config import load_config
from collab_ray.core.pipeline import Pipeline
from collab_ray.core.sampling import SamplingParams
from collab_ray.core.strategy import Request
from collab_ray.ensemble.common import repeats_question
from collab_ray.ensemble.route import Router
from collab_ray.ensemble.vote import consensus_vote

QUESTION = "Why is the sky blue?"


class Echo:
    """A base model that answers every question with the question itself (and forwards the rest)."""

    def __init__(self, inner, text=QUESTION):
        self.inner, self.text = inner, text

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def generate(self, prompts, params):
        (g,) = await self.inner.generate(prompts[:1], params)
        return [dataclasses.replace(g, text=f" {self.text}", token_ids=[], logprobs=[]) for _ in prompts]


def ask(strategy, models, params=None, max_tokens=8):
    request = Request(messages=[{"role": "user", "content": QUESTION}], params=SamplingParams(temperature=0, max_tokens=max_tokens))
    return run(Pipeline(strategy, models, params).run(request))


def test_repeats_question():
    assert repeats_question(" Why is the sky blue?", QUESTION)
    assert repeats_question("why is the sky BLUE", QUESTION) and repeats_question("  ", QUESTION)
    assert not repeats_question("blue", QUESTION)  # a short answer that reuses a word of the question
    assert not repeats_question("Why is the sky blue? Because air scatters blue light.", QUESTION)


def test_consensus_vote_picks_the_most_agreed_answer_and_skips_non_voters():
    texts = ["Paris is the capital.", "The capital is Paris.", "Lyon, a port city.", "Paris"]
    assert consensus_vote(texts, [1.0] * 4).index in (0, 1)
    assert consensus_vote(texts, [1.0] * 4, [False, False, True, True]).index in (2, 3)
    assert consensus_vote(texts, [1.0] * 4, [False] * 4).answer is None


@pytest.mark.parametrize("strategy", ["rank", "vote"])
def test_after_inference_strategies_never_pick_an_echo(strategy):
    real = local_backend("tiny:llama-bpe")
    models = {"echo": Echo(local_backend("tiny:llama-bpe-small")), "real": real}
    params = {"scorer": "logprob"} if strategy == "rank" else {"extract": "consensus"}
    result = ask(strategy, models, params)
    assert result.meta["output_model"] == "real" and not repeats_question(result.text, QUESTION)


def test_route_falls_back_when_the_routed_model_echoes(tmp_path):
    path = tmp_path / "r.npz"
    Router(["real", "echo"], "hash", np.zeros((512, 2), np.float32), np.array([0.0, 1.0], np.float32)).save(path)
    models = {"real": local_backend("tiny:llama-bpe"), "echo": Echo(local_backend("tiny:llama-bpe-small"))}
    result = ask("route", models, {"router": str(path)})
    assert result.meta["collab"]["routed_to"] == "echo" and result.meta["collab"]["fallback"] == ["real"]
    assert result.meta["output_model"] == "real"


def test_max_tokens_bounds_every_strategys_answer():
    config = load_config("tiny")
    backends = {name: local_backend(m.source) for name, m in config.models.items()}
    for name in config.all_pipelines():
        for max_tokens in (3, 9):
            result = run(config.build_pipeline(name, backends).run(
                Request(messages=[{"role": "user", "content": "Tell me about the river."}], params=SamplingParams(temperature=0.7, seed=1, max_tokens=max_tokens))
            ))  # fmt: skip
            assert result.usage.completion_tokens <= max_tokens, (name, max_tokens, result.usage)
            assert result.token_ids is None or len(result.token_ids) <= max_tokens, name
            roles = config.roles(name)
            output = roles.get(result.meta.get("output_model"), next(iter(roles.values())))
            answer_tokens = run(backends[output].encode(result.text, add_special_tokens=False))
            assert len(answer_tokens) <= max_tokens + 4, (name, result.text)  # restored spans may re-tokenize a little longer


class Base:
    """A base model (no chat template) that records the sampling params it is asked with."""

    def __init__(self, inner):
        self.inner, self.params = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def info(self):
        return dataclasses.replace(await self.inner.info(), has_chat_template=False)

    async def generate(self, prompts, params):
        self.params.append(params)
        return await self.inner.generate(prompts, params)


def test_a_chat_to_a_base_model_stops_where_it_would_start_the_next_turn():
    base = Base(local_backend("tiny:llama-bpe"))
    ask("single", {"m": base})
    assert {"\nQuestion:", "\nUser:"} <= set(base.params[-1].stop)
    chat = Base(local_backend("tiny:llama-bpe"))
    chat.info = local_backend("tiny:llama-bpe").info  # a chat template: its end-of-turn token ends the answer
    ask("single", {"m": chat})
    assert chat.params[-1].stop == ()
    run(Pipeline("single", {"m": base}).run(Request(prompt="Question: 1+1?\nAnswer:", params=SamplingParams(max_tokens=4))))
    assert base.params[-1].stop == ()  # a raw completion prompt is the user's own format
