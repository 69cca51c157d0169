"""`single`: one model answers (every model is also a pipeline of this strategy).

Without streaming it is one batched `generate` call. Streaming decodes through a session in chunks
of `stream_chunk` drafted tokens, emitting text as soon as it can no longer change; greedy output
is the same either way (sampled output draws from the session's own seeded generator).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from collab_ray.core.decoding import answer, open_sessions, output_for
from collab_ray.core.strategy import Emit, Request, Strategy, StrategyResult, register, render_prompt


class SingleParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stream_chunk: int = Field(4, ge=1, le=64, description="Tokens decoded per call while streaming.")


@register
class Single(Strategy):
    name = "single"
    max_models = 1
    Params = SingleParams

    async def run(self, models, request: Request, emit: Emit | None = None) -> StrategyResult:
        ((model_name, backend),) = models.items()
        prompt = await render_prompt(backend, request)
        meta = {"output_model": model_name}
        if emit is None:
            (gen,) = await backend.generate([prompt], request.params)
            return await answer(gen, None, meta)
        ids = await backend.encode(prompt)
        output = await output_for(backend, request, len(ids), emit)
        async with open_sessions([(backend, ids)]) as (session,):
            while not await output.extend((await session.propose(self.params.stream_chunk, request.params, top_k=1)).tokens):
                pass
        return output.result(len(ids), meta)
