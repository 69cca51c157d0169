"""Sparsification of task vectors τ = θ − θ_base, as pure functions over one tensor.

Same semantics as mergekit's `sparsify.py` (DELLA's MagPrune too); rank selection finds thresholds by radix selection
(ties broken by flat index) instead of a full argsort, which is several times faster, needs little
scratch memory and selects the same entries whenever magnitudes are distinct. The functions
overwrite the delta they are given (the caller's own copy) to keep peak memory low.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from collab_ray.core.errors import ConfigError


CHUNK = 1 << 20  # elements per chunk of the streaming passes below


def _abs_chunks(flat: torch.Tensor):
    """(start, |flat[start:start+CHUNK]|) over a flat tensor: magnitudes without a full-size copy."""
    for start in range(0, flat.numel(), CHUNK):
        yield start, flat[start : start + CHUNK].abs()


@dataclass(frozen=True)
class Magnitudes:
    """|values| of a flat tensor that may never exist in full: `chunks()` yields (start, |chunk|) in order.

    Lets rank selection run over values computed chunk by chunk (e.g. SCE's per-entry variance
    across task vectors) without materializing them.
    """

    numel: int
    dtype: torch.dtype
    device: torch.device
    chunks: Callable[[], Iterator[tuple[int, torch.Tensor]]]


def magnitudes_of(values: torch.Tensor) -> Magnitudes:
    flat = values.reshape(-1)
    return Magnitudes(flat.numel(), flat.dtype, flat.device, lambda: _abs_chunks(flat))


def rank_stats(values: torch.Tensor | Magnitudes, ranks: list[int]) -> list[tuple[torch.Tensor, int, int]]:
    """For each 0-based rank r of |values| (ascending): (value at rank r, #entries below it, #equal to it).

    Radix selection: non-negative IEEE floats order like their bit patterns, so each value is found
    16 bits at a time from histograms over chunks. Exact, with O(chunk) scratch memory (a sort or
    kthvalue copies the tensor and allocates int64 indices) and two passes for all ranks together.
    """
    source = values if isinstance(values, Magnitudes) else magnitudes_of(values)
    int_dtype, width = (torch.int64, 64) if source.dtype == torch.float64 else (torch.int32, 32)
    found = [[0, r, 0, 0] for r in ranks]  # prefix, rank left within the prefix, below, equal
    for shift in range(width - 16, -1, -16):
        prefixes = sorted({f[0] for f in found})
        counts = {p: torch.zeros(1 << 16, dtype=torch.int64, device=source.device) for p in prefixes}
        for _, magnitude in source.chunks():
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
    return [(torch.tensor(p, dtype=int_dtype).view(source.dtype).to(source.device), below, equal) for p, _, below, equal in found]


def keep_ranks(values: torch.Tensor | Magnitudes, lo: int, hi: int) -> torch.Tensor:
    """Mask of the entries whose ascending rank by |value| is in [lo, hi). [*S] -> [*S] bool ([numel] for Magnitudes).

    Equal magnitudes are ranked by flat index, so exactly `hi − lo` entries are kept.
    """
    source = values if isinstance(values, Magnitudes) else magnitudes_of(values)
    shape = (source.numel,) if isinstance(values, Magnitudes) else values.shape
    lo, hi = max(0, lo), min(source.numel, hi)
    mask = torch.zeros(source.numel, dtype=torch.bool, device=source.device)
    if hi <= lo:
        return mask.reshape(shape)
    (low, below_low, _), (high, below_high, equal_high) = rank_stats(source, [lo, hi - 1])
    for start, magnitude in source.chunks():
        mask[start : start + CHUNK] = (magnitude >= low) & (magnitude <= high)
    if below_low < lo:  # the first entries equal to `low` rank below lo
        _unmask_ties(mask, source, low, first=lo - below_low)
    if below_high + equal_high > hi:  # the last entries equal to `high` rank from hi on
        _unmask_ties(mask, source, high, last=below_high + equal_high - hi)
    return mask.reshape(shape)


def _unmask_ties(mask: torch.Tensor, source: Magnitudes, value: torch.Tensor, first: int = 0, last: int = 0) -> None:
    """Clear `mask` at the first `first` and the last `last` entries (by index) with |entry| = value."""
    tied = torch.cat([(m == value).nonzero().reshape(-1) + start for start, m in source.chunks()])
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


def della_magprune(
    delta: torch.Tensor, density: float, epsilon: float, rescale: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Keep each τ entry with probability p = density − ε + 2ε·r, r ∈ [0, 1] its magnitude rank within
    its row (dim 1; a 1-D tensor is one row), so larger entries survive more often; mean keep rate per
    row = density. DELLA's MagPrune (Deep et al. 2024, arXiv 2406.11617). Seeded by `generator`."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    if density - epsilon <= 0 or density + epsilon >= 1:
        raise ConfigError(f"della: density {density} ± epsilon {epsilon} must stay inside (0, 1); choose a smaller epsilon")
    rows = (delta if delta.dim() >= 2 else delta.unsqueeze(0)).transpose(1, -1)  # [R, …, C]: ranks along dim 1
    rows = rows.reshape(-1, rows.shape[-1])  # [R', C] (a copy only for >2-D tensors)
    width = rows.shape[-1]
    kept = torch.empty(rows.shape, dtype=torch.bool, device=delta.device)
    step = max(1, CHUNK // width)
    for start in range(0, rows.shape[0], step):  # argsort scratch is int64: bounded to a chunk of rows
        order = rows[start : start + step].abs().argsort(dim=-1)  # [r, C]
        # the inverse permutation (rank of each entry, 0 = smallest) by a scatter: what a second argsort gives, in O(C)
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(width, device=order.device).expand_as(order)).to(delta.dtype)
        probs = (density - epsilon) + (rank / (width - 1) if width > 1 else torch.full_like(rank, 0.5)) * (2 * epsilon)
        kept[start : start + step] = torch.bernoulli(probs, generator=generator).bool()
    shape = delta.shape if delta.dim() >= 2 else (1, *delta.shape)
    transposed = list(shape)
    transposed[1], transposed[-1] = transposed[-1], transposed[1]
    return masked(delta, kept.reshape(transposed).transpose(1, -1).reshape(delta.shape), rescale)
