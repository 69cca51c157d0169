"""Diagonal Fisher information of a causal LM, estimated from a few sequences of a text file.

F = mean over sequences x of (∇θ log p(x))² (the empirical Fisher, per-sequence gradients), as in
Matena & Raffel 2022 ("Merging Models with Fisher-Weighted Averaging", arXiv 2111.09832). One
model is loaded at a time; its Fisher goes to a safetensors file that the merge reads per tensor.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from collab_ray.core.errors import ConfigError
from collab_ray.merge.io import ModelFiles


def token_chunks(text_file: str | Path, tokenizer_dir: Path, seq_len: int, count: int) -> torch.Tensor:
    """Up to `count` consecutive [seq_len] chunks of the tokenized file. -> [n, seq_len] int64."""
    from transformers import AutoTokenizer

    path = Path(text_file)
    if not path.is_file():
        raise ConfigError(f"evaluation/Fisher data {str(path)!r}: no such file")
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    except (OSError, ValueError) as e:
        raise ConfigError(f"no tokenizer in {str(tokenizer_dir)!r} to read {str(path)!r}: {e}") from None
    ids = torch.tensor(tokenizer(path.read_text(encoding="utf-8"))["input_ids"])
    n = min(count, len(ids) // seq_len)
    if n == 0:
        raise ConfigError(f"{str(path)!r} has {len(ids)} tokens, fewer than one sequence of {seq_len}")
    return ids[: n * seq_len].reshape(n, seq_len)


def estimate_fisher(
    model: ModelFiles,
    tokenizer_source: ModelFiles,
    out_dir: Path,
    *,
    fisher_data: str,
    fisher_batches: int = 4,
    fisher_batch_size: int = 2,
    fisher_seq_len: int = 128,
    device: str = "cpu",
) -> ModelFiles:
    """Estimate the diagonal Fisher of `model` on `fisher_batches × fisher_batch_size` sequences of
    `fisher_data` (tokenized with `tokenizer_source`'s tokenizer) and save it under `out_dir`."""
    from transformers import AutoModelForCausalLM

    chunks = token_chunks(fisher_data, tokenizer_source.path, fisher_seq_len, fisher_batches * fisher_batch_size)
    lm = AutoModelForCausalLM.from_pretrained(model.path, dtype=torch.float32).to(device)
    params = dict(lm.named_parameters())
    fisher = {name: torch.zeros_like(p) for name, p in params.items()}
    for x in chunks.to(device):  # per-sequence gradients: squares of batch means would underestimate F
        lm.zero_grad(set_to_none=True)
        lm(input_ids=x[None], labels=x[None]).loss.backward()
        for name, p in params.items():
            if p.grad is not None:
                fisher[name] += p.grad.detach() ** 2
    del lm, params
    out_dir.mkdir(parents=True)
    save_file({name: (f / len(chunks)).cpu().contiguous() for name, f in fisher.items()}, str(out_dir / "model.safetensors"))
    return ModelFiles(str(out_dir))
