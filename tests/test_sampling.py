"""The logits processing functions and sampling statistics."""

import math

import torch

from collab_ray.core.sampling import SamplingParams, make_generator, process_logits, sample, top_k_mask, top_p_mask


def test_top_k_keeps_k_largest():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, -1.0, 5.0, 4.0]])
    out = top_k_mask(logits, 2)
    assert torch.isinf(out).tolist() == [[True, False, False, True], [True, True, False, False]]
    assert torch.equal(top_k_mask(logits, 0), logits)


def test_top_p_keeps_smallest_set_with_mass():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    assert torch.isfinite(top_p_mask(logits, 0.5)).tolist() == [True, False, False, False]
    assert torch.isfinite(top_p_mask(logits, 0.8)).tolist() == [True, True, False, False]
    assert torch.isfinite(top_p_mask(logits, 0.81)).tolist() == [True, True, True, False]
    assert torch.equal(top_p_mask(logits, 1.0), logits)


def test_process_logits_temperature_and_normalisation():
    logits = torch.tensor([2.0, 1.0, 0.0])
    lp = process_logits(logits, SamplingParams(temperature=0.5))
    assert torch.allclose(lp.exp().sum(), torch.tensor(1.0))
    assert torch.allclose(lp, torch.log_softmax(logits / 0.5, -1))
    assert torch.allclose(process_logits(logits, SamplingParams(temperature=0)), torch.log_softmax(logits, -1))


def test_sampling_frequencies_match_the_distribution():
    """Chi-square goodness of fit of 20k draws against the processed distribution."""
    logits = torch.tensor([1.5, 1.0, 0.2, -0.5, -3.0])
    params = SamplingParams(temperature=0.9, top_k=4)
    lp = process_logits(logits, params)
    gen = make_generator(123)
    n = 20_000
    counts = torch.bincount(torch.tensor([sample(lp, params, gen) for _ in range(n)]), minlength=5).float()
    expected = lp.exp() * n
    assert counts[4] == 0  # masked by top_k
    chi2 = float((((counts - expected) ** 2) / expected)[:4].sum())
    assert chi2 < 16.27, chi2  # 3 degrees of freedom, p = 0.001
    assert math.isclose(float(expected[:4].sum()), n, rel_tol=1e-5)


def test_greedy_sample_is_argmax():
    lp = torch.log_softmax(torch.tensor([0.1, 2.0, 1.9]), -1)
    assert sample(lp, SamplingParams(temperature=0), None) == 1


# ---- penalties, logit_bias and min_tokens (OpenAI / vLLM semantics) ----------------------------
import pytest  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from collab_ray.core.sampling import apply_logit_bias, apply_penalties, min_tokens_mask  # noqa: E402


def test_extras_default_to_no_ops_and_params_stay_hashable():
    p = SamplingParams()
    assert not p.needs_history and not p.has_penalties
    logits = torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.0, -2.0]])
    assert torch.equal(process_logits(logits, p), process_logits(logits, p, prompt_ids=[[0], [1]], output_ids=[[2], [2]]))
    assert apply_penalties(logits, p, [[0], [1]], [[2], [2]]) is logits
    biased = SamplingParams(logit_bias={"5": 3, 2: -1.5}, frequency_penalty=0.5)
    assert biased.logit_bias == ((2, -1.5), (5, 3.0)) and biased.needs_history
    assert hash(biased) == hash(SamplingParams(logit_bias={5: 3.0, 2: -1.5}, frequency_penalty=0.5))
    assert {biased: 1}[SamplingParams(logit_bias=[(5, 3), (2, -1.5)], frequency_penalty=0.5)] == 1


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("frequency_penalty", 2.5, "frequency_penalty"),
        ("presence_penalty", -3, "presence_penalty"),
        ("repetition_penalty", 0, "repetition_penalty"),
        ("min_tokens", -1, "min_tokens"),
        ("min_tokens", 17, "exceeds max_tokens"),
        ("logit_bias", {"7": 101}, "[-100, 100]"),
        ("logit_bias", {"x": 1}, "token ids"),
        ("logit_bias", {str(i): 1 for i in range(301)}, "at most 300"),
    ],
)
def test_extras_are_bounded_as_openai_and_vllm_do(field, value, fragment):
    with pytest.raises(ValidationError) as err:
        SamplingParams(**{field: value})
    assert fragment in str(err.value)


def test_frequency_and_presence_penalties_count_output_tokens_only():
    logits = torch.zeros(5)
    p = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    out = apply_penalties(logits, p, prompt_ids=[0, 0, 0], output_ids=[1, 1, 2])
    assert out.tolist() == [0.0, -1.25, -0.75, 0.0, 0.0]  # token 0 only in the prompt: untouched
    neg = apply_penalties(logits, SamplingParams(frequency_penalty=-1.0), None, [3])
    assert neg.tolist() == [0.0, 0.0, 0.0, 1.0, 0.0]  # a negative penalty encourages repeats


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = torch.tensor([2.0, -2.0, 2.0, -2.0])
    out = apply_penalties(logits, SamplingParams(repetition_penalty=2.0), prompt_ids=[0], output_ids=[1])
    assert out.tolist() == [1.0, -4.0, 2.0, -2.0]


def test_penalties_per_row_of_a_batch():
    logits = torch.zeros(2, 4)
    p = SamplingParams(presence_penalty=1.0)
    out = apply_penalties(logits, p, None, [[0], [3, 3]])
    assert out.tolist() == [[-1.0, 0, 0, 0], [0, 0, 0, -1.0]]
    with pytest.raises(ValueError, match="one token list per row"):
        apply_penalties(logits, p, None, [[0]])


def test_logit_bias_adds_and_refuses_ids_outside_the_vocabulary():
    logits = torch.zeros(2, 4)
    out = apply_logit_bias(logits, SamplingParams(logit_bias={1: 100, 3: -100}))
    assert out[:, 1].tolist() == [100.0, 100.0] and out[:, 3].tolist() == [-100.0, -100.0]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        apply_logit_bias(logits, SamplingParams(logit_bias={4: 1}))


def test_min_tokens_masks_eos_until_enough_tokens():
    logits = torch.tensor([[0.0, 5.0, 1.0], [0.0, 5.0, 1.0]])
    p = SamplingParams(min_tokens=2)
    out = min_tokens_mask(logits, p, [1, 2], eos_ids=[1])
    assert torch.isinf(out[0, 1]) and out[1, 1] == 5.0 and out[0, 2] == 1.0
    assert torch.equal(min_tokens_mask(logits[0], p, 2, [1]), logits[0])
    assert torch.isinf(min_tokens_mask(logits[0], p, 0, [1])[1])


def test_process_logits_applies_extras_also_when_greedy():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    eos = [0]
    greedy = SamplingParams(temperature=0, min_tokens=1, presence_penalty=2.0, max_tokens=4)
    lp = process_logits(logits, greedy, prompt_ids=[2], output_ids=[], eos_ids=eos)
    assert int(torch.argmax(lp)) == 1 and torch.isinf(lp[0])  # EOS masked before 1 token
    lp = process_logits(logits, greedy, prompt_ids=[2], output_ids=[1], eos_ids=eos)
    assert int(torch.argmax(lp)) == 0  # EOS allowed now; token 1 penalised (2 - 2 = 0)
    assert torch.allclose(lp.exp().sum(), torch.tensor(1.0))
    bias = SamplingParams(temperature=0, logit_bias={3: 100})
    assert int(torch.argmax(process_logits(logits, bias))) == 3  # logit_bias needs no history
    sampled = SamplingParams(temperature=0.5, repetition_penalty=3.0)
    lp = process_logits(logits, sampled, prompt_ids=[0], output_ids=[])
    assert torch.allclose(lp, torch.log_softmax(torch.tensor([1.0, 2.0, 1.0, 0.0]) / 0.5, -1))


def test_process_logits_refuses_to_skip_extras_without_histories():
    logits = torch.zeros(4)
    with pytest.raises(ValueError, match="output_ids"):
        process_logits(logits, SamplingParams(frequency_penalty=1.0))
    with pytest.raises(ValueError, match="prompt_ids"):
        process_logits(logits, SamplingParams(repetition_penalty=1.2), output_ids=[])
    with pytest.raises(ValueError, match="eos_ids"):
        process_logits(logits, SamplingParams(min_tokens=2), output_ids=[])
    assert torch.isfinite(process_logits(logits, SamplingParams(min_tokens=2, ignore_eos=True), output_ids=[])).all()
