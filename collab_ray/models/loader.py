"""Resolve a model source (tiny, the multi-task experiment's, packaged, directory, GGUF file, Hub id) and load
it with transformers.

Weights are read from safetensors or GGUF only — never from pickle files.
"""

from __future__ import annotations

import hashlib
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import save_model

from collab_ray.core.errors import ConfigError, ModelLoadError
from collab_ray.models import multitask, packaged, tiny
from collab_ray.models.cache import building, cache_root
from collab_ray.models.config import ModelConfig

HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


@dataclass(frozen=True)
class Resolved:
    kind: str  # "dir" | "gguf" | "hub"
    location: str  # directory, or Hub id
    gguf_file: str | None = None


def resolve_source(source: str) -> Resolved:
    """Map a source string to what `from_pretrained` needs; errors name the source."""
    if source.startswith("tiny:"):
        return Resolved("dir", str(tiny.tiny_path(source.removeprefix("tiny:"))))
    if source.partition(":")[0] in multitask.RECIPES:  # multitask-hard:add, … (built on first use)
        return Resolved("dir", multitask.resolve_model(source))
    if source in packaged.PACKAGED:
        path = packaged.gguf_path(source)
        return Resolved("gguf", str(path.parent), path.name)
    path = Path(source).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix == ".gguf":
                return Resolved("gguf", str(path.parent), path.name)
            raise ConfigError(f"model source {source!r} is a file but not a .gguf file")
        if any(path.glob("*.safetensors")):
            if not (path / "config.json").is_file():
                raise ConfigError(f"model directory {source!r} has safetensors but no config.json")
            return Resolved("dir", str(path))
        if any(p.suffix in PICKLE_SUFFIXES for p in path.iterdir()):
            raise ConfigError(f"model directory {source!r} holds only pickle checkpoints; collab_ray loads safetensors only")
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return Resolved("gguf", str(path), ggufs[0].name)
        raise ConfigError(f"model directory {source!r} has no *.safetensors weights")
    if source.startswith(("/", "./", "../", "~")) or source.endswith(".gguf"):
        raise ConfigError(f"model source {source!r}: no such file or directory")
    if HUB_ID_RE.match(source) and "/" in source:
        return Resolved("hub", source)
    raise ConfigError(
        f"model source {source!r} is not tiny:NAME, {'/'.join(multitask.RECIPES)}:NAME, a packaged model ({', '.join(packaged.PACKAGED)}), "
        "an existing path, or a Hub id like org/name"
    )


def placement(device: str) -> tuple[dict, torch.device]:
    """from_pretrained kwargs for `device`, and the device inputs go to."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return {}, torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but no CUDA device is visible")
    if device == "cuda":
        # one model spans every GPU of its replica (accelerate's device_map)
        if torch.cuda.device_count() > 1:
            return {"device_map": "auto"}, torch.device("cuda:0")
        device = "cuda:0"
    index = int(device.split(":")[1])
    if index >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return {"device_map": {"": index}}, torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def content_sha256(path: Path) -> str:
    """sha256 of a file's bytes; read from `FILE.sha256` beside it when that record is newer than the file
    (packaged models write one), else computed (about 0.3 s per 100 MB)."""
    record = packaged.sha256_sidecar(path)
    if record.is_file() and record.stat().st_mtime_ns >= path.stat().st_mtime_ns:
        return record.read_text().strip()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def dequantized_dir(resolved: Resolved) -> Path:
    """Where the float32 copy of a GGUF model is cached: keyed by the file's content, so the same file
    found at any path, in any virtualenv, is converted once."""
    gguf = Path(resolved.location) / resolved.gguf_file
    return cache_root() / "gguf" / f"{gguf.stem}-{content_sha256(gguf)[:16]}"


@contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """Within this block, each GGUF file is parsed once.

    transformers parses the file anew for the tokenizer, the config and the weights, and parsing its
    metadata in Python (Gemma-3's vocabulary has 262,144 entries) is most of a conversion's time on a
    small CPU; the reader is read-only, so one per file serves all three.
    """
    import gguf

    original = gguf.GGUFReader
    readers: dict = {}

    def reader(path, *args, **kwargs):
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = original(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


def is_dequantized(resolved: Resolved) -> bool:
    """Whether the float32 copy of this GGUF model is in the cache already."""
    return (dequantized_dir(resolved) / "config.json").is_file()


def dequantized(resolved: Resolved, progress: Callable[[str], None] | None = None) -> Resolved:
    """A GGUF model as a float32 safetensors directory, converted once and cached (keyed by content).

    transformers dequantizes GGUF on every load (minutes for Gemma-3-270M on 2 cores); the cached
    directory loads in seconds and holds the very same tensors. `progress` gets a line per stage;
    transformers' own bar counts the tensors as they are dequantized.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say = progress or (lambda line: None)
    out = dequantized_dir(resolved)
    if not (out / "config.json").is_file():
        with building(out) as tmp, gguf_parsed_once():
            say(f"reading {resolved.gguf_file} (metadata and vocabulary) and converting its tokenizer")
            AutoTokenizer.from_pretrained(resolved.location, gguf_file=resolved.gguf_file).save_pretrained(tmp)
            say("dequantizing the weights to float32")
            model = AutoModelForCausalLM.from_pretrained(
                resolved.location, gguf_file=resolved.gguf_file, dtype=torch.float32
            )
            say(f"saving to {out}")
            # save_pretrained refuses GGUF-loaded models; the dequantized tensors are plain float32
            save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            config = model.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            config.save_pretrained(tmp)
            model.generation_config.save_pretrained(tmp)
    return Resolved("dir", str(out))


def keep_first_layers(model, n: int) -> None:
    """Truncate a decoder to its first `n` layers in place (the final norm and head stay)."""
    layers = model.get_decoder().layers
    if n > len(layers):
        raise ConfigError(f"keep_layers {n} exceeds the model's {len(layers)} layers")
    model.get_decoder().layers = layers[:n]
    text_config = model.config.get_text_config()
    text_config.num_hidden_layers = n
    if getattr(text_config, "layer_types", None):
        text_config.layer_types = text_config.layer_types[:n]


def load(config: ModelConfig):
    """(model, tokenizer, input device) for `config`; model in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = resolve_source(config.source)
    if resolved.gguf_file and config.cache_dequantized:
        resolved = dequantized(resolved)
    kwargs, device = placement(config.device)
    dtype = resolve_dtype(config.dtype, device)
    common: dict = {}
    if resolved.gguf_file:
        common["gguf_file"] = resolved.gguf_file
    if resolved.kind == "hub" and config.revision:
        common["revision"] = config.revision
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.location, **common)
        model = AutoModelForCausalLM.from_pretrained(
            resolved.location,
            dtype=dtype,
            use_safetensors=None if resolved.gguf_file else True,
            **common,
            **kwargs,
        )
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load model source {config.source!r}: {e}") from e
    if config.keep_layers is not None:
        keep_first_layers(model, config.keep_layers)
    if not kwargs:
        model.to(device)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, model.get_input_embeddings().weight.device
