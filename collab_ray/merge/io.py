"""Streaming safetensors I/O: lazy per-tensor reads, a streaming sharded writer, atomic output dirs.

Reads open the shard with `safe_open` for one tensor at a time and close it again, so no mapping of
a whole checkpoint stays resident; the writer knows every output tensor's shape and dtype up front,
writes each shard's header first and then appends tensors as they are merged. Together a merge
holds one tensor per input plus the output tensor, never whole models.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import safe_open

from collab_ray.core.errors import ConfigError, ModelLoadError

DTYPE_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
INDEX_NAME = "model.safetensors.index.json"
# Small files of the donor model copied next to the merged weights (as mergekit does).
TOKENIZER_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
SIDE_FILES = (*TOKENIZER_FILES, "generation_config.json")


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * self.dtype.itemsize


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def read_header(file: Path) -> dict:
    """The JSON header of a safetensors file (read directly, without mapping the file)."""
    try:
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            return json.loads(f.read(length))
    except (OSError, struct.error, ValueError) as e:
        raise ModelLoadError(f"{file}: not a readable safetensors file ({e})") from None


class ModelFiles:
    """The safetensors checkpoint in a local directory: tensor names, shapes and dtypes, read lazily."""

    def __init__(self, ref: str, path: Path | None = None):
        self.ref = ref
        self.path = Path(path) if path is not None else _resolve_dir(ref)
        self.config = json.loads((self.path / "config.json").read_text()) if (self.path / "config.json").is_file() else {}
        self.tensors: dict[str, TensorInfo] = {}
        for file in _shard_files(self.path):
            for name, meta in read_header(file).items():
                if name != "__metadata__":
                    self.tensors[name] = TensorInfo(file, CODE_DTYPES[meta["dtype"]], tuple(meta["shape"]))

    def __repr__(self) -> str:
        return f"ModelFiles({self.ref!r})"

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    def load(self, name: str) -> torch.Tensor:
        """Tensor `name`, copied out of its shard; the shard is closed again right away."""
        with safe_open(self.tensors[name].file, framework="pt", device="cpu") as f:
            return f.get_tensor(name)


def _resolve_dir(ref: str) -> Path:
    from collab_ray.merge.sources import resolve_dir, split_lora

    if split_lora(ref)[1] is not None:
        raise ModelLoadError(f"model {ref!r}: a LoRA reference needs a work directory (open it with open_model)")
    return resolve_dir(ref)


def open_model_files(ref: str, work: Path | None = None) -> ModelFiles:
    """ModelFiles of any model reference; 'base+adapter' is merged (peft) into a directory under `work`."""
    from collab_ray.merge.sources import merged_lora_dir, split_lora

    if split_lora(ref)[1] is None:
        return ModelFiles(ref)
    if work is None:
        raise ModelLoadError(f"model {ref!r}: a LoRA reference needs a work directory")
    return ModelFiles(ref, merged_lora_dir(ref, work))


def _shard_files(path: Path) -> list[Path]:
    index = path / INDEX_NAME
    if index.is_file():
        files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"model {str(path)!r}: shards listed in {INDEX_NAME} are missing: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"model {str(path)!r} has no *.safetensors weights (pickle checkpoints are not read)")
    return files


# ------------------------------------------------------------------------------------ writing

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B?)\s*$", re.IGNORECASE)


def parse_size(value: str | int) -> int:
    """Bytes in '2GB' (10⁹), '500MiB' (2²⁰), '1.5G' or a plain integer."""
    if isinstance(value, int):
        return value
    m = _SIZE_RE.match(value)
    if not m:
        raise ConfigError(f"size {value!r} is not like '2GB', '500MiB' or a number of bytes")
    unit = m.group(2).upper().removesuffix("B")
    base = 1024 if unit.endswith("I") else 1000
    power = "KMGT".find(unit[:1]) + 1 if unit else 0
    size = int(float(m.group(1)) * base**power)
    if size <= 0:
        raise ConfigError(f"size {value!r} must be positive")
    return size


@dataclass(frozen=True)
class OutputTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * self.dtype.itemsize


class StreamingWriter:
    """Writes tensors, in the planned order, into shards of at most `max_shard_bytes` (+ index).

    Shard headers are written before their data, from the planned shapes and dtypes, so each
    tensor goes to disk as soon as it is merged. One shard is named `model.safetensors` (no index),
    several are `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`.
    """

    def __init__(self, out_dir: Path, planned: list[OutputTensor], max_shard_bytes: int):
        self.out_dir = Path(out_dir)
        self.shards: list[list[OutputTensor]] = [[]]
        size = 0  # bytes in the last shard
        for t in planned:
            if self.shards[-1] and size + t.nbytes > max_shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append(t)
            size += t.nbytes
        n = len(self.shards)
        self.names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._pending: Iterator[tuple[int, OutputTensor]] = ((i, t) for i, shard in enumerate(self.shards) for t in shard)
        self._file: BinaryIO | None = None
        self._shard = -1

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard, expected = next(self._pending, (None, None))
        if expected is None or expected.name != name:
            raise RuntimeError(f"writer expected tensor {expected and expected.name!r}, got {name!r}")
        if tuple(tensor.shape) != expected.shape or tensor.dtype != expected.dtype:
            raise RuntimeError(f"tensor {name!r}: planned {expected.shape} {expected.dtype}, got {tuple(tensor.shape)} {tensor.dtype}")
        if shard != self._shard:
            self._open(shard)
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        self._file.write(memoryview(data.view(torch.uint8).numpy()))

    def _open(self, shard: int) -> None:
        self._close()
        self._shard = shard
        header, offset = {}, 0
        for t in self.shards[shard]:
            header[t.name] = {"dtype": DTYPE_CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        self._file = open(self.out_dir / self.names[shard], "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def finish(self) -> None:
        self._close()
        left = next(self._pending, None)
        if left is not None:
            raise RuntimeError(f"merge ended before tensor {left[1].name!r} was written")
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(t.nbytes for shard in self.shards for t in shard)},
                "weight_map": {t.name: self.names[i] for i, shard in enumerate(self.shards) for t in shard},
            }
            (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2))


@contextmanager
def atomic_output_dir(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir next to `out_dir`; rename it to `out_dir` only if the block succeeds.

    A failed merge leaves nothing that looks like a finished model. An existing non-empty
    `out_dir` is an error unless `overwrite`, in which case it is replaced after success.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"output {str(out_dir)!r} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ConfigError(f"output directory {str(out_dir)!r} exists and is not empty (use --overwrite to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.is_dir():
            old = out_dir.with_name(f".{out_dir.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_side_files(donor: ModelFiles, out_dir: Path, config_updates: dict) -> None:
    """config.json of the donor with `config_updates`, and its tokenizer/generation files."""
    config = {**donor.config, **config_updates}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in SIDE_FILES:
        if (donor.path / name).is_file():
            shutil.copy2(donor.path / name, out_dir / name)
