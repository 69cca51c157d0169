"""The `ModelBackend` protocol: the one seam every strategy is written against.

An in-process backend (`collab_ray.models.TransformersBackend`) and a Ray Serve handle backend
implement it, so a strategy runs unchanged on a laptop, a GPU box or across deployments.

Decode sessions keep the KV cache inside the backend; callers send only new token ids and get
next-token log-probs back. A session of length L holds L tokens; its "next-token log-probs" are
P(x_{L+1} | x_1..x_L).
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

from collab_ray.core.sampling import SamplingParams
from collab_ray.core.types import Generation, LoglikelihoodResult, LogProbs, ModelInfo, Proposal, SessionStart

Prompt = str | Sequence[int]  # text, or token ids used as they are


@runtime_checkable
class ModelBackend(Protocol):
    async def info(self) -> ModelInfo:
        """Name, vocabulary size, special ids, chat template presence."""

    async def token_strings(self) -> list[str]:
        """The raw string of every token id (index = id), for cross-vocabulary mapping."""

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    async def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    async def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render chat messages to the prompt text the model was trained on."""

    async def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[Generation]:
        """One completion per prompt, batched."""

    async def loglikelihood(self, requests: Sequence[tuple[Prompt, Prompt]]) -> list[LoglikelihoodResult]:
        """log P(continuation | context) for each (context, continuation) pair, batched."""

    async def open_session(
        self, prompt_ids: Sequence[int], *, session_id: str | None = None, top_k: int | None = None
    ) -> SessionStart:
        """Prefill `prompt_ids` into a new KV-cached session; returns its id and next-token log-probs."""

    async def append(
        self, session_id: str, token_ids: Sequence[int], *, all_positions: bool = False, top_k: int | None = None,
        keep: int | None = None,
    ) -> LogProbs:
        """Feed tokens into a session. Returns next-token log-probs after each of them ([n, V],
        all_positions=True, for verification) or after the last one only ([V]). With `keep`, the
        session is first rolled back to its first `keep` tokens (a rollback without a call of its own)."""

    async def propose(
        self, session_id: str, k: int, params: SamplingParams, *, top_k: int | None = None,
        keep: int | None = None, feed: Sequence[int] = (),
    ) -> Proposal:
        """Draft k tokens in one call (appended to the session) with the distribution of each.
        With `keep` and `feed`, the session is first rolled back to `keep` tokens and `feed` added
        (no log-probs returned for them): what a drafter does each round, in one call."""

    async def rollback(self, session_id: str, length: int) -> None:
        """Truncate the session to its first `length` tokens (1 ≤ length ≤ current length)."""

    async def close_session(self, session_id: str) -> None:
        """Free the session; closing an unknown session is a no-op."""
