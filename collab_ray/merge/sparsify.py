"""Sparsification of task vectors τ = θ − θ_base, as pure functions over one tensor.

Same semantics as mergekit's `sparsify.py`; rank selection finds thresholds by radix selection
(ties broken by flat index) instead of a full argsort, which is several times faster, needs little
scratch memory and selects the same entries whenever magnitudes are distinct. The functions
overwrite the delta they are given (the caller's own copy) to keep peak memory low.
"""

from __future__ import annotations

import torch


CHUNK = 1 << 20  # elements per chunk of the streaming passes below


def _abs_chunks(flat: torch.Tensor):
    """(start, |flat[start:start+CHUNK]|) over a flat tensor: magnitudes without a full-size copy."""
    for start in range(0, flat.numel(), CHUNK):
        yield start, flat[start : start + CHUNK].abs()


def rank_stats(values: torch.Tensor, ranks: list[int]) -> list[tuple[torch.Tensor, int, int]]:
    """For each 0-based rank r of |values| (ascending): (value at rank r, #entries below it, #equal to it).

    Radix selection: non-negative IEEE floats order like their bit patterns, so each value is found
    16 bits at a time from histograms over chunks. Exact, with O(chunk) scratch memory (a sort or
    kthvalue copies the tensor and allocates int64 indices) and two passes for all ranks together.
    """
    flat = values.reshape(-1)
    int_dtype, width = (torch.int64, 64) if flat.dtype == torch.float64 else (torch.int32, 32)
    found = [[0, r, 0, 0] for r in ranks]  # prefix, rank left within the prefix, below, equal
    for shift in range(width - 16, -1, -16):
        prefixes = sorted({f[0] for f in found})
        counts = {p: torch.zeros(1 << 16, dtype=torch.int64, device=flat.device) for p in prefixes}
        for _, magnitude in _abs_chunks(flat):
            bits = magnitude.view(int_dtype)
            for p in prefixes:
                selected = bits if shift + 16 == width else bits[(bits >> (shift + 16)) == (p >> (shift + 16))]
                counts[p] += torch.bincount(((selected >> shift) & 0xFFFF).long(), minlength=1 << 16)
        for f in found:
            cumulative = counts[f[0]].cumsum(0)
            bucket = int(torch.searchsorted(cumulative, f[1], right=True))
            before = int(cumulative[bucket - 1]) if bucket else 0
            f[0] |= bucket << shift
            f[1] -= before
            f[2] += before
            f[3] = int(cumulative[bucket]) - before
    return [(torch.tensor(p, dtype=int_dtype).view(flat.dtype).to(flat.device), below, equal) for p, _, below, equal in found]


def keep_ranks(values: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Mask of the entries whose ascending rank by |value| is in [lo, hi). [*S] -> [*S] bool.

    Equal magnitudes are ranked by flat index, so exactly `hi − lo` entries are kept.
    """
    flat = values.reshape(-1)
    lo, hi = max(0, lo), min(flat.numel(), hi)
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    if hi <= lo:
        return mask.reshape(values.shape)
    (low, below_low, _), (high, below_high, equal_high) = rank_stats(flat, [lo, hi - 1])
    for start, magnitude in _abs_chunks(flat):
        mask[start : start + CHUNK] = (magnitude >= low) & (magnitude <= high)
    if below_low < lo:  # the first entries equal to `low` rank below lo
        _unmask_ties(mask, flat, low, first=lo - below_low)
    if below_high + equal_high > hi:  # the last entries equal to `high` rank from hi on
        _unmask_ties(mask, flat, high, last=below_high + equal_high - hi)
    return mask.reshape(values.shape)


def _unmask_ties(mask: torch.Tensor, flat: torch.Tensor, value: torch.Tensor, first: int = 0, last: int = 0) -> None:
    """Clear `mask` at the first `first` and the last `last` entries (by index) with |entry| = value."""
    tied = torch.cat([(m == value).nonzero().reshape(-1) + start for start, m in _abs_chunks(flat)])
    mask[tied[:first]] = False
    mask[tied[len(tied) - last :]] = False


def masked(delta: torch.Tensor, kept: torch.Tensor, rescale: bool, eps: float = 1e-7) -> torch.Tensor:
    """τ·m, times ‖τ‖₁ / ‖τ·m‖₁ with `rescale` (mergekit's L1 rescaling; none when either norm < eps).

    Overwrites and returns `delta` (the callers own it).
    """
    before = _l1(delta) if rescale else None
    delta.masked_fill_(~kept, 0)
    if rescale:
        after = _l1(delta)
        if before >= eps and after >= eps:
            delta.mul_(before / after)
    return delta


def _l1(tensor: torch.Tensor) -> torch.Tensor:
    return sum(m.sum() for _, m in _abs_chunks(tensor.reshape(-1)))


def magnitude(delta: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """Keep the top-k |τ|, k = max(1, ⌊density·numel⌋) (TIES, Yadav et al. 2023, arXiv 2306.01708)."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    kept = keep_ranks(delta, delta.numel() - k, delta.numel())
    return masked(delta, kept, rescale)


def magnitude_outliers(delta: torch.Tensor, density: float, rescale: bool = False, gamma: float = 0.01) -> torch.Tensor:
    """Drop the γ·numel largest |τ| and then the smallest, keeping ⌊density·numel⌋ (Model Breadcrumbs, arXiv 2312.06795)."""
    if density >= 1:
        return delta
    n = delta.numel()
    target, top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - top)  # outlier removal shrinks when it would undercut the density
    kept = keep_ranks(delta, bottom, bottom + target)
    return masked(delta, kept, rescale)


def bernoulli(
    delta: torch.Tensor, density: float, rescale: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Keep each τ entry with probability `density` (DARE, Yu et al. 2023, arXiv 2311.03099). Seeded by `generator`."""
    if density >= 1:
        return delta
    kept = torch.empty(delta.numel(), dtype=torch.bool, device=delta.device)
    for start in range(0, delta.numel(), CHUNK):  # chunked draws: no full-size probability tensor
        draws = torch.full((min(CHUNK, delta.numel() - start),), density, dtype=delta.dtype, device=delta.device)
        kept[start : start + CHUNK] = torch.bernoulli(draws, generator=generator).bool()
    return masked(delta, kept.reshape(delta.shape), rescale)
