"""`proxy`: proxy-tuning / DExperts — steer a base model with the difference between a (small)
tuned expert and its untuned anti-expert, at every decoding step (Liu et al. 2024, "Tuning
Language Models by Proxy"; Liu et al. 2021, "DExperts"). Optionally only over the tokens the base
finds plausible (p_base ≥ τ·max p_base), which stops an offset from a poorly matched expert pair
from promoting tokens the base would never write."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from collab_ray.cooperate.lockstep import run_lockstep
from collab_ray.core.backend import ModelBackend
from collab_ray.core.sampling import plausible
from collab_ray.core.strategy import Emit, Request, Strategy, StrategyResult, register


def proxy_scores(
    base: torch.Tensor, expert: torch.Tensor, antiexpert: torch.Tensor, alpha: float, plausibility: float = 0.0
) -> torch.Tensor:
    """s = log p_base + α·(log p_expert − log p_antiexpert); [V] log-probs each -> [V] scores,
    −inf outside {y : p_base(y) ≥ plausibility · max p_base} when plausibility > 0."""
    s = base + alpha * (expert - antiexpert)
    return s.masked_fill(~plausible(base, plausibility), float("-inf")) if plausibility > 0 else s


class ProxyParams(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    alpha: float = Field(1.0, ge=0.0, le=100.0, description="Weight of the expert − anti-expert offset; 0 decodes with the base alone.")
    plausibility: float = Field(
        0.0, ge=0.0, le=1.0, description="Keep only tokens with p_base ≥ this · max p_base (0: off, as in the paper; 1: the base's argmax)."
    )


@register
class Proxy(Strategy):
    name = "proxy"
    roles = ("base", "expert", "antiexpert")
    Params = ProxyParams

    async def run(self, models: dict[str, ModelBackend], request: Request, emit: Emit | None = None) -> StrategyResult:
        p = self.params

        async def score(rows, prompt, generated):
            return proxy_scores(rows[0], rows[1], rows[2], p.alpha, p.plausibility)

        stepped = {role: models[role] for role in self.roles}
        return await run_lockstep(stepped, request, emit, score, {"alpha": p.alpha, "plausibility": p.plausibility})
