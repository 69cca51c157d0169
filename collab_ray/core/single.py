"""`single`: one model answers (every model is also a pipeline of this strategy)."""

from __future__ import annotations

from collab_ray.core.strategy import Emit, Request, Strategy, StrategyResult, register, render_prompt


@register
class Single(Strategy):
    name = "single"
    max_models = 1

    async def run(self, models, request: Request, emit: Emit | None = None) -> StrategyResult:
        ((model_name, backend),) = models.items()
        prompt = await render_prompt(backend, request)
        (gen,) = await backend.generate([prompt], request.params)
        if emit is not None:
            await emit(gen.text)
        return StrategyResult(
            text=gen.text,
            finish_reason=gen.finish_reason,
            usage=gen.usage,
            token_ids=gen.token_ids,
            logprobs=gen.logprobs,
            meta={"output_model": model_name},
        )
