"""LoRA extraction: a merged model's difference to its base as a PEFT LoRA adapter (`--extract-lora RANK`).

Each linear weight W of the layers (2-D, `….layers.i.….weight`) gets ΔW = W_merged − W_base ≈ B·A by
truncated SVD: ΔW = U S Vᵀ, A = √S_r Vᵀ_r [r, in], B = U_r √S_r [out, r] (the scale split between
the factors, lora_alpha = r so peft applies B·A as is), as `mergekit-extract-lora` does. Everything
else — embeddings, LM head, norms — goes to `modules_to_save` at full rank. The merge streams tensor
by tensor into the adapter file; the merged model itself is never written.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from collab_ray.core.errors import ConfigError
from collab_ray.merge.io import OutputTensor, StreamingWriter, atomic_output_dir
from collab_ray.merge.plan import LAYER_RE, MergePlan

PREFIX = "base_model.model."


def lora_rank(shape: tuple[int, ...], name: str, rank: int) -> int | None:
    """The LoRA rank of tensor `name`, or None when it is saved at full rank (not a layer's linear weight)."""
    if len(shape) != 2 or not name.endswith(".weight") or not LAYER_RE.match(name):
        return None
    return min(rank, *shape)


def decompose(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ΔW [out, in] ≈ B·A with A = √S_r·Vᵀ_r [r, in] and B = U_r·√S_r [out, r] (truncated SVD)."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    root = s[:rank].sqrt()
    return (root[:, None] * vh[:rank]).to(delta.dtype), (u[:, :rank] * root[None, :]).to(delta.dtype)


def extract_lora(plan: MergePlan, merged, out_dir: str | Path, rank: int, *, overwrite: bool = False, progress: bool = True) -> Path:
    """Write the adapter of the (name, tensor) stream `merged` of `plan` relative to the plan's base into `out_dir`."""
    if rank < 1:
        raise ConfigError(f"--extract-lora: rank must be at least 1, got {rank}")
    base = plan.base
    if base is None:
        raise ConfigError("--extract-lora needs a base_model: the adapter is the merge's difference to it")
    planned, ranks, full = [], {}, set()
    for job in plan.jobs:
        name, shape = job.out.name, job.out.shape
        r = lora_rank(shape, name, rank)
        if r is None or name not in base.tensors or base.tensors[name].shape != shape:
            planned.append(OutputTensor(PREFIX + name, shape, job.out.dtype))
            full.add(name)
            continue
        module = name.removesuffix(".weight")
        ranks[module] = r
        planned += [OutputTensor(f"{PREFIX}{module}.lora_A.weight", (r, shape[1]), job.out.dtype), OutputTensor(f"{PREFIX}{module}.lora_B.weight", (shape[0], r), job.out.dtype)]
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        writer = StreamingWriter(tmp, planned, max_shard_bytes=1 << 62)
        for name, tensor in tqdm(merged, total=len(plan.jobs), desc=f"extract LoRA (rank {rank})", disable=not progress):
            if name in full:
                writer.write(PREFIX + name, tensor)
                continue
            a, b = decompose(tensor.float() - base.load(name).float(), ranks[name.removesuffix(".weight")])
            module = name.removesuffix(".weight")
            writer.write(f"{PREFIX}{module}.lora_A.weight", a.to(tensor.dtype).contiguous())
            writer.write(f"{PREFIX}{module}.lora_B.weight", b.to(tensor.dtype).contiguous())
        writer.finish()
        (tmp / "model.safetensors").rename(tmp / "adapter_model.safetensors")
        different = {m: r for m, r in ranks.items() if r != rank}
        adapter_config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base.ref,
            "r": rank,
            "lora_alpha": rank,  # scale alpha / r = 1: B·A is the difference itself
            "rank_pattern": different,
            "alpha_pattern": different,
            "target_modules": sorted(ranks),
            "modules_to_save": sorted({n.removesuffix(".weight").removesuffix(".bias").rsplit(".", 1)[-1] for n in full}),
            "lora_dropout": 0.0,
            "fan_in_fan_out": False,
            "use_rslora": False,
            "bias": "none",
            "inference_mode": True,
        }
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    return Path(out_dir)
