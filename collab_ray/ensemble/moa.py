"""`moa`: Mixture-of-Agents (Wang et al. 2024). Proposer models answer in parallel; in each further
layer every proposer sees the previous layer's answers; an aggregator writes the final answer."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from collab_ray.core.decoding import user_text
from collab_ray.core.strategy import Emit, Request, Strategy, StrategyResult, register
from collab_ray.ensemble.common import pick, respond, sample_models

AGGREGATE = (
    "You have been given responses from several models to the question below. Synthesize them into one "
    "accurate, concise answer; do not simply copy one.\n\nQuestion: {question}\n\n{responses}\n\nAnswer:"
)


def aggregate_prompt(q: str, answers: list[str], template: str = AGGREGATE) -> str:
    """The aggregation prompt: the question and the numbered responses of the previous layer."""
    responses = "\n".join(f"Response {i + 1}: {a.strip()}" for i, a in enumerate(answers))
    return template.format(question=q, responses=responses)


class MoaParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    proposers: list[str] | None = Field(None, description="Models answering in every layer; default all but the aggregator.")
    aggregator: str | None = Field(None, description="Model writing the final answer; default the last model.")
    layers: int = Field(1, ge=1, le=8, description="Proposer layers; layers after the first see the previous answers.")
    template: str = Field(AGGREGATE, description="Aggregation prompt with {question} and {responses} placeholders.")


@register
class Moa(Strategy):
    name = "moa"
    min_models = 2
    Params = MoaParams

    async def run(self, models, request: Request, emit: Emit | None = None) -> StrategyResult:
        p = self.params
        aggregator = pick(models, [p.aggregator or list(models)[-1]], "moa aggregator")[0]
        proposers = pick(models, p.proposers or [n for n in models if n != aggregator], "moa proposers")
        q = user_text(request)
        current, answers = request, []
        for _ in range(p.layers):
            gens = await sample_models(models, proposers, current, 1, None)
            answers = [gs[0].text for gs in gens.values()]
            current = Request(messages=[{"role": "user", "content": aggregate_prompt(q, answers, p.template)}], params=request.params)
        (final,) = (await sample_models(models, [aggregator], current, 1, None))[aggregator]
        collab = {"layers": p.layers, "proposers": proposers, "aggregator": aggregator, "proposals": answers}
        return await respond(final, aggregator, collab, emit)
