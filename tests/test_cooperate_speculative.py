"""`speculative`: exact greedy and sampled draft-and-verify, different tokenizers, stop strings, replay."""

import asyncio

import numpy as np
import pytest
import torch

from collab_ray.core import SamplingParams
from collab_ray.core.pipeline import Pipeline
from collab_ray.core.strategy import Request
from collab_ray.cooperate.speculative import greedy_accept, sampled_accept
from conftest import run

PROMPTS = ["The river runs", "In the morning the baker", "A small boat drifts near"]

# chi-square critical value for 5 degrees of freedom at significance 1e-4 (scipy.stats.chi2.ppf(1 - 1e-4, 5))
CHI2_5DF_1E4 = 25.74


def speculative(models, prompt, params, **strategy_params):
    return run(Pipeline("speculative", models, strategy_params).run(Request(prompt=prompt, params=params)))


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_with_draft_equal_to_target_accepts_everything(backends, prompt):
    models = backends(draft="tiny:llama-bpe", target="tiny:llama-bpe")
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    (expected,) = run(models["target"].generate([prompt], params))
    result = speculative(models, prompt, params, k=4, adaptive=False)
    assert result.token_ids == expected.token_ids and result.text == expected.text
    assert result.meta["acceptance_rate"] == 1.0
    assert result.meta["mean_accepted_length"] == 5.0  # k + 1: four drafts and the bonus token
    assert result.meta["rounds"] == 4 and result.finish_reason == "length"


@pytest.mark.parametrize("draft, tokenizers", [("tiny:llama-bpe-small", "shared"), ("tiny:llama-sp", "different")])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_with_a_poor_draft_equals_target_greedy(backends, prompt, draft, tokenizers):
    """A small draft of the same vocabulary, and one with another tokenizer (text re-tokenization)."""
    models = backends(draft=draft, target="tiny:llama-bpe")
    params = SamplingParams(temperature=0, max_tokens=40)
    (expected,) = run(models["target"].generate([prompt], params))
    result = speculative(models, prompt, params)
    assert result.token_ids == expected.token_ids and result.text == expected.text
    assert result.finish_reason == expected.finish_reason and result.meta["tokenizers"] == tokenizers
    assert 0 < result.meta["accepted"] and result.meta["acceptance_rate"] < 0.5
    assert 0 <= result.meta["k"]["min"] <= result.meta["k"]["max"] <= 16  # 0: no usable draft that round
    # one propose and one verify per round, never the prompt again
    prompt_len = len(run(models["target"].encode(prompt)))
    assert result.meta["models"]["target"]["prompt_tokens"] <= prompt_len + result.meta["proposed"] + result.meta["rounds"]


def test_sampled_acceptance_reproduces_the_target_distribution():
    """60k rounds of k = 2 on a 6-token vocabulary with fixed p and q: each output position
    follows p (chi-square, 5 degrees of freedom, rejected only at significance 1e-4)."""
    p = torch.tensor([[0.30, 0.25, 0.20, 0.10, 0.10, 0.05], [0.05, 0.05, 0.10, 0.20, 0.25, 0.35], [0.5, 0.1, 0.1, 0.1, 0.1, 0.1]])
    q = torch.tensor([[0.05, 0.10, 0.15, 0.20, 0.20, 0.30], [0.40, 0.20, 0.10, 0.10, 0.10, 0.10]])
    n = 60_000
    generator = torch.Generator().manual_seed(0)
    drafts = torch.stack([torch.multinomial(q[i], n, replacement=True, generator=generator) for i in range(2)], 1)
    first, second = np.zeros(6), np.zeros(6)
    for tokens in drafts.tolist():
        accepted, nxt = sampled_accept(p.log(), q.log(), tokens, generator)
        out = tokens[:accepted] + [nxt]
        first[out[0]] += 1
        if len(out) > 1:
            second[out[1]] += 1
    for counts, expected in ((first, p[0]), (second, p[1])):
        chi2 = float((((counts - counts.sum() * expected.numpy()) ** 2) / (counts.sum() * expected.numpy())).sum())
        assert chi2 < CHI2_5DF_1E4, (chi2, counts / counts.sum(), expected)
    assert second.sum() > 0.3 * n  # the accept path was exercised as well as the residual path


def test_acceptance_functions_on_edge_cases():
    p = torch.log_softmax(torch.tensor([[0.0, 5.0, 0.0], [4.0, 0.0, 0.0], [0.0, 0.0, 3.0]]), -1)
    best = p.argmax(-1).tolist()  # [1, 0, 2]
    assert greedy_accept(best, [1, 0]) == (2, 2)  # all accepted, bonus = argmax of the last row
    assert greedy_accept(best, [1, 2]) == (1, 0)  # rejected at 1, corrected to the target's argmax
    assert greedy_accept(best[:1], []) == (0, 1)
    # a one-hot q (deterministic proposal) on a token the target cannot produce is always rejected
    q = torch.full((1, 3), float("-inf"))
    q[0, 0] = 0.0
    target = torch.tensor([[float("-inf"), 0.0, float("-inf")], [0.0, float("-inf"), float("-inf")]])
    assert sampled_accept(target, q, [0], None) == (0, 1)


def test_seeded_sampling_is_deterministic(backends):
    models = backends(draft="tiny:llama-bpe-small", target="tiny:llama-bpe")
    params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=30, seed=11)
    a, b = (speculative(models, PROMPTS[0], params) for _ in range(2))
    assert a.token_ids == b.token_ids and len(a.token_ids) > 0
    c = speculative(models, PROMPTS[0], params.model_copy(update={"seed": 12}))
    assert c.token_ids != a.token_ids
    sp = backends(draft="tiny:llama-sp", target="tiny:llama-bpe")
    assert speculative(sp, PROMPTS[0], params).token_ids == speculative(sp, PROMPTS[0], params).token_ids


def test_stop_strings_and_streaming(backends):
    models = backends(draft="tiny:llama-bpe-small", target="tiny:llama-bpe")
    (full,) = run(models["target"].generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=40)))
    word = full.text.split()[3]
    params = SamplingParams(temperature=0, max_tokens=40, stop=[word])
    (cut,) = run(models["target"].generate([PROMPTS[1]], params))
    deltas = []

    async def emit(delta):
        deltas.append(delta)

    result = run(Pipeline("speculative", models).run(Request(prompt=PROMPTS[1], params=params), emit))
    assert result.text == cut.text == full.text[: full.text.index(word)]
    assert result.finish_reason == "stop" and "".join(deltas) == result.text and len(deltas) > 1


def test_concurrent_requests_equal_one_by_one(backends):
    models = backends(draft="tiny:llama-bpe-small", target="tiny:llama-bpe")
    params = SamplingParams(temperature=0, max_tokens=24)
    pipeline = Pipeline("speculative", models)

    async def all_at_once():
        return await asyncio.gather(*(pipeline.run(Request(prompt=p, params=params)) for p in PROMPTS))

    together = run(all_at_once())
    for prompt, result in zip(PROMPTS, together):
        assert result.token_ids == speculative(models, prompt, params).token_ids


class Forgetful:
    """A backend that loses its session before every third session call (as after an eviction)."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = 0
        self.open: set[str] = set()

    async def open_session(self, prompt_ids, **kwargs):
        start = await self.inner.open_session(prompt_ids, **kwargs)
        self.open.add(start.session_id)
        return start

    async def close_session(self, session_id):
        self.open.discard(session_id)
        await self.inner.close_session(session_id)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def _maybe_forget(self, session_id):
        self.calls += 1
        if self.calls % 3 == 0:
            await self.inner.close_session(session_id)

    async def append(self, session_id, *args, **kwargs):
        await self._maybe_forget(session_id)
        return await self.inner.append(session_id, *args, **kwargs)

    async def propose(self, session_id, *args, **kwargs):
        await self._maybe_forget(session_id)
        return await self.inner.propose(session_id, *args, **kwargs)


def test_lost_sessions_are_replayed(backends):
    models = backends(draft="tiny:llama-bpe-small", target="tiny:llama-bpe")
    params = SamplingParams(temperature=0, max_tokens=30)
    (expected,) = run(models["target"].generate([PROMPTS[2]], params))
    forgetful = {role: Forgetful(b) for role, b in models.items()}
    result = speculative(forgetful, PROMPTS[2], params)
    assert result.token_ids == expected.token_ids
    assert result.meta["sessions_replayed"] > 0
    assert not any(f.open for f in forgetful.values())  # every session was closed at the end


def test_params_are_checked(backends):
    with pytest.raises(ValueError, match="k=20"):
        Pipeline("speculative", backends(draft="tiny:llama-bpe-small", target="tiny:llama-bpe"), {"k": 20})
    models = backends(draft="tiny:llama-sp", target="tiny:llama-bpe")
    with pytest.raises(ValueError, match="'draft'.*'target'.*vocabulary"):
        speculative(models, PROMPTS[0], SamplingParams(temperature=0), tokenizers="shared")
