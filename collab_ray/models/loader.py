"""Resolve a model source (tiny, packaged, directory, GGUF file, Hub id) and load it with transformers.

Weights are read from safetensors or GGUF only — never from pickle files.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_model

from collab_ray.core.errors import ConfigError, ModelLoadError
from collab_ray.models import packaged, tiny
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
        f"model source {source!r} is not tiny:NAME, a packaged model ({', '.join(packaged.PACKAGED)}), "
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


def dequantized(resolved: Resolved) -> Resolved:
    """A GGUF model as a float32 safetensors directory, converted once and cached.

    transformers dequantizes GGUF on every load (about a minute for Gemma-3-270M on 2 cores);
    the cached directory loads in seconds and holds the very same tensors.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(resolved.location) / resolved.gguf_file
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_root() / "gguf" / f"{gguf.stem}-{key}"
    if not (out / "config.json").is_file():
        with building(out) as tmp:
            AutoTokenizer.from_pretrained(resolved.location, gguf_file=resolved.gguf_file).save_pretrained(tmp)
            model = AutoModelForCausalLM.from_pretrained(
                resolved.location, gguf_file=resolved.gguf_file, dtype=torch.float32
            )
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
