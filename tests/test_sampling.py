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
