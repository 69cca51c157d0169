"""`contrastive`: an expert and an amateur decode together; the expert's tokens that the amateur
also finds likely are penalised (Li et al. 2023, "Contrastive Decoding: Open-ended Text
Generation as Optimization"; the β form of O'Brien & Lewis 2023)."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from collab_ray.cooperate.lockstep import run_lockstep
from collab_ray.core.backend import ModelBackend
from collab_ray.core.sampling import plausible
from collab_ray.core.strategy import Emit, Request, Strategy, StrategyResult, register


def contrastive_scores(expert: torch.Tensor, amateur: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """(1+β)·log p_E − β·log p_A over the plausible set {y : p_E(y) ≥ α·max p_E}, −inf elsewhere.

    expert, amateur: [V] log-probs -> [V] scores.
    """
    return ((1 + beta) * expert - beta * amateur).masked_fill(~plausible(expert, alpha), float("-inf"))


class ContrastiveParams(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    alpha: float = Field(0.1, gt=0.0, le=1.0, description="Plausibility cut: keep tokens with p_expert ≥ alpha · max p_expert.")
    beta: float = Field(0.5, ge=0.0, le=100.0, description="Strength of the amateur penalty; 0 decodes with the expert alone.")


@register
class Contrastive(Strategy):
    name = "contrastive"
    roles = ("expert", "amateur")
    Params = ContrastiveParams

    async def run(self, models: dict[str, ModelBackend], request: Request, emit: Emit | None = None) -> StrategyResult:
        alpha, beta = self.params.alpha, self.params.beta

        async def score(rows, prompt, generated):
            return contrastive_scores(rows[0], rows[1], alpha, beta)

        stepped = {"expert": models["expert"], "amateur": models["amateur"]}
        return await run_lockstep(stepped, request, emit, score, {"alpha": alpha, "beta": beta})
