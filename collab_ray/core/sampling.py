"""Sampling parameters and the logits processing, as small pure functions over [..., V] tensors."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_LOGIT_BIAS_ENTRIES = 300  # OpenAI's bound on `logit_bias`


class SamplingParams(BaseModel):
    """How to turn next-token logits into tokens (OpenAI semantics)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    max_tokens: int = Field(16, ge=1, le=1_000_000, description="Most tokens to generate.")
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="Softmax temperature; 0 means greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling: smallest set with this probability mass.")
    top_k: int = Field(0, ge=0, description="Keep only the k most likely tokens; 0 keeps all.")
    stop: tuple[str, ...] = Field((), description="Strings that end generation; not included in the text.")
    seed: int | None = Field(None, ge=0, description="Seed for reproducible sampling.")
    logprobs: int | None = Field(None, ge=0, le=20, description="Return this many top alternatives per token.")
    ignore_eos: bool = Field(False, description="Keep generating past end-of-sequence tokens.")
    frequency_penalty: float = Field(
        0.0, ge=-2.0, le=2.0,
        description="OpenAI: subtract this × (times the token already occurs in the output) from its logit; 0 = off.",
    )  # fmt: skip
    presence_penalty: float = Field(
        0.0, ge=-2.0, le=2.0,
        description="OpenAI: subtract this from the logit of every token that already occurs in the output; 0 = off.",
    )  # fmt: skip
    repetition_penalty: float = Field(
        1.0, gt=0.0, le=10.0,
        description="vLLM/CTRL: divide positive logits (multiply negative ones) of tokens seen in the prompt or "
        "output by this; 1 = off, > 1 discourages repeats.",
    )  # fmt: skip
    logit_bias: tuple[tuple[int, float], ...] = Field(
        (),
        description="OpenAI: (token id, bias) pairs added to those tokens' logits before sampling; a bias in "
        "[-100, 100], at most 300 entries (a {token id: bias} mapping is accepted).",
    )
    min_tokens: int = Field(
        0, ge=0, le=1_000_000,
        description="vLLM: end-of-sequence tokens are masked until this many tokens are generated; 0 = off.",
    )  # fmt: skip

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v):
        if v is None:
            return ()
        if isinstance(v, str):
            v = (v,)
        for s in v:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        return tuple(v)

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _bias_pairs(cls, v):
        if v is None:
            return ()
        items = list(v.items()) if isinstance(v, dict) else list(v)
        if len(items) > MAX_LOGIT_BIAS_ENTRIES:
            raise ValueError(f"logit_bias has {len(items)} entries; at most {MAX_LOGIT_BIAS_ENTRIES} are allowed")
        pairs = {}
        for item in items:
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise ValueError(f"logit_bias entries are (token id, bias) pairs, got {str(item)[:40]!r}")
            token, bias = item
            if isinstance(token, str) and token.strip().lstrip("-").isdigit():
                token = int(token)
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise ValueError(f"logit_bias keys are token ids (integers >= 0), got {str(token)[:40]!r}")
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
                raise ValueError(f"logit_bias[{token}] must be a number in [-100, 100], got {str(bias)[:40]!r}")
            pairs[token] = float(bias)
        return tuple(sorted(pairs.items()))

    @model_validator(mode="after")
    def _min_within_max(self):
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens {self.min_tokens} exceeds max_tokens {self.max_tokens}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        """Whether a frequency, presence or repetition penalty is set (they need the token history)."""
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def needs_history(self) -> bool:
        """Whether `process_logits` must see this request's prompt/output tokens (or EOS ids):
        any penalty, `min_tokens` or `logit_bias` is set."""
        return self.has_penalties or self.min_tokens > 0 or bool(self.logit_bias)


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] logits -> [..., V] float32 log-probs."""
    return torch.log_softmax(logits.float(), dim=-1)


def plausible(logprobs: torch.Tensor, tau: float) -> torch.Tensor:
    """[..., V] log-probs -> [..., V] bool: p ≥ τ · max p, the adaptive plausibility constraint of
    contrastive decoding (Li et al. 2023)."""
    return logprobs >= logprobs.max(dim=-1, keepdim=True).values + math.log(tau)


def top_k_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set everything below the k-th largest logit to -inf. [..., V] -> [..., V]."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_mask(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter (Holtzman et al. 2020): keep the smallest set of tokens with mass ≥ p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly more likely tokens
    drop_sorted = mass_before >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


History = Sequence[int] | Sequence[Sequence[int]]  # one row's token ids, or one list per row of [B, V]


def _per_row(ids: History | None, logits: torch.Tensor, what: str) -> list[Sequence[int]]:
    """`ids` as one token-id sequence per row of `logits` ([V]: one sequence; [B, V]: B of them)."""
    if ids is None:
        ids = [] if logits.dim() == 1 else [[] for _ in range(logits.shape[0])]
    if logits.dim() == 1:
        return [ids]
    if logits.dim() != 2 or len(ids) != logits.shape[0]:
        raise ValueError(f"{what}: need one token list per row of logits {tuple(logits.shape)}, got {len(ids)}")
    return list(ids)


def _counts(rows: list[Sequence[int]], vocab: int, device) -> torch.Tensor:
    """[R, V] how often each token id occurs in each row (ids outside [0, V) are ignored)."""
    out = torch.zeros(len(rows), vocab, device=device)
    for r, ids in enumerate(rows):
        t = torch.as_tensor(list(ids), dtype=torch.long, device=device)
        t = t[(t >= 0) & (t < vocab)]
        if t.numel():
            out[r] = torch.bincount(t, minlength=vocab)[:vocab].to(out.dtype)
    return out


def apply_penalties(
    logits: torch.Tensor, params: SamplingParams, prompt_ids: History | None, output_ids: History | None
) -> torch.Tensor:
    """Repetition, frequency and presence penalties over [V] or [B, V] logits (a new tensor).

    vLLM's semantics: the repetition penalty applies to tokens seen in the prompt or the output
    (logit / p when positive, logit · p when negative); the frequency penalty subtracts
    `frequency_penalty · count` and the presence penalty `presence_penalty` for tokens seen in the
    output only (OpenAI's definition). With no penalty set the logits come back unchanged.
    """
    if not params.has_penalties:
        return logits
    out = logits.float().clone()
    squeeze = out.dim() == 1
    rows = out.unsqueeze(0) if squeeze else out
    vocab = rows.shape[-1]
    output = _counts(_per_row(output_ids, logits, "output_ids"), vocab, rows.device)
    if params.repetition_penalty != 1.0:
        prompt = _counts(_per_row(prompt_ids, logits, "prompt_ids"), vocab, rows.device)
        seen = (prompt + output) > 0
        p = params.repetition_penalty
        rows = torch.where(seen, torch.where(rows > 0, rows / p, rows * p), rows)
    if params.frequency_penalty != 0.0:
        rows = rows - params.frequency_penalty * output
    if params.presence_penalty != 0.0:
        rows = rows - params.presence_penalty * (output > 0).to(rows.dtype)
    return rows.squeeze(0) if squeeze else rows


def apply_logit_bias(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Add `params.logit_bias` to the logits of its token ids ([..., V]); ids beyond V are refused."""
    if not params.logit_bias:
        return logits
    ids = torch.tensor([t for t, _ in params.logit_bias], dtype=torch.long, device=logits.device)
    if int(ids.max()) >= logits.shape[-1]:
        raise ValueError(f"logit_bias token id {int(ids.max())} is outside the vocabulary of {logits.shape[-1]} tokens")
    bias = torch.zeros(logits.shape[-1], device=logits.device)
    bias[ids] = torch.tensor([b for _, b in params.logit_bias], device=logits.device)
    return logits.float() + bias


def min_tokens_mask(
    logits: torch.Tensor, params: SamplingParams, n_generated: int | Sequence[int], eos_ids: Sequence[int]
) -> torch.Tensor:
    """Mask end-of-sequence ids (-inf) in rows that have generated fewer than `params.min_tokens` tokens.

    `n_generated` is one count, or one per row of [B, V] logits.
    """
    if params.min_tokens <= 0 or not eos_ids:
        return logits
    eos = torch.tensor([e for e in eos_ids if 0 <= e < logits.shape[-1]], dtype=torch.long, device=logits.device)
    if logits.dim() == 1:
        if n_generated >= params.min_tokens:
            return logits
        return logits.index_fill(-1, eos, float("-inf"))
    counts = [n_generated] * logits.shape[0] if isinstance(n_generated, int) else list(n_generated)
    short = torch.tensor([n < params.min_tokens for n in counts], device=logits.device)
    if not bool(short.any()):
        return logits
    masked = logits.index_fill(-1, eos, float("-inf"))
    return torch.where(short.unsqueeze(-1), masked, logits)


def process_logits(
    logits: torch.Tensor,
    params: SamplingParams,
    *,
    prompt_ids: History | None = None,
    output_ids: History | None = None,
    eos_ids: Sequence[int] = (),
) -> torch.Tensor:
    """[V] or [B, V] logits -> log-probs of the distribution tokens are sampled from.

    In order: `logit_bias`, the `min_tokens` EOS mask, the penalties, then temperature, top-k and
    top-p. Greedy returns the log-probs of the adjusted logits (the token is their argmax; without
    extras, the model's own log-probs). `prompt_ids`/`output_ids` are the request's tokens (one
    list per row of [B, V]); a request with penalties or `min_tokens` must pass `output_ids`
    (and `prompt_ids` for the repetition penalty), so none of them is ever skipped silently.
    """
    if params.needs_history:
        if (params.has_penalties or params.min_tokens > 0) and output_ids is None:
            raise ValueError("these sampling params set penalties or min_tokens: pass output_ids to process_logits")
        if params.repetition_penalty != 1.0 and prompt_ids is None:
            raise ValueError("repetition_penalty needs the prompt's tokens: pass prompt_ids to process_logits")
        logits = apply_logit_bias(logits, params)
        if params.min_tokens > 0 and not params.ignore_eos:
            if not eos_ids:
                raise ValueError("min_tokens needs the model's end-of-sequence ids: pass eos_ids to process_logits")
            rows = _per_row(output_ids, logits, "output_ids")
            n = len(rows[0]) if logits.dim() == 1 else [len(r) for r in rows]
            logits = min_tokens_mask(logits, params, n, eos_ids)
        logits = apply_penalties(logits, params, prompt_ids, output_ids)
    if params.greedy:
        return log_softmax(logits)
    logits = logits.float() / params.temperature
    logits = top_k_mask(logits, params.top_k)
    logits = top_p_mask(logits, params.top_p)
    return log_softmax(logits)


def sample(logprobs: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Draw one token from [V] processed log-probs (argmax when greedy)."""
    if params.greedy:
        return int(torch.argmax(logprobs))
    probs = torch.exp(logprobs)
    return int(torch.multinomial(probs, 1, generator=generator))


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A seeded generator, or None to use torch's global RNG."""
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g
