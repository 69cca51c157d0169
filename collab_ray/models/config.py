"""How to load one model: the pydantic config every loader and server takes."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEVICE_RE = re.compile(r"^(cpu|auto|cuda(:\d+)?)$")


class ModelConfig(BaseModel):
    """One model: where its weights come from and how the backend holds it."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    source: str = Field(
        description="`tiny:NAME`, a packaged model name (`collab-ray models list`), a local safetensors "
        "directory, a .gguf file, or a Hugging Face Hub id."
    )
    name: str | None = Field(None, description="Display name; defaults to the source.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Weight dtype; auto = float32 on CPU, bfloat16 (or float16) on GPU."
    )
    device: str = Field(
        "auto",
        description="cpu, cuda (every visible GPU: accelerate device_map spreads a large model across them), "
        "cuda:N, or auto (cuda when available).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for Hub ids.")
    cache_dequantized: bool = Field(
        True, description="Convert a GGUF model to float32 safetensors once and load that cached copy afterwards."
    )
    keep_layers: int | None = Field(
        None,
        ge=1,
        description="Keep only the first N decoder layers: an early-exit copy of the model, a cheap "
        "same-vocabulary draft or amateur (self-speculative decoding, LayerSkip, Elhoushi et al. 2024).",
    )
    max_sessions: int = Field(64, ge=1, description="Live decode sessions kept; the least recently used is evicted.")
    session_ttl_s: float = Field(600.0, gt=0, description="Seconds an idle session lives before eviction.")
    max_batch_size: int = Field(32, ge=1, description="Most prompts per forward pass in generate/loglikelihood.")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not DEVICE_RE.match(v):
            raise ValueError(f"device {v!r} is not one of cpu, cuda, cuda:N, auto")
        return v

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("model source is empty")
        return v

    @property
    def display_name(self) -> str:
        return self.name or self.source
