"""Model soups (Wortsman et al. 2022, arXiv 2203.05482): uniform and greedy averages of fine-tunes.

The evaluation is pluggable: a `Scorer` maps a state dict to a number, higher is better (for
example `perplexity_scorer`, or an accuracy from the evaluation harness).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from collab_ray.core.errors import ConfigError
from collab_ray.merge.config import MergeConfig
from collab_ray.merge.engine import merge, merge_to_state_dict

Scorer = Callable[[dict[str, torch.Tensor]], float]


def uniform_config(models: Sequence[str]) -> MergeConfig:
    """A linear merge with equal weights: θ* = (1/N) Σ θᵢ."""
    return MergeConfig(merge_method="linear", models=[{"model": m, "parameters": {"weight": 1.0}} for m in models])


def uniform_soup(models: Sequence[str], out_dir: str | Path, **merge_options) -> Path:
    """Write the uniform soup of `models` to `out_dir` (streamed; `merge_options` as for `merge`)."""
    return merge(uniform_config(models), out_dir, **merge_options)


def greedy_soup(models: Sequence[str], score: Scorer, held_out: Scorer | None = None, *, device: str = "cpu") -> list[str]:
    """The ingredients of the greedy soup: sort `models` by `score`, then add each to the running uniform
    average only if `held_out` (default: `score`) of the average does not drop."""
    scores = {m: score(merge_to_state_dict(uniform_config([m]), device=device)) for m in models}
    ranked = sorted(models, key=scores.__getitem__, reverse=True)
    best = scores[ranked[0]] if held_out is None else held_out(merge_to_state_dict(uniform_config(ranked[:1]), device=device))
    held_out = held_out or score
    soup = [ranked[0]]
    for candidate in ranked[1:]:
        value = held_out(merge_to_state_dict(uniform_config([*soup, candidate]), device=device))
        if value >= best:
            soup, best = [*soup, candidate], value
    return soup


def perplexity_scorer(
    text_file: str | Path, reference_dir: str | Path, *, seq_len: int = 128, max_tokens: int = 4096, device: str = "cpu"
) -> Scorer:
    """Scorer = −perplexity of the text (tokenized with `reference_dir`'s tokenizer), for models with
    `reference_dir`'s architecture. The model skeleton is built once and reloaded per state dict."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from collab_ray.merge.fisher import token_chunks

    chunks = token_chunks(text_file, Path(reference_dir), seq_len, max(1, max_tokens // seq_len)).to(device)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(reference_dir)).to(device).eval()

    @torch.no_grad()
    def score(state_dict: dict[str, torch.Tensor]) -> float:
        unexpected = model.load_state_dict(state_dict, strict=False).unexpected_keys
        if unexpected:
            raise ConfigError(f"state dict does not fit the architecture of {str(reference_dir)!r}: {unexpected[:3]}")
        loss = sum(model(input_ids=x[None], labels=x[None]).loss.item() for x in chunks) / len(chunks)
        return -math.exp(loss)

    return score
