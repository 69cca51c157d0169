"""Request/result types that cross the `ModelBackend` seam (and Ray's object store).

Plain dataclasses over numpy arrays: cheap to pickle, no torch tensors on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Union

import numpy as np


@dataclass
class TopK:
    """The k most likely tokens of one or more positions, most likely first."""

    ids: np.ndarray  # [..., k] int64
    logprobs: np.ndarray  # [..., k] float32


# Log-probs of the next token: full vocabulary [V] / [n, V] float32, or TopK when asked.
LogProbs = Union[np.ndarray, TopK]


@dataclass(frozen=True)
class ModelInfo:
    """What a strategy needs to know about a model before it uses it."""

    name: str
    vocab_size: int  # width of every log-prob row (the output layer, may exceed the tokenizer)
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    pad_token_id: int | None
    special_token_ids: tuple[int, ...]
    has_chat_template: bool
    max_context: int | None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
        )


@dataclass
class Generation:
    """One completion of one prompt."""

    text: str
    token_ids: list[int]
    logprobs: list[float]  # log-prob of each generated token under the model (before sampling transforms)
    finish_reason: Literal["stop", "length"]
    usage: Usage
    top_logprobs: TopK | None = None  # [n, k] alternatives per generated token, when asked


@dataclass
class LoglikelihoodResult:
    """log P(continuation | context), summed over the continuation's tokens."""

    logprob: float
    num_tokens: int
    is_greedy: bool  # every continuation token is the argmax at its position


@dataclass
class SessionStart:
    """A new decode session and the log-probs of the token that follows its prompt."""

    session_id: str
    length: int  # tokens in the session
    logprobs: LogProbs  # [V] (or TopK of [k])


@dataclass
class Proposal:
    """k tokens drafted in one call, with the distribution each was drawn from."""

    tokens: list[int]  # [k]
    logprobs: LogProbs  # [k, V] sampling distribution q of each token (after temperature/top-k/top-p)
