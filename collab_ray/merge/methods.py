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
    sparsifier: Literal["magnitude", "random", "outliers"] | None = None,
    consensus: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """θ* = θ_base + λ Σ wᵢ·sparsify(τᵢ) [/ Σ wᵢ], τᵢ = θᵢ − θ_base; with `consensus`, only the entries
    agreeing with sign(Σ wᵢτᵢ) count (per-entry divisor). Task arithmetic (Ilharco et al. 2023,
    arXiv 2212.04089) and, by sparsifier/consensus, TIES, DARE and Model Breadcrumbs.
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
    majority = torch.where(sum(deltas[1:], deltas[0].clone()) >= 0, 1.0, -1.0).to(deltas[0].dtype)  # [c]
    mixed = torch.zeros_like(majority)
    divisor = torch.zeros_like(majority)
    for delta, w in zip(deltas, weight):
        agree = delta.sign() == majority  # [c] bool; zeros never agree
        mixed += delta * agree
        divisor += agree * w
    divisor[divisor == 0] = 1
    return mixed, divisor


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
    base: Literal["required", "ignored"] = "ignored"  # ignored: the base is just another input
    min_inputs: int = 1  # counting the base
    max_inputs: int | None = None
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
    kernel = partial(task_arithmetic, sparsifier=sparsifier, consensus=consensus)
    int8_mask = Param("int8_mask", bool, default=False)  # mergekit's memory option: accepted, no effect on results
    return MergeMethod(name, kernel, tuple(params), reference, base="required", random=sparsifier == "random", setup=(int8_mask,))


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
