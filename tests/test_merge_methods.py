"""Merge methods as pure per-tensor functions (no checkpoints): sparsifiers, kernels, registry."""

import math

import pytest
import torch

from collab_ray.merge import methods, sparsify


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_rank_stats_is_exact():
    for dtype in (torch.float32, torch.float64):
        x = _randn(1_500_000, seed=5).to(dtype)
        x[:10] = 0.5  # a tie group
        ordered = x.abs().sort().values
        ranks = [0, 1, 12345, 750_000, 1_499_999, int((ordered < 0.5).sum()) + 3]
        for k, (value, below, equal) in zip(ranks, sparsify.rank_stats(x, ranks)):
            assert value == ordered[k]
            assert below == int((ordered < value).sum()) and equal == int((ordered == value).sum())


def test_keep_ranks_matches_a_sort_and_breaks_ties_by_index():
    x = _randn(1000).abs()
    order = torch.argsort(x)
    for lo, hi in [(0, 1000), (900, 1000), (10, 500), (0, 1), (999, 1000), (5, 5)]:
        expected = torch.zeros(1000, dtype=torch.bool)
        expected[order[lo:hi]] = True
        assert torch.equal(sparsify.keep_ranks(x, lo, hi), expected)
    tied = torch.tensor([1.0, 2.0, 2.0, 2.0, 3.0])
    assert sparsify.keep_ranks(tied, 2, 5).tolist() == [False, False, True, True, True]
    assert sparsify.keep_ranks(tied, 1, 3).tolist() == [False, True, True, False, False]


def test_magnitude_keeps_top_k():
    delta = _randn(40, 25)
    kept = sparsify.magnitude(delta.clone(), 0.3)  # sparsifiers overwrite their input
    k = int(0.3 * delta.numel())
    assert int((kept != 0).sum()) == k
    assert kept.abs().min() == 0 and kept[kept != 0].abs().min() >= delta.abs().flatten().sort().values[-k]
    assert torch.equal(sparsify.magnitude(delta.clone(), 1.0), delta)
    assert int((sparsify.magnitude(delta.clone(), 1e-9) != 0).sum()) == 1  # positive density keeps at least one


def test_magnitude_outliers_drops_top_gamma_and_bottom():
    delta = _randn(10_000)
    kept = sparsify.magnitude_outliers(delta.clone(), 0.5, gamma=0.1)
    ranks = delta.abs().argsort().argsort()  # rank of each entry
    assert torch.equal(kept != 0, (ranks >= 4000) & (ranks < 9000))


def test_dare_density_and_rescaling_statistics():
    delta = _randn(1_000_000)
    gen = torch.Generator().manual_seed(3)
    for density in (0.1, 0.5, 0.9):
        kept = sparsify.bernoulli(delta.clone(), density, rescale=True, generator=gen)
        survivors = kept != 0
        assert abs(survivors.float().mean().item() - density) < 5 * math.sqrt(density * (1 - density) / delta.numel())
        scale = kept[survivors] / delta[survivors]  # one common factor ≈ 1/density
        assert torch.allclose(scale, scale[0].expand_as(scale), rtol=1e-5)
        assert abs(scale[0].item() * density - 1) < 0.01
        assert kept.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-5)  # L1 preserved
        plain = sparsify.bernoulli(delta.clone(), density, rescale=False, generator=gen)
        assert torch.equal(plain[plain != 0], delta[plain != 0])


def test_dare_is_deterministic_by_generator():
    delta = _randn(5000)
    draw = lambda seed: sparsify.bernoulli(delta.clone(), 0.4, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))


def test_della_magprune_keep_rate_per_row_rank_bias_rescaling_and_seed():
    delta = _randn(64, 4096, seed=9)
    density, epsilon = 0.4, 0.2
    draw = lambda seed: sparsify.della_magprune(delta.clone(), density, epsilon, rescale=True, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    kept = draw(1)
    survivors = kept != 0
    per_row = survivors.float().mean(dim=1)  # [64]: every row keeps ≈ density
    assert (per_row - density).abs().max() < 5 * math.sqrt(density * (1 - density) / 4096)
    rank = delta.abs().argsort(dim=1).argsort(dim=1).float() / 4095  # 0 smallest … 1 largest, per row
    low, high = survivors[rank < 0.25].float().mean().item(), survivors[rank >= 0.75].float().mean().item()
    assert low == pytest.approx(density - 0.75 * epsilon, abs=0.01) and high == pytest.approx(density + 0.75 * epsilon, abs=0.01)
    assert kept.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-5)  # L1 rescaling of the tensor
    scale = kept[survivors] / delta[survivors]
    assert torch.allclose(scale, scale[0].expand_as(scale), rtol=1e-5)  # one common factor
    assert torch.equal(draw(1), kept) and not torch.equal(draw(2), kept)
    one_d = sparsify.della_magprune(_randn(10_000, seed=4), density, epsilon, rescale=False, generator=torch.Generator().manual_seed(0))
    assert abs((one_d != 0).float().mean().item() - density) < 0.03  # a 1-D tensor is one row
    with pytest.raises(ValueError, match="epsilon 0.5"):
        sparsify.della_magprune(delta.clone(), 0.6, 0.5)


def test_della_has_mergekits_statistics():
    """mergekit's DELLA is unseeded global-RNG sampling: compare keep rates per row and per rank band."""
    mk_sparsify = pytest.importorskip("mergekit.sparsify")
    delta = _randn(32, 2048, seed=11)
    torch.manual_seed(0)
    theirs = mk_sparsify.della_magprune(delta.clone(), 0.3, 0.1, rescale_norm=mk_sparsify.RescaleNorm.l1) != 0
    ours = sparsify.della_magprune(delta.clone(), 0.3, 0.1, rescale=True, generator=torch.Generator().manual_seed(0)) != 0
    rank = delta.abs().argsort(dim=1).argsort(dim=1) * 10 // 2048  # rank decile per row
    for band in range(10):
        a, b = ours[rank == band].float().mean().item(), theirs[rank == band].float().mean().item()
        assert abs(a - b) < 0.03, (band, a, b)
    assert (ours.float().mean(1) - theirs.float().mean(1)).abs().max() < 0.06


def test_new_kernels_on_small_cases():
    base = torch.zeros(4)
    a, b = torch.tensor([0.001, 0.5, 0.0, -0.2]), torch.tensor([0.0, 0.3, 0.0, 0.4])
    near = methods.nearswap([a.clone()], base, t=0.01)  # |a| ≤ t: swapped in; else moved by t
    assert torch.allclose(near, torch.tensor([0.001, 0.01, 0.0, -0.01]))
    merged = methods.ram([a.clone(), b.clone()], base, epsilon=0.01)  # unique changes kept, shared ones averaged
    assert torch.allclose(merged, torch.tensor([0.0, 0.4, 0.0, 0.1]))
    x, y = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    mid = methods.nuslerp([x.clone(), y.clone()], None, weight=[1.0, 1.0])
    assert torch.allclose(mid, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))
    assert torch.allclose(methods.karcher([x.clone(), y.clone()], None), mid)  # the geodesic midpoint, norm 1
    assert torch.allclose(methods.multislerp([x.clone(), y.clone()], None, weight=[1.0, 1.0]), mid)


def test_linear_and_task_arithmetic():
    a, b, base = _randn(8, 4, seed=1), _randn(8, 4, seed=2), _randn(8, 4, seed=3)
    assert torch.allclose(methods.linear([a.clone(), b], None, weight=[1.0, 3.0]), (a + 3 * b) / 4)
    assert torch.allclose(methods.linear([a.clone(), b], None, weight=[1.0, 3.0], normalize=False), a + 3 * b)
    ta = methods.task_arithmetic(
        [a.clone(), b.clone()], base, weight=[0.5, 0.25], density=[1.0, 1.0], normalize=False, rescale=False, lambda_=2.0
    )  # kernels may overwrite their non-base inputs
    assert torch.allclose(ta, base + 2 * (0.5 * (a - base) + 0.25 * (b - base)))


def test_ties_sign_election_and_disjoint_mean():
    base = torch.zeros(3)
    a, b = torch.tensor([1.0, -2.0, 0.0]), torch.tensor([-3.0, -1.0, 4.0])
    merged = methods.task_arithmetic(
        [a, b], base, weight=[1.0, 1.0], density=[1.0, 1.0], normalize=True, rescale=False, sparsifier="magnitude", consensus=True
    )
    # entry 0: Σ = −2 → sign −, only b agrees → −3; entry 1: both agree → mean −1.5; entry 2: only b (a is 0) → 4
    assert merged.tolist() == [-3.0, -1.5, 4.0]


def test_slerp_endpoints_angle_and_colinear_fallback():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    assert torch.allclose(methods.slerp([b], a, t=0.0), a)
    assert torch.allclose(methods.slerp([b], a, t=1.0), b)
    mid = methods.slerp([b], a, t=0.5)  # 45°: sin(π/4)/sin(π/2) of each
    assert torch.allclose(mid, torch.tensor([math.sqrt(0.5), 2 * math.sqrt(0.5)]))
    c = a * 3  # colinear: lerp
    assert torch.allclose(methods.slerp([c], a, t=0.25), 0.75 * a + 0.25 * c)


def test_model_stock_interpolation_ratio():
    base = torch.zeros(2)
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])  # orthogonal offsets: cos 0 → t = 0 → base
    assert torch.allclose(methods.model_stock([a, b], base), base)
    assert torch.allclose(methods.model_stock([a, a.clone()], base), a)  # cos 1 → t = 1 → average


def test_fisher_weighting():
    a, b = torch.tensor([1.0, 1.0]), torch.tensor([3.0, 3.0])
    merged = methods.fisher([a, b], None, weight=[1.0, 1.0], fishers=[torch.tensor([1.0, 3.0]), torch.tensor([1.0, 1.0])], fisher_floor=0.0)
    assert merged.tolist() == [2.0, 1.5]


def test_registry_entries_are_documented():
    for name, method in methods.METHODS.items():
        assert method.kernel.__doc__ or method.kernel.func.__doc__, name
        assert method.reference or name == "passthrough", name
    with pytest.raises(ValueError, match="not_a_method"):
        methods.get_method("not_a_method")
