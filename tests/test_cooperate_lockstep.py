"""`contrastive`, `proxy` and `verify` equal references computed from plain forward passes."""

import math

import pytest
import torch
from conftest import local_backend, run

from collab_ray.cooperate.proxy import proxy_scores
from collab_ray.core import ConfigError, SamplingParams
from collab_ray.core.pipeline import Pipeline
from collab_ray.core.strategy import Request

PROMPTS = ["The river runs", "In the morning the baker"]
GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


def next_logprobs(source: str, ids: list[int]) -> torch.Tensor:
    """[V] next-token log-probs of a full forward pass over `ids` (no cache)."""
    with torch.no_grad():
        return torch.log_softmax(local_backend(source).model(torch.tensor([ids])).logits[0, -1].float(), -1)


def reference(prompt_ids: list[int], choose, n: int = 20) -> list[int]:
    generated: list[int] = []
    for _ in range(n):
        generated.append(int(choose(prompt_ids + generated, generated)))
    return generated


def strategy(name, models, prompt, params=GREEDY, **strategy_params):
    return run(Pipeline(name, models, strategy_params).run(Request(prompt=prompt, params=params)))


def greedy_ids(backend, prompt):
    (gen,) = run(backend.generate([prompt], GREEDY))
    return gen.token_ids


@pytest.mark.parametrize("prompt", PROMPTS)
def test_contrastive_equals_forward_reference(backends, prompt):
    models = backends(expert="tiny:llama-bpe", amateur="tiny:llama-bpe-small")
    alpha, beta = 0.1, 0.5

    def choose(ids, _):
        e, a = next_logprobs("tiny:llama-bpe", ids), next_logprobs("tiny:llama-bpe-small", ids)
        s = (1 + beta) * e - beta * a
        s[e < e.max() + math.log(alpha)] = float("-inf")
        return s.argmax()

    result = strategy("contrastive", models, prompt, alpha=alpha, beta=beta)
    assert result.token_ids == reference(run(models["expert"].encode(prompt)), choose)
    assert result.token_ids != greedy_ids(models["expert"], prompt)  # the amateur changed something
    assert result.meta["output_model"] == "expert" and result.usage.completion_tokens == 20


def test_contrastive_with_beta_zero_is_expert_greedy(backends):
    models = backends(expert="tiny:llama-bpe", amateur="tiny:llama-bpe-small")
    for prompt in PROMPTS:
        assert strategy("contrastive", models, prompt, beta=0.0).token_ids == greedy_ids(models["expert"], prompt)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_proxy_equals_forward_reference(backends, prompt):
    models = backends(base="tiny:llama-bpe", expert="tiny:llama-bpe-small", antiexpert="tiny:llama-bpe")
    alpha = 0.7

    def choose(ids, _):
        base, expert = next_logprobs("tiny:llama-bpe", ids), next_logprobs("tiny:llama-bpe-small", ids)
        return (base + alpha * (expert - base)).argmax()

    result = strategy("proxy", models, prompt, alpha=alpha)
    assert result.token_ids == reference(run(models["base"].encode(prompt)), choose)
    assert result.token_ids != greedy_ids(models["base"], prompt)


def test_proxy_with_alpha_zero_is_base_greedy(backends):
    models = backends(base="tiny:llama-bpe", expert="tiny:llama-bpe-small", antiexpert="tiny:llama-bpe")
    for prompt in PROMPTS:
        assert strategy("proxy", models, prompt, alpha=0.0).token_ids == greedy_ids(models["base"], prompt)
        # plausibility 1 leaves only the base's argmax, whatever the offset
        assert strategy("proxy", models, prompt, alpha=5.0, plausibility=1.0).token_ids == greedy_ids(models["base"], prompt)


def test_proxy_plausibility_masks_what_the_base_finds_implausible():
    base = torch.log(torch.tensor([0.6, 0.3, 0.1]))
    expert, anti = torch.log(torch.tensor([0.1, 0.1, 0.8])), torch.log(torch.tensor([0.8, 0.1, 0.1]))
    assert int(proxy_scores(base, expert, anti, 1.0).argmax()) == 2  # the offset promotes the base's least likely token
    masked = proxy_scores(base, expert, anti, 1.0, plausibility=0.4)  # p ≥ 0.24: tokens 0 and 1
    assert torch.isinf(masked[2]) and int(masked.argmax()) == 1


@pytest.mark.parametrize("prompt", PROMPTS)
def test_verify_equals_forward_reference(backends, prompt):
    models = backends(llm="tiny:llama-bpe", verifier="tiny:llama-bpe-small")
    m, lam = 4, 0.3
    prompt_ids = run(models["llm"].encode(prompt))
    bos, context = prompt_ids[0], prompt_ids[1:]

    def choose(ids, generated):
        llm = next_logprobs("tiny:llama-bpe", ids)
        candidates = torch.topk(llm, m).indices.tolist()
        scores = []
        for c in candidates:
            seq = [bos] + generated + [c] + context
            with torch.no_grad():
                lp = torch.log_softmax(local_backend("tiny:llama-bpe-small").model(torch.tensor([seq])).logits[0].float(), -1)
            first = len(seq) - len(context)
            verifier = sum(float(lp[first + i - 1, t]) for i, t in enumerate(context))
            scores.append(float(llm[c]) + lam * verifier)
        return candidates[max(range(m), key=scores.__getitem__)]

    result = strategy("verify", models, prompt, candidates=m, lam=lam)
    assert result.token_ids == reference(prompt_ids, choose)
    assert result.meta["reranked_steps"] > 0


def test_sampling_is_seeded_and_streams(backends):
    models = backends(expert="tiny:llama-bpe", amateur="tiny:llama-bpe-small")
    params = SamplingParams(temperature=1.0, max_tokens=16, seed=5)
    deltas = []

    async def emit(delta):
        deltas.append(delta)

    request = Request(messages=[{"role": "user", "content": "Tell me about the river."}], params=params)
    a = run(Pipeline("contrastive", models).run(request, emit))
    b = run(Pipeline("contrastive", models).run(request))
    assert a.token_ids == b.token_ids and "".join(deltas) == a.text
    assert a.meta["models"]["amateur"]["calls"] == len(a.token_ids)  # open + one append per token but the last


def test_models_must_share_a_vocabulary(backends):
    models = backends(expert="tiny:llama-bpe", amateur="tiny:llama-sp")
    with pytest.raises(ConfigError, match="'expert'.*'amateur'"):
        strategy("contrastive", models, PROMPTS[0])
    with pytest.raises(ValueError, match="alpha"):
        Pipeline("contrastive", models, {"alpha": 0.0})
