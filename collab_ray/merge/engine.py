"""Run a merge plan tensor by tensor: to a sharded safetensors directory, or to an in-memory state dict.

Peak memory is one tensor per input plus the output tensor (and, for `fisher`, the Fisher
estimation pass, which loads one model at a time). Inputs are cast to the config's `dtype` if set,
merged in float32 (float64 if an input is float64) on `device`, and written in the output dtype.
"""

from __future__ import annotations

import ctypes
import logging
import tempfile
import zlib
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from collab_ray.merge.config import MergeConfig, load_config
from collab_ray.merge.io import TOKENIZER_FILES, ModelFiles, StreamingWriter, atomic_output_dir, open_model_files, parse_size, write_side_files
from collab_ray.merge.plan import MergePlan, TensorJob, build_plan
from collab_ray.merge.stages import read_documents, run_stages

log = logging.getLogger(__name__)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
ConfigLike = MergeConfig | dict | str | Path


def merge(
    config: ConfigLike,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    out_shard_size: str | int = "2GB",
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    extract_lora: int | None = None,
) -> Path:
    """Merge as `config` (a mergekit YAML file, YAML text, dict or MergeConfig) says, into `out_dir`.

    Writes sharded safetensors (+ index), the donor's config.json (layer count and dtype updated)
    and its tokenizer files. Everything is checked before the first tensor is merged, and the
    output appears under `out_dir` only once complete (written to a temp dir, then renamed). With
    `extract_lora` = RANK, `out_dir` gets the merge's difference to its base_model as a PEFT LoRA
    adapter of that rank instead (see `collab_ray.merge.lora`).
    """
    docs = read_documents(config)
    if docs is not None:  # a multi-stage config: earlier stages into temporary directories
        options = dict(device=device, out_shard_size=out_shard_size, seed=seed, progress=progress)
        return run_stages(
            docs,
            Path(out_dir),
            lambda stage, where: merge(stage, where, **options),
            lambda final: merge(final, out_dir, overwrite=overwrite, extract_lora=extract_lora, **options),
        )
    max_bytes = parse_size(out_shard_size)
    with tempfile.TemporaryDirectory(prefix="collab-ray-models-") as work:  # merged LoRA adapters live here
        plan = build_plan(load_config(config), partial(open_model_files, work=Path(work)))
        if extract_lora is not None:
            from collab_ray.merge.lora import extract_lora as extract

            merged = iter_merged(plan, device=device, seed=seed, progress=False)
            return extract(plan, merged, out_dir, extract_lora, overwrite=overwrite, progress=progress)
        with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
            writer = StreamingWriter(tmp, [job.out for job in plan.jobs], max_bytes)
            for name, tensor in iter_merged(plan, device=device, seed=seed, progress=progress):
                writer.write(name, tensor)
            writer.finish()
            write_side_files(plan.donor, tmp, plan.config_updates)
            write_tokenizer(plan, tmp)
    return Path(out_dir)


def merge_to_state_dict(
    config: ConfigLike,
    *,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = False,
    open_model: Callable[[str], ModelFiles] | None = None,
) -> dict[str, torch.Tensor]:
    """The merged tensors as a state dict (on CPU), without writing anything (for coefficient search).

    `open_model` maps a model reference to its tensors: by default read from disk; coefficient
    search passes weights it already holds in memory.
    """
    docs = read_documents(config)
    if docs is not None:
        with tempfile.TemporaryDirectory(prefix="collab-ray-stages-") as stages:
            options = dict(device=device, seed=seed, progress=progress)
            run_one = lambda stage, where: merge(stage, where, **options)  # noqa: E731
            return run_stages(docs, Path(stages) / "out", run_one, lambda final: merge_to_state_dict(final, open_model=open_model, **options))
    with tempfile.TemporaryDirectory(prefix="collab-ray-models-") as work:
        plan = build_plan(load_config(config), open_model or partial(open_model_files, work=Path(work)))
        return dict(iter_merged(plan, device=device, seed=seed, progress=progress))


def iter_merged(plan: MergePlan, *, device: str = "cpu", seed: int = 0, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, merged tensor) for every job of `plan`, in order."""
    _return_freed_memory_to_os()
    _warn_row_alignment(plan)
    with tempfile.TemporaryDirectory(prefix="collab-ray-merge-") as work:
        fishers = _fishers(plan, Path(work), device) if plan.method.needs_fisher else None
        for job in tqdm(plan.jobs, desc=f"merge ({plan.method.name})", unit="tensor", disable=not progress):
            yield job.out.name, merge_job(plan, job, device=device, seed=seed, fishers=fishers)


def merge_job(
    plan: MergePlan, job: TensorJob, *, device: str = "cpu", seed: int = 0, fishers: dict[str, ModelFiles] | None = None
) -> torch.Tensor:
    """Load the inputs of one job, run the method's kernel, return the output tensor (CPU)."""
    tensors = [i.model.load(i.name) for i in job.inputs]
    if not job.out.dtype.is_floating_point:  # integer buffers are copied from the base / first input
        return tensors[job.base_index or 0]
    work = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    tensors = [(t.to(plan.cast) if plan.cast else t).to(device=device, dtype=work) for t in tensors]
    if job.align_rows:
        tensors = _align_rows(tensors, tensors[_base_position(plan, job)], job.out.shape[0])
    if job.vocab:
        tensors = plan.vocabulary.align([i.model.ref for i in job.inputs], tensors, job.vocab_base)
    base = tensors.pop(job.base_index) if job.base_index is not None else None
    kwargs = dict(job.kwargs)
    if plan.method.random:
        kwargs["generator"] = torch.Generator(device=device).manual_seed(zlib.crc32(f"{seed}:{job.out.name}".encode()))
    if fishers is not None:
        kwargs["fishers"] = [_fisher_of(fishers[i.model.ref], i.name, t) for i, t in zip(job.inputs, tensors)]
    return plan.method.kernel(tensors, base, **kwargs).to(device="cpu", dtype=job.out.dtype)


def write_tokenizer(plan: MergePlan, out_dir: Path) -> None:
    """The output tokenizer (built vocabulary, or the donor's when only `chat_template` is set), saved with
    its chat template over the donor's copied tokenizer files."""
    tokenizer = plan.vocabulary.tokenizer if plan.vocabulary is not None else None
    if tokenizer is None and plan.chat_template is None:
        return
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(plan.donor.path)
    if plan.chat_template is not None:
        tokenizer.chat_template = plan.chat_template
    for name in TOKENIZER_FILES:  # the donor's copies would shadow or contradict the saved tokenizer
        (out_dir / name).unlink(missing_ok=True)
    tokenizer.save_pretrained(out_dir)


def _return_freed_memory_to_os() -> None:
    """Make glibc serve allocations ≥ 1 MiB by mmap and trim its heap above 1 MiB (process-wide).

    By default glibc raises these thresholds to 32 MiB after large frees, so freed tensor-sized
    blocks stay in the heap and count towards RSS; a merge frees and reallocates such blocks for
    every tensor. No-op where glibc is not the allocator.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 20)


def _align_rows(tensors: list[torch.Tensor], base: torch.Tensor, rows: int) -> list[torch.Tensor]:
    """Crop each [r, *E] tensor to `rows`, or pad it with the base's rows r… (tokens only the base has)."""
    return [t[:rows] if t.shape[0] >= rows else torch.cat([t, base[t.shape[0] : rows]]) for t in tensors]


def _base_position(plan: MergePlan, job: TensorJob) -> int:
    if job.base_index is not None:
        return job.base_index
    return next(i for i, inp in enumerate(job.inputs) if inp.model is plan.donor)


def _warn_row_alignment(plan: MergePlan) -> None:
    for job in plan.jobs:
        if job.align_rows:
            rows = {i.model.ref: i.model.tensors[i.name].shape[0] for i in job.inputs}
            log.warning(
                "%s: vocabulary rows differ %s; cropping/padding every model to the base's %d rows "
                "(padded rows are the base's; assumes the tokenizers agree on shared token ids)",
                job.out.name,
                rows,
                job.out.shape[0],
            )


def _fishers(plan: MergePlan, work: Path, device: str) -> dict[str, ModelFiles]:
    from collab_ray.merge.fisher import estimate_fisher

    return {m.ref: estimate_fisher(m, plan.donor, work / f"fisher-{i}", device=device, **plan.setup) for i, m in enumerate(plan.models)}


def _fisher_of(files: ModelFiles, name: str, like: torch.Tensor) -> torch.Tensor:
    """The diagonal Fisher of tensor `name` shaped like `like` (rows cropped/padded with ones), or ones
    (uniform) for tensors that got no gradient."""
    ones = torch.ones_like(like)
    if name not in files.tensors:
        return ones
    (fisher,) = _align_rows([files.load(name).to(like)], ones, like.shape[0])
    return fisher
