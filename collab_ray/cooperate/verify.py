"""`verify`: strengthening correct knowledge with a verifier — the LLM's top-m next tokens are
rescored by how well a verifier model explains the context from the continuation (a noisy-channel
reranker; Shen et al. 2024, "Learning to Decode Collaboratively with Multiple Language Models";
the survey's "strengthening correct knowledge", §Cooperation)."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from collab_ray.cooperate.lockstep import run_lockstep
from collab_ray.core.backend import ModelBackend
from collab_ray.core.decoding import check_shared_vocabulary
from collab_ray.core.strategy import Emit, Request, Strategy, StrategyResult, register


def verifier_scores(llm: torch.Tensor, candidates: torch.Tensor, verifier: torch.Tensor, lam: float) -> torch.Tensor:
    """log P_LLM(c) + λ·log P_VER(x | y<i, c) for each candidate c, −inf for every other token.

    llm: [V] log-probs; candidates: [m] token ids; verifier: [m] log P_VER(context | continuation) -> [V].
    """
    scores = torch.full_like(llm, float("-inf"))
    scores[candidates] = llm[candidates] + lam * verifier
    return scores


class VerifyParams(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    candidates: int = Field(5, ge=1, le=100, description="How many of the LLM's most likely next tokens the verifier rescores.")
    lam: float = Field(1.0, ge=0.0, le=100.0, description="Weight λ of the verifier's log-likelihood of the context.")


@register
class Verify(Strategy):
    name = "verify"
    roles = ("llm", "verifier")
    Params = VerifyParams

    async def run(self, models: dict[str, ModelBackend], request: Request, emit: Emit | None = None) -> StrategyResult:
        m, lam = self.params.candidates, self.params.lam
        verifier = models["verifier"]
        await check_shared_vocabulary(models)
        bos = (await verifier.info()).bos_token_id
        reranked = 0

        async def score(rows, prompt, generated):
            nonlocal reranked
            llm = rows[0]
            top = torch.topk(llm, min(m, llm.shape[-1])).indices  # [m]
            context = prompt[1:] if bos is not None and prompt[:1] == [bos] else prompt
            start = [] if bos is None else [bos]
            results = await verifier.loglikelihood([(start + generated + [c], context) for c in top.tolist()])
            scores = verifier_scores(llm, top, torch.tensor([r.logprob for r in results]), lam)
            reranked += int(scores.argmax() != top[0])
            return scores

        result = await run_lockstep({"llm": models["llm"]}, request, emit, score, {"candidates": m, "lam": lam})
        result.meta["reranked_steps"] = reranked
        return result
