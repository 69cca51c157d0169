"""`proxy`: proxy-tuning / DExperts — steer a base model with the difference between a (small)
tuned expert and its untuned anti-expert, at every decoding step (Liu et al. 2024, "Tuning
Language Models by Proxy"; Liu et al. 2021, "DExperts")."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from collab_ray.cooperate.lockstep import run_lockstep
from collab_ray.core.backend import ModelBackend
from collab_ray.core.strategy import Emit, Request, Strategy, StrategyResult, register


def proxy_scores(base: torch.Tensor, expert: torch.Tensor, antiexpert: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = log p_base + α·(log p_expert − log p_antiexpert); [V] log-probs each -> [V] scores."""
    return base + alpha * (expert - antiexpert)


class ProxyParams(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    alpha: float = Field(1.0, ge=0.0, le=100.0, description="Weight of the expert − anti-expert offset; 0 decodes with the base alone.")


@register
class Proxy(Strategy):
    name = "proxy"
    roles = ("base", "expert", "antiexpert")
    Params = ProxyParams

    async def run(self, models: dict[str, ModelBackend], request: Request, emit: Emit | None = None) -> StrategyResult:
        alpha = self.params.alpha

        async def score(rows, prompt, generated):
            return proxy_scores(rows[0], rows[1], rows[2], alpha)

        stepped = {role: models[role] for role in self.roles}
        return await run_lockstep(stepped, request, emit, score, {"alpha": alpha})
