"""Merge methods: pure per-tensor functions and their registry (modelled on mergekit's).

Every kernel takes the non-base input tensors (all of the same shape [*S], floating point, already
on the math device and in the work dtype), the base tensor or None, and the method's parameters
(per-input parameters are lists aligned with `tensors`); it returns one [*S] tensor. Kernels own
the non-base `tensors` they are given and may overwrite them (saves a copy per input); they never
modify `base`. Semantics and defaults follow mergekit (`merge_methods/`), so results match it for
the same config.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch

from collab_ray.core.errors import ConfigError
from collab_ray.merge import sparsify

Tensors = Sequence[torch.Tensor]


def linear(tensors: Tensors, base: None, *, weight: list[float], normalize: bool = True) -> torch.Tensor:
    """θ* = Σ wᵢθᵢ (/ Σ wᵢ when normalized). Model soups, Wortsman et al. 2022, arXiv 2203.05482."""
    result = tensors[0].mul_(weight[0])  # [*S], accumulated in the memory of the first input
    for tensor, w in zip(tensors[1:], weight[1:]):
        result.add_(tensor, alpha=w)
    return result.div_(sum(weight)) if normalize else result


def task_arithmetic(
    tensors: Tensors,
    base: torch.Tensor,
    *,
    weight: list[float],
    density: list[float],
    normalize: bool,
    rescale: bool,
    lambda_: float = 1.0,
    gamma: list[float] | None = None,
    epsilon: list[float] | None = None,
    sparsifier: Literal["magnitude", "random", "outliers", "della"] | None = None,
    consensus: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """θ* = θ_base + λ Σ wᵢ·sparsify(τᵢ) [/ Σ wᵢ], τᵢ = θᵢ − θ_base; with `consensus`, only the entries
    agreeing with sign(Σ wᵢτᵢ) count (per-entry divisor). Task arithmetic (Ilharco et al. 2023,
    arXiv 2212.04089) and, by sparsifier/consensus, TIES, DARE, Model Breadcrumbs and DELLA.
    """
    deltas = []  # N × [*S], each wᵢ·sparsify(τᵢ), computed in the memory of θᵢ
    for i, (tensor, w, d) in enumerate(zip(tensors, weight, density)):
        delta = tensor.sub_(base)
        if sparsifier == "magnitude":
            delta = sparsify.magnitude(delta, d, rescale)
        elif sparsifier == "outliers":
            delta = sparsify.magnitude_outliers(delta, d, rescale, gamma[i])
        elif sparsifier == "random":
            delta = sparsify.bernoulli(delta, d, rescale, generator)
        elif sparsifier == "della":
            delta = sparsify.della_magprune(delta, d, epsilon[i], rescale, generator)
        deltas.append(delta.mul_(w))
    out = deltas[0]  # the result overwrites the first delta, chunk by chunk, once that chunk is read
    for chunk in range(0, base.numel(), sparsify.CHUNK):  # elementwise from here: bounded scratch memory
        part = slice(chunk, chunk + sparsify.CHUNK)
        parts = [delta.reshape(-1)[part] for delta in deltas]  # N × [c]
        if consensus:
            mixed, divisor = _sign_consensus(parts, weight)  # [c], [c]
        else:
            mixed, divisor = sum(parts[1:], parts[0].clone()), sum(weight)
            divisor = 1.0 if abs(divisor) < 1e-8 else divisor
        if normalize:
            mixed /= divisor
        if lambda_ != 1:
            mixed *= lambda_
        out.reshape(-1)[part] = base.reshape(-1)[part] + mixed
    return out


def _sign_consensus(deltas: Tensors, weight: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """TIES sign election, weight-summed: keep entries whose sign equals sign(Σ wᵢτᵢ) (≥ 0 counts as +).

    Returns (Σ of agreeing weighted deltas, Σ of agreeing weights with 0 replaced by 1), both [c].
    """
    majority = _majority_sign(deltas)  # [c]
    mixed = torch.zeros_like(majority)
    divisor = torch.zeros_like(majority)
    for delta, w in zip(deltas, weight):
        agree = delta.sign() == majority  # [c] bool; zeros never agree
        mixed += delta * agree
        divisor += agree * w
    divisor[divisor == 0] = 1
    return mixed, divisor


def _majority_sign(deltas: Tensors) -> torch.Tensor:
    """sign(Σ τᵢ) per entry, with ≥ 0 counted as +1. N × [c] -> [c]."""
    return torch.where(sum(deltas[1:], deltas[0].clone()) >= 0, 1.0, -1.0).to(deltas[0].dtype)


def slerp(tensors: Tensors, base: torch.Tensor, *, t: float, dot_threshold: float = 0.9995, eps: float = 1e-8) -> torch.Tensor:
    """θ* = sin((1−t)Ω)/sin Ω·θ_base + sin(tΩ)/sin Ω·θ₁, cos Ω = ⟨θ̂_base, θ̂₁⟩ over the whole tensor;
    lerp when |cos Ω| > dot_threshold (nearly colinear). Shoemake 1985, as in mergekit."""
    (other,) = tensors
    a, b = base.reshape(-1), other.reshape(-1)  # [numel]
    norm_a, norm_b = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    norm_a = norm_a if norm_a > eps else torch.ones_like(norm_a)
    norm_b = norm_b if norm_b > eps else torch.ones_like(norm_b)
    dot = max(-1.0, min(1.0, float(torch.dot(a, b) / (norm_a * norm_b))))
    if abs(dot) > dot_threshold:
        coef_a, coef_b = 1 - t, t
    else:
        theta = math.acos(dot)
        coef_a, coef_b = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    return (a * coef_a).add_(b, alpha=coef_b).reshape(base.shape)


def model_stock(tensors: Tensors, base: torch.Tensor, *, filter_wise: bool = False) -> torch.Tensor:
    """θ* = t·mean(θᵢ) + (1−t)·θ_base, t = N·cos/(1 + (N−1)·cos), cos = mean pairwise cosine of τᵢ
    (per tensor, or per row with filter_wise). Model Stock, Jang et al. 2024, arXiv 2403.19522."""
    if filter_wise:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base  # [R, C]
        ws = [x.reshape(w0.shape) for x in tensors]
    else:
        w0, ws = base.reshape(-1), [x.reshape(-1) for x in tensors]  # [numel]
    offsets = [x - w0 for x in ws]
    cosines = [
        ((a * b).sum(-1) / (torch.norm(a, dim=-1) * torch.norm(b, dim=-1)).clamp(min=1e-6)).clamp(-1, 1)
        for i, a in enumerate(offsets)
        for b in offsets[i + 1 :]
    ]
    cos = torch.stack(cosines).mean(0).unsqueeze(-1)  # [R, 1] or [1]
    n = len(ws)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6  # no finite estimate: keep the base
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, 1.0, denominator))
    return (t * (sum(ws) / n) + (1 - t) * w0).reshape(base.shape)


def passthrough(tensors: Tensors, base: None, *, scale: list[float | None]) -> torch.Tensor:
    """θ* = s·θ₁ (or θ₁ unscaled): copies one input, for frankenmerges built from `slices`."""
    (tensor,), (s,) = tensors, scale
    return tensor if s is None else tensor * s


def fisher(
    tensors: Tensors, base: None, *, weight: list[float], fishers: Tensors, fisher_floor: float = 1e-6
) -> torch.Tensor:
    """θ* = Σ wᵢFᵢθᵢ / Σ wᵢFᵢ, Fᵢ = diagonal Fisher (+ floor). Matena & Raffel 2022, arXiv 2111.09832."""
    numerator = torch.zeros_like(tensors[0])  # [*S]
    denominator = torch.zeros_like(tensors[0])
    for tensor, w, f in zip(tensors, weight, fishers):
        f = w * (f + fisher_floor)
        numerator += f * tensor
        denominator += f
    return numerator / denominator


def sce(tensors: Tensors, base: torch.Tensor, *, select_topk: float = 1.0) -> torch.Tensor:
    """τᵢ = θᵢ − θ_base. Select: keep the entries whose variance across the τᵢ is in the top `select_topk`
    fraction of the non-zero variances; Calculate: wᵢ = mean(τᵢ²) / Σⱼ mean(τⱼ²) (uniform when Σ < 1e-6);
    Erase: per entry only the τᵢ agreeing with sign(Σ τᵢ) count;
    θ* = θ_base + Σ wᵢ·agreeᵢ·τᵢ / max(Σ wᵢ·agreeᵢ, 1e-6). SCE of FuseChat 2.0 (Wan et al. 2024, arXiv 2408.07990).
    """
    deltas = [t.sub_(base).reshape(-1) for t in tensors]  # N × [numel], in the memory of the θᵢ
    if select_topk < 1:
        keep = _top_variance(deltas, select_topk)  # [numel] bool
        for delta in deltas:
            delta.masked_fill_(~keep, 0)
        del keep
    energy = [torch.linalg.vector_norm(d).square() / d.numel() for d in deltas]  # mean(τᵢ²), no full-size temporary
    total = float(sum(energy))
    weight = [1 / len(deltas)] * len(deltas) if abs(total) < 1e-6 else [float(e) / total for e in energy]
    out, flat_base = deltas[0], base.reshape(-1)  # the result overwrites τ₁ chunk by chunk, once read
    for chunk in range(0, out.numel(), sparsify.CHUNK):
        part = slice(chunk, chunk + sparsify.CHUNK)
        parts = [d[part] for d in deltas]  # N × [c]
        majority = _majority_sign(parts)
        mixed, divisor = torch.zeros_like(majority), torch.zeros_like(majority)
        for delta, w in zip(parts, weight):
            erased = (delta.sign() == majority) * w  # [c]: wᵢ where τᵢ agrees, else 0
            mixed += delta * erased
            divisor += erased
        out[part] = flat_base[part] + mixed / divisor.clamp(min=1e-6)
    return out.reshape(base.shape)


def _top_variance(deltas: Tensors, density: float) -> torch.Tensor:
    """Mask of the k = ⌊density·#(var ≠ 0)⌋ entries of largest population variance across `deltas` (N × [n]).

    For large tensors the variance is recomputed chunk by chunk for each pass of the rank selection,
    never held in full.
    """
    n = deltas[0].numel()
    if density <= 0:
        return torch.zeros(n, dtype=torch.bool, device=deltas[0].device)

    def chunks():  # population variance across the N task vectors, elementwise (torch.var over dim 0 is far slower)
        for start in range(0, n, sparsify.CHUNK):
            parts = [d[start : start + sparsify.CHUNK] for d in deltas]
            mean = sum(parts[1:], parts[0].clone()) / len(parts)
            yield start, sum(((p - mean).square_() for p in parts[1:]), (parts[0] - mean).square_()) / len(parts)

    if n <= 4 * sparsify.CHUNK:  # small enough to hold: compute it once
        variance = torch.cat([v for _, v in chunks()])
        k = int(int(torch.count_nonzero(variance)) * density)
        return sparsify.keep_ranks(variance, n - k, n)
    k = int(sum(int(torch.count_nonzero(v)) for _, v in chunks()) * density)
    source = sparsify.Magnitudes(n, deltas[0].dtype, deltas[0].device, chunks)
    return sparsify.keep_ranks(source, n - k, n)


def nuslerp(
    tensors: Tensors,
    base: torch.Tensor | None,
    *,
    weight: list[float],
    nuslerp_row_wise: bool = False,
    nuslerp_flatten: bool = True,
) -> torch.Tensor:
    """SLERP of two models, or of their task vectors when a base is given (θ* = θ_base + slerp(τ₁, τ₂)),
    with t = w₂/(w₁ + w₂) (0.5 when the weights sum to 0): sin((1−t)Ω)/sin Ω·v₁ + sin(tΩ)/sin Ω·v₂,
    cos Ω = ⟨v̂₁, v̂₂⟩ over the whole tensor (flatten), each row, or each column (row_wise); lerp where
    colinear. mergekit's NuSLERP (Shoemake 1985 spherical interpolation, generalized)."""
    a, b = tensors
    total = sum(weight)
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    if base is not None:
        a, b = a.sub_(base), b.sub_(base)
    if nuslerp_flatten:
        va, vb = a.reshape(1, -1), b.reshape(1, -1)  # [1, numel]
    else:
        va, vb = (a.transpose(0, -1), b.transpose(0, -1)) if nuslerp_row_wise else (a, b)  # vectors along the last dim
    norm_a = torch.linalg.vector_norm(va, dim=-1, keepdim=True).clamp(min=1e-7)  # [V, 1]
    norm_b = torch.linalg.vector_norm(vb, dim=-1, keepdim=True).clamp(min=1e-7)
    dot = (va * vb).sum(-1, keepdim=True) if va.shape[0] > 1 else (va @ vb.T)
    cos = (dot / (norm_a * norm_b)).clamp(-1, 1)  # [V, 1]
    colinear = (1 - cos.square()) <= 1e-16
    theta = torch.acos(torch.where(colinear, 0, cos))
    coef_a = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / torch.sin(theta))
    coef_b = torch.where(colinear, t, torch.sin(t * theta) / torch.sin(theta))
    out = va.mul_(coef_a).add_(vb * coef_b if va.shape[0] > 1 else vb.mul_(coef_b))
    out = out.reshape(a.shape) if nuslerp_flatten else (out.transpose(0, -1) if nuslerp_row_wise else out)
    return out.add_(base) if base is not None else out


def multislerp(
    tensors: Tensors, base: torch.Tensor | None, *, weight: list[float], normalize_weights: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Barycentric interpolation on the hypersphere of N models (or task vectors, with a base): the weighted
    mean of the unit vectors, normalized, moved along the weighted tangent vectors by the exponential map,
    and scaled by the weighted mean norm. mergekit's Multi-SLERP (Goddard 2025)."""
    if len(tensors) == 1:
        return tensors[0]
    flats = [t.sub_(base).reshape(-1) if base is not None else t.reshape(-1) for t in tensors]  # N × [numel]
    w = [x / sum(weight) for x in weight] if normalize_weights else list(weight)
    norms = [torch.linalg.vector_norm(f) for f in flats]
    units = [f.div_(n + eps) for f, n in zip(flats, norms)]  # in place: the inputs become unit vectors
    mean = torch.zeros_like(units[0])
    for u, wi in zip(units, w):
        mean.add_(u, alpha=wi)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if len(units) != 2:
            raise ValueError("multislerp: the weighted sum of the unit inputs is zero (antipodal inputs with balancing weights); change the weights")
        result = units[0].mul_(norms[0] + eps).mul_(w[0]).add_(units[1].mul_(norms[1] + eps), alpha=w[1])  # lerp
    else:
        mean /= mean_norm
        tangent = torch.zeros_like(mean)  # Σ wᵢ(uᵢ − ⟨uᵢ, m⟩m)
        for u, wi in zip(units, w):
            tangent.add_(u, alpha=wi).sub_(mean, alpha=float(wi * torch.dot(u, mean)))
        length = torch.linalg.vector_norm(tangent) + eps
        result = mean.mul_(torch.cos(length)).add_(tangent.mul_(torch.sin(length) / length))
        result *= sum(n * wi for n, wi in zip(norms, w))
    result = result.reshape(tensors[0].shape)
    return result.add_(base) if base is not None else result


def karcher(tensors: Tensors, base: None, *, max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """Uniform Karcher (Fréchet) mean on the unit sphere by Riemannian gradient steps
    m ← exp_m(Σ αᵢ·θᵢ/sin θᵢ·(uᵢ − cos θᵢ·m)), cos θᵢ = ⟨m, uᵢ⟩, from the normalized mean of the unit
    inputs uᵢ, for at most `max_iter` steps (stop when the step is < tol); θ* = (Σ αᵢ‖θᵢ‖)·m, αᵢ = 1/N.
    mergekit's Karcher mean merge (Karcher 1977; arXiv 2603.04972)."""
    n = len(tensors)
    if n == 1:
        return tensors[0]
    alphas = [1.0 / n] * n
    flats = [t.reshape(-1) for t in tensors]  # N × [numel]
    norms = [torch.linalg.vector_norm(f) for f in flats]
    units = [f.div_(m) if m.item() != 0 else f.zero_() for f, m in zip(flats, norms)]  # in place
    valid = [i for i, m in enumerate(norms) if m.item() > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    weights = [alphas[i] / sum(alphas[j] for j in valid) for i in valid]
    units = [units[i] for i in valid]
    mean = torch.zeros_like(units[0])
    for a, u in zip(weights, units):
        mean.add_(u, alpha=a)
    mean_norm = torch.linalg.vector_norm(mean)
    mean = units[0].clone() if mean_norm.item() < tol else mean.div_(mean_norm)
    buffers = (mean.new_empty(min(mean.numel(), sparsify.CHUNK)), mean.new_empty(min(mean.numel(), sparsify.CHUNK)))
    for _ in range(max_iter):
        coefs = []  # the tangent Σ cᵢ(uᵢ − dᵢ·m) is built chunk by chunk, never held in full
        for a, u in zip(weights, units):
            d = torch.clamp(torch.dot(mean, u), -1.0, 1.0)
            theta = torch.arccos(d)
            if theta.item() >= tol:
                coefs.append((a * theta / torch.sin(theta), d, u))
        length = _tangent_norm(mean, coefs, buffers)
        if length.item() < tol:
            break
        step_m, step_t = float(torch.cos(length)), float(torch.sin(length) / length)
        for start in range(0, mean.numel(), sparsify.CHUNK):  # m ← cos|v|·m + sin|v|·v/|v|, elementwise
            part = slice(start, start + sparsify.CHUNK)
            mean[part] = _tangent_chunk(mean, coefs, start, buffers).mul_(step_t).add_(mean[part], alpha=step_m)
        unit_norm = torch.linalg.vector_norm(mean)
        if unit_norm.item() > tol:
            mean /= unit_norm
    return mean.mul_(sum(a * m for a, m in zip(alphas, norms))).reshape(tensors[0].shape)


def _tangent_chunk(mean: torch.Tensor, coefs: list, start: int, buffers: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """[c] chunk of Σ cᵢ(uᵢ − dᵢ·m) from `start`, accumulated in place in `buffers` (two [CHUNK]
    tensors made once per tensor: three temporaries per input and chunk made allocation two thirds
    of a SmolLM2 merge's time). Each uᵢ − dᵢ·m is formed before it is scaled, as mergekit does: the
    inputs nearly coincide, and Σ cᵢuᵢ − (Σ cᵢdᵢ)·m would cancel away digits."""
    m = mean[start : start + sparsify.CHUNK]
    tangent, scratch = (b[: m.numel()] for b in buffers)
    tangent.zero_()
    for c, d, u in coefs:
        torch.add(u[start : start + sparsify.CHUNK], m, alpha=-float(d), out=scratch)
        tangent.add_(scratch, alpha=float(c))
    return tangent


def _tangent_norm(mean: torch.Tensor, coefs: list, buffers: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    if not coefs:
        return torch.zeros((), dtype=mean.dtype, device=mean.device)
    chunks = (_tangent_chunk(mean, coefs, s, buffers) for s in range(0, mean.numel(), sparsify.CHUNK))
    return torch.sqrt(sum(torch.dot(t, t) for t in chunks))


def arcee_fusion(tensors: Tensors, base: torch.Tensor) -> torch.Tensor:
    """θ* = θ_base + τ·[s ≥ Q₂(s) + 1.5·(Q₃(s) − Q₁(s))], τ = θ₁ − θ_base, importance s = |τ|·KL(softmax(θ₁) ‖
    softmax(θ_base)) per row (last dim): only the outlying-important changes are taken. Arcee Fusion
    (arcee.ai). The quartiles are exact here; mergekit estimates them from a random sample of 10⁶ entries
    on larger tensors (identical results up to 10⁶ entries)."""
    (other,) = tensors
    rows_other, rows_base = other.reshape(-1, other.shape[-1]), base.reshape(-1, base.shape[-1])  # [R, C]
    kl = torch.empty(rows_other.shape[0], 1, dtype=other.dtype, device=other.device)  # [R, 1]
    step = max(1, sparsify.CHUNK // rows_other.shape[1])
    for start in range(0, rows_other.shape[0], step):  # softmax temporaries bounded to a chunk of rows
        p = torch.softmax(rows_other[start : start + step], dim=-1) + 1e-8
        q = torch.softmax(rows_base[start : start + step], dim=-1) + 1e-8
        kl[start : start + step] = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    delta = rows_other.sub_(rows_base)  # [R, C], in the memory of θ₁
    importance = delta.abs().mul_(kl)
    n = importance.numel()
    ranks = (torch.tensor([0.25, 0.5, 0.75]) * (n - 1)).long().tolist()  # mergekit's quantile positions
    q1, median, q3 = (value for value, _, _ in sparsify.rank_stats(importance, ranks))
    keep = importance >= median + 1.5 * (q3 - q1)
    del importance
    return delta.mul_(keep).add_(rows_base).reshape(base.shape)


def nearswap(tensors: Tensors, base: torch.Tensor, *, t: float) -> torch.Tensor:
    """θ* = w·θ₁ + (1 − w)·θ_base, w = clamp(t / max(|θ₁ − θ_base|, 1e-6), 0, 1) per entry: entries closer
    than t take θ₁'s value, farther ones move towards it by t. NearSwap (alchemonaut, QuartetAnemoi-70B)."""
    (other,) = tensors
    flat, flat_base = other.reshape(-1), base.reshape(-1)
    for start in range(0, flat.numel(), sparsify.CHUNK):  # elementwise, in place, bounded scratch
        part = slice(start, start + sparsify.CHUNK)
        a, b = flat_base[part], flat[part]
        w = (t / (a - b).abs().clamp(min=1e-6)).clamp(min=0, max=1)
        flat[part] = w * b + (1 - w) * a
    return other


def ram(tensors: Tensors, base: torch.Tensor, *, epsilon: float = 1e-5, r: float = 0.0, alpha: float = 0.0) -> torch.Tensor:
    """τᵢ = θᵢ − θ_base, entries with |τᵢ| ≤ ε ignored; an entry changed by one model takes its τᵢ·λᵢ, one
    changed by several the mean of their τ: θ* = θ_base + Σᵢ τᵢ·[unique]·λᵢ + τᵢ·[shared]/count.
    RAM has λᵢ = 1; RAM+ (tensor-local, r > 0) λᵢ = 1 + r·clamp(ρᵢ, 0, α), ρᵢ = #shared/#unique entries
    of model i. Reinforced Agent Merging (arXiv 2601.13572)."""
    deltas = [t.sub_(base).reshape(-1) for t in tensors]  # N × [numel]
    n = deltas[0].numel()
    lambdas = [1.0] * len(deltas)
    if r:  # RAM+: count each model's shared and unique entries first
        shared, unique = [0] * len(deltas), [0] * len(deltas)
        for start in range(0, n, sparsify.CHUNK):
            changed = [d[start : start + sparsify.CHUNK].abs() > epsilon for d in deltas]  # N × [c] bool
            count = sum(c.int() for c in changed)
            for i, c in enumerate(changed):
                shared[i] += int((c & (count > 1)).sum())
                unique[i] += int((c & (count == 1)).sum())
        lambdas = [1 + r * min(max(s / max(u, epsilon), 0.0), alpha) for s, u in zip(shared, unique)]
    out, flat_base = deltas[0], base.reshape(-1)
    for start in range(0, n, sparsify.CHUNK):
        part = slice(start, start + sparsify.CHUNK)
        changed = [d[part].abs() > epsilon for d in deltas]  # N × [c] bool
        count = sum(c.int() for c in changed)  # [c]: how many models change each entry
        parts = [d[part] * c for d, c in zip(deltas, changed)]  # small changes zeroed
        unique, overlap = count == 1, count > 1
        mixed = sum(p * unique * lam + p * overlap / count.clamp(min=1) for p, lam in zip(parts, lambdas))
        out[part] = flat_base[part] + mixed
    return out.reshape(base.shape)


# ----------------------------------------------------------------------------------------- registry

Scope = Literal["shared", "input", "non_base"]
REQUIRED: Any = object()


@dataclass(frozen=True)
class Param:
    """One YAML parameter of a method. `input`/`non_base` ones take one value per (non-base) model."""

    name: str
    type: type
    scope: Scope = "shared"
    default: Any = REQUIRED
    arg: str | None = None  # the kernel's keyword when the YAML name is a Python keyword

    @property
    def kwarg(self) -> str:
        return self.arg or self.name


@dataclass(frozen=True)
class MergeMethod:
    """A registered method: its kernel, parameters and input contract."""

    name: str
    kernel: Callable[..., torch.Tensor]
    params: tuple[Param, ...]
    reference: str
    base: Literal["required", "optional", "ignored"] = "ignored"  # ignored: the base is just another input
    min_inputs: int = 1  # counting the base
    max_inputs: int | None = None
    min_non_base: int = 0  # inputs other than the base
    max_non_base: int | None = None
    random: bool = False  # the kernel takes a seeded `generator`
    needs_fisher: bool = False  # the kernel takes `fishers`, estimated before merging
    setup: tuple[Param, ...] = ()  # global settings read once before merging, not passed to the kernel

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params + self.setup if p.name == name), None)


def _task_arithmetic_method(name: str, reference: str, *, sparsifier, consensus, normalize, rescale) -> MergeMethod:
    """One of mergekit's "generalized task arithmetic" methods, with its normalize/rescale defaults."""
    params = [
        Param("weight", float, "non_base"),
        Param("density", float, "non_base", 1.0),
        Param("normalize", bool, default=normalize),
        Param("rescale", bool, default=rescale),
        Param("lambda", float, default=1.0, arg="lambda_"),
    ]
    if sparsifier == "outliers":
        params.append(Param("gamma", float, "non_base", 0.01))
    if sparsifier == "della":
        params.append(Param("epsilon", float, "non_base", 0.15))
    kernel = partial(task_arithmetic, sparsifier=sparsifier, consensus=consensus)
    int8_mask = Param("int8_mask", bool, default=False)  # mergekit's memory option: accepted, no effect on results
    return MergeMethod(name, kernel, tuple(params), reference, base="required", random=sparsifier in ("random", "della"), setup=(int8_mask,))


METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        MergeMethod(
            "linear",
            linear,
            (Param("weight", float, "input"), Param("normalize", bool, default=True)),
            "https://arxiv.org/abs/2203.05482",
        ),
        _task_arithmetic_method(
            "task_arithmetic", "https://arxiv.org/abs/2212.04089", sparsifier=None, consensus=False, normalize=False, rescale=False
        ),
        _task_arithmetic_method(
            "ties", "https://arxiv.org/abs/2306.01708", sparsifier="magnitude", consensus=True, normalize=True, rescale=False
        ),
        _task_arithmetic_method(
            "dare_ties", "https://arxiv.org/abs/2311.03099", sparsifier="random", consensus=True, normalize=False, rescale=True
        ),
        _task_arithmetic_method(
            "dare_linear", "https://arxiv.org/abs/2311.03099", sparsifier="random", consensus=False, normalize=False, rescale=True
        ),
        _task_arithmetic_method(
            "breadcrumbs", "https://arxiv.org/abs/2312.06795", sparsifier="outliers", consensus=False, normalize=False, rescale=False
        ),
        _task_arithmetic_method(
            "breadcrumbs_ties", "https://arxiv.org/abs/2312.06795", sparsifier="outliers", consensus=True, normalize=False, rescale=False
        ),
        _task_arithmetic_method(
            "della", "https://arxiv.org/abs/2406.11617", sparsifier="della", consensus=True, normalize=True, rescale=True
        ),
        _task_arithmetic_method(
            "della_linear", "https://arxiv.org/abs/2406.11617", sparsifier="della", consensus=False, normalize=False, rescale=True
        ),
        MergeMethod(
            "sce",
            sce,
            (Param("select_topk", float, default=1.0),),
            "https://arxiv.org/abs/2408.07990",
            base="required",
            setup=(Param("int8_mask", bool, default=False),),
        ),
        MergeMethod(
            "nuslerp",
            nuslerp,
            (Param("weight", float, "non_base"), Param("nuslerp_row_wise", bool, default=False), Param("nuslerp_flatten", bool, default=True)),
            "https://en.wikipedia.org/wiki/Slerp",
            base="optional",
            min_non_base=2,
            max_non_base=2,
        ),
        MergeMethod(
            "multislerp",
            multislerp,
            (Param("weight", float, "non_base"), Param("normalize_weights", bool, default=True), Param("eps", float, default=1e-8)),
            "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
            base="optional",
            min_non_base=1,
        ),
        MergeMethod(
            "karcher", karcher, (Param("max_iter", int, default=10), Param("tol", float, default=1e-5)), "https://arxiv.org/abs/2603.04972"
        ),
        MergeMethod("arcee_fusion", arcee_fusion, (), "https://arcee.ai", base="required", min_inputs=2, max_inputs=2),
        MergeMethod(
            "nearswap",
            nearswap,
            (Param("t", float),),
            "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
            base="required",
            min_inputs=2,
            max_inputs=2,
        ),
        MergeMethod("ram", ram, (Param("epsilon", float, default=1e-5),), "https://arxiv.org/abs/2601.13572", base="required"),
        MergeMethod(
            "ramplus_tl",
            ram,
            (Param("r", float, default=0.1), Param("alpha", float, default=0.2), Param("epsilon", float, default=1e-5)),
            "https://arxiv.org/abs/2601.13572",
            base="required",
        ),
        MergeMethod(
            "slerp",
            slerp,
            (Param("t", float),),
            "https://en.wikipedia.org/wiki/Slerp",
            base="required",
            min_inputs=2,
            max_inputs=2,
        ),
        MergeMethod(
            "model_stock",
            model_stock,
            (Param("filter_wise", bool, default=False),),
            "https://arxiv.org/abs/2403.19522",
            base="required",
            min_inputs=3,
        ),
        MergeMethod("passthrough", passthrough, (Param("scale", float, "input", None),), "", max_inputs=1),
        MergeMethod(
            "fisher",
            fisher,
            (Param("weight", float, "input", 1.0), Param("fisher_floor", float, default=1e-6)),
            "https://arxiv.org/abs/2111.09832",
            needs_fisher=True,
            setup=(
                Param("fisher_data", str),
                Param("fisher_batches", int, default=4),
                Param("fisher_batch_size", int, default=2),
                Param("fisher_seq_len", int, default=128),
            ),
        ),
    )
}


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"merge_method {name!r} is not supported; supported: {', '.join(METHODS)}") from None
