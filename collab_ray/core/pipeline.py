"""A pipeline: one strategy over named models. Runs anywhere a `ModelBackend` does (no Ray)."""

from __future__ import annotations

import time

from collab_ray.core.backend import ModelBackend
from collab_ray.core.metering import MeteredBackend
from collab_ray.core.strategy import Emit, Request, Strategy, StrategyResult, get_strategy, with_turn_stops


class Pipeline:
    def __init__(self, strategy: Strategy | str, models: dict[str, ModelBackend], params: dict | None = None):
        if isinstance(strategy, str):
            strategy = get_strategy(strategy)(params)
        type(strategy).check_models(list(models) if type(strategy).roles is None else dict(zip(models, models)))
        self.strategy = strategy
        self.models = models

    async def run(self, request: Request, emit: Emit | None = None) -> StrategyResult:
        """Run the strategy; `meta["models"]` gets per-model calls, tokens and latency of this request.

        A chat request to a pipeline with a base model stops where that model would start the next turn."""
        request = await with_turn_stops(self.models, request)
        metered = {role: MeteredBackend(b) for role, b in self.models.items()}
        start = time.perf_counter()
        result = await self.strategy.run(metered, request, emit)
        result.meta["strategy"] = self.strategy.name
        result.meta["latency_s"] = time.perf_counter() - start
        result.meta["models"] = {role: m.stats.as_dict() for role, m in metered.items()}
        return result
