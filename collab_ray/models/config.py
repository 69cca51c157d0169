"""How to load one model: the pydantic config every loader and server takes."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

DECODE_MAX = 64  # feeds of at most this many tokens are decode work, never split across engine steps

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
    max_sessions: int = Field(
        1024, ge=1, description="Most live decode sessions per replica; past it the least recently used idle one is evicted."
    )
    session_ttl_s: float = Field(
        60.0, gt=0, description="Lease of a decode session: seconds it lives without a call before the engine frees it."
    )
    max_batch_size: int = Field(
        32, ge=1, description="Most sequences in one engine step (generation rows, scoring items and session work together)."
    )
    max_step_tokens: int | None = Field(
        None,
        ge=DECODE_MAX,
        description="Tokens one engine step may feed: decode work first, then chunks of long prompts. Smaller keeps "
        "decode latency steady beside long prompts, larger prefills faster. Default: 128 on CPU, 2048 on GPU.",
    )
    max_prefill_beside_decode: int | None = Field(
        None,
        ge=1,
        description="Prompt tokens a step may prefill while other requests are decoding: what one long prompt adds to "
        "every decoding request's step time. Default: 16 on CPU (a prompt token costs about a decode row), 512 on GPU.",
    )
    kv_budget_tokens: int | None = Field(
        None,
        ge=1,
        description="KV-cache tokens a replica may hold (sessions and running work). Default: 80% of the GPU memory "
        "free after loading, or a quarter of the available RAM on CPU. Work that does not fit waits, then gets a 503.",
    )
    max_queue: int = Field(1024, ge=0, description="Calls that may wait for KV memory; past it a call fails at once (503).")
    queue_timeout_s: float = Field(30.0, gt=0, description="Seconds a call may wait for KV memory before it fails (503).")
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="Longest prompt or session accepted, checked before any model work; default the model's context."
    )
    max_items_per_call: int = Field(4096, ge=1, description="Most prompts or scoring items in one generate/loglikelihood call.")

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
