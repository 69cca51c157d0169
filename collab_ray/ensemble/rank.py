"""`rank`: best-of-N. Every generator model proposes candidates; judge models score them by mean
token log-prob, by a yes/no verdict's log-likelihood, or pairwise (PairRanker, Jiang et al. 2023);
or a learned scorer predicts each candidate's P(correct) from the generators' own log-probs,
lengths and agreement (`scorer: learned`, `collab_ray.ensemble.scorer`; no judge call).

A candidate that only repeats the question (a base model's echo scores a high log-prob: every
token of it is in the prompt) or is empty is never picked while another candidate answers.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from collab_ray.core.decoding import user_text
from collab_ray.core.errors import ConfigError
from collab_ray.core.strategy import (
    Emit,
    Request,
    Strategy,
    StrategyResult,
    register,
    render_prompt,
)
from collab_ray.core.types import LoglikelihoodResult
from collab_ray.ensemble.common import pick, repeats_question, respond, sample_models
from collab_ray.ensemble.scorer import Scorer
from collab_ray.eval.choice import ChoiceDecision, model_choice

YES_NO = "Question: {question}\nProposed answer: {answer}\nIs the proposed answer correct? Answer yes or no.\nAnswer:"
PAIRWISE = "Question: {question}\nResponse A: {a}\nResponse B: {b}\nWhich response is better? Answer A or B.\nAnswer:"


def mean_logprob(r: LoglikelihoodResult) -> float:
    """(1/T) Σ_t log p(y_t | x, y_<t): the judge's per-token log-likelihood of a candidate."""
    return r.logprob / max(1, r.num_tokens)


def pairwise_scores(margins: list[list[float]]) -> list[float]:
    """margins[i][j] = judge's log P(i better) − log P(j better) with i shown first; score_i = Σ_j (m_ij − m_ji)/2.

    Averaging both presentation orders cancels the judge's position bias.
    """
    n = len(margins)
    return [sum((margins[i][j] - margins[j][i]) / 2 for j in range(n) if j != i) for i in range(n)]


@dataclass
class RankDecision:
    index: int  # the best candidate
    scores: list[float]


def best_of(scores: list[float]) -> RankDecision:
    """argmax_i score_i (first on ties)."""
    return RankDecision(max(range(len(scores)), key=lambda i: (scores[i], -i)), list(scores))


class RankParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    samples: int = Field(1, ge=1, le=64, description="Candidates drawn from each generator model.")
    temperature: float | None = Field(None, ge=0.0, le=100.0, description="Candidate sampling temperature; default the request's.")
    scorer: Literal["logprob", "yes_no", "pairwise", "learned"] = Field(
        "logprob",
        description="Mean candidate log-prob under the judges, a judge's yes/no verdict, pairwise A/B, or `learned`: "
        "the P(correct) of the scorer in `scorer_file` (generation only).",
    )
    scorer_file: str | None = Field(
        None,
        description="Learned scorer (.npz, `collab_ray.ensemble.scorer`; relative to the YAML), with scorer 'learned'.",
        json_schema_extra={"file": True},
    )
    fallback: bool = Field(
        False,
        description="With scorer 'learned': answer with the scorer's `meta.fallback_model` alone, when it has one (the "
        "best single model, recorded when the learned choice was not significantly better in cross-validation).",
    )
    generators: list[str] | None = Field(None, description="Models that propose candidates; default all.")
    judges: list[str] | None = Field(None, description="Models that score candidates (scores averaged); default all.")

    @model_validator(mode="after")
    def _learned(self):
        if (self.scorer == "learned") != (self.scorer_file is not None):
            raise ValueError(f"scorer {self.scorer!r} with scorer_file {self.scorer_file!r}: scorer_file goes with scorer 'learned'")
        return self


async def judge_scores(judge, request: Request, texts: list[str], scorer: str) -> list[float]:
    """One judge's score of each candidate text (higher is better), in one batched call."""
    q = user_text(request)
    if scorer == "logprob":
        prompt = await render_prompt(judge, request)
        filled = [i for i, t in enumerate(texts) if t]  # an empty candidate has no tokens to score
        rs = await judge.loglikelihood([(prompt, texts[i]) for i in filled]) if filled else []
        scores = [float("-inf")] * len(texts)
        for i, r in zip(filled, rs):
            scores[i] = mean_logprob(r)
        return scores
    if scorer == "yes_no":
        ctxs = [YES_NO.format(question=q, answer=t.strip()) for t in texts]
        rs = await judge.loglikelihood([(c, a) for c in ctxs for a in (" yes", " no")])
        return [rs[2 * i].logprob - rs[2 * i + 1].logprob for i in range(len(texts))]
    n = len(texts)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    ctxs = [PAIRWISE.format(question=q, a=texts[i].strip(), b=texts[j].strip()) for i, j in pairs]
    rs = await judge.loglikelihood([(c, a) for c in ctxs for a in (" A", " B")])
    margins = [[0.0] * n for _ in range(n)]
    for k, (i, j) in enumerate(pairs):
        margins[i][j] = rs[2 * k].logprob - rs[2 * k + 1].logprob
    return pairwise_scores(margins)


@register
class Rank(Strategy):
    name = "rank"
    min_models = 1
    Params = RankParams

    def __init__(self, params=None):
        super().__init__(params)
        self.scorer = Scorer.load(self.params.scorer_file) if self.params.scorer_file else None

    @property
    def choice_refusal(self) -> str | None:
        """Why these parameters cannot answer multiple-choice items (None: they can); checked before any model runs."""
        if self.scorer is not None:
            return "rank with scorer 'learned' scores generated answers; it cannot answer multiple-choice items"
        return None

    async def choose(self, models, context: str, choices: list[str]) -> ChoiceDecision:
        """Multiple choice: the generators' acc_norm picks are the candidates; the judges score them."""
        p = self.params
        if self.choice_refusal:
            raise ConfigError(self.choice_refusal)
        generators = pick(models, p.generators, "rank generators")
        judges = pick(models, p.judges, "rank judges")
        picks = await asyncio.gather(*(model_choice(models[g], context, choices) for g in generators))
        candidates = list(dict.fromkeys(d.index for d in picks))
        texts = [" " + choices[c] for c in candidates]
        per_judge = await asyncio.gather(*(judge_scores(models[j], Request(prompt=context), texts, p.scorer) for j in judges))
        decision = best_of([sum(col) / len(judges) for col in zip(*per_judge)])
        return ChoiceDecision(candidates[decision.index], {"candidates": candidates, "scores": decision.scores})

    async def run(self, models, request: Request, emit: Emit | None = None) -> StrategyResult:
        p = self.params
        generators = pick(models, p.generators, "rank generators")
        fallback = self.scorer.meta.get("fallback_model") if self.scorer is not None and p.fallback else None
        if fallback is not None:
            generators = pick(models, [fallback], "rank scorer's fallback model")
        gens = await sample_models(models, generators, request, p.samples, p.temperature)
        flat = [(name, g) for name, gs in gens.items() for g in gs]
        texts = [g.text for _, g in flat]
        if self.scorer is not None:  # P(correct) of each candidate against all the others
            others = [[j for j in range(len(flat)) if j != i] for i in range(len(flat))]
            scores = self.scorer.score(user_text(request), [n for n, _ in flat], [g.logprobs for _, g in flat], texts, others).tolist()
        else:
            judges = pick(models, p.judges, "rank judges")
            per_judge = await asyncio.gather(*(judge_scores(models[j], request, texts, p.scorer) for j in judges))
            scores = [sum(col) / len(judges) for col in zip(*per_judge)]
        q = user_text(request)
        echo = [repeats_question(t, q) for t in texts]
        eligible = [s if not e or all(echo) else float("-inf") for s, e in zip(scores, echo)]
        decision = best_of(eligible)
        name, chosen = flat[decision.index]
        collab = {
            "scorer": p.scorer,
            "fallback_model": fallback,
            "chosen": decision.index,
            "candidates": [{"model": n, "score": s, "repeats_question": e} for (n, _), s, e in zip(flat, scores, echo)],
        }
        return await respond(chosen, name, collab, emit)
