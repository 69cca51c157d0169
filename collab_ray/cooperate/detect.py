"""`detect`: hallucination detection by agreement. Several models (and several samples of each)
answer; the answer that agrees most with the others is returned with its agreement as a score,
and flagged when the score is low (Manakul et al. 2023, "SelfCheckGPT"; Du et al. 2023, "Improving
Factuality and Reasoning through Multiagent Debate"). Optionally a checker model judges whether the
evidence supports the answer, and a retriever model ranks supplied passages by relevance and the
answer is grounded in the top ones (retrieval-augmented generation, Lewis et al. 2020).
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from collab_ray.core.backend import ModelBackend
from collab_ray.core.decoding import answer, user_text, with_user_text
from collab_ray.core.errors import ConfigError
from collab_ray.core.strategy import (
    Emit,
    Request,
    Strategy,
    StrategyResult,
    register,
    render_prompt,
)


def token_f1(a: str, b: str) -> float:
    """Unigram F1 of two answers after lower-casing and dropping punctuation (SQuAD's answer F1)."""
    ta, tb = re.findall(r"\w+", a.lower()), re.findall(r"\w+", b.lower())
    if not ta or not tb:
        return float(ta == tb)
    common = sum((Counter(ta) & Counter(tb)).values())
    return 0.0 if common == 0 else 2 * common / (len(ta) + len(tb))


def agreement(answers: list[str]) -> tuple[int, float]:
    """The medoid answer (highest mean F1 to the others) and that mean F1; one answer agrees fully."""
    n = len(answers)
    if n == 1:
        return 0, 1.0
    f1 = np.array([[token_f1(a, b) for b in answers] for a in answers])  # [n, n]
    mean = (f1.sum(1) - f1.diagonal()) / (n - 1)
    best = int(np.argmax(mean))
    return best, float(mean[best])


class DetectParams(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    samples: int = Field(3, ge=1, le=64, description="Answers sampled from each answering model.")
    temperature: float = Field(0.8, ge=0.0, le=100.0, description="Sampling temperature of the answers (other request settings apply).")
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="Flag the answer when its score is below this.")
    checker: str | None = Field(None, description="Name of a model (one of the pipeline's) that judges whether the evidence supports the answer.")
    retriever: str | None = Field(None, description="Name of a model that ranks `passages` by relevance to the question.")
    passages: list[str] = Field(default_factory=list, description="Evidence passages to retrieve from and ground the answer in.")
    top_passages: int = Field(2, ge=1, le=100, description="How many of the best-ranked passages ground the answer.")


@register
class Detect(Strategy):
    name = "detect"
    Params = DetectParams

    async def run(self, models: dict[str, ModelBackend], request: Request, emit: Emit | None = None) -> StrategyResult:
        p: DetectParams = self.params
        for field in ("checker", "retriever"):
            name = getattr(p, field)
            if name is not None and name not in models:
                raise ConfigError(f"detect.{field}: no model {name!r} in this pipeline (models: {list(models)})")
        question = user_text(request)
        chosen: list[int] = []
        if p.passages and p.retriever is not None:
            ranked = await models[p.retriever].loglikelihood([(f"{passage}\n\nQuestion:", f" {question}") for passage in p.passages])
            relevance = [r.logprob / r.num_tokens for r in ranked]
            chosen = sorted(range(len(p.passages)), key=lambda i: -relevance[i])[: p.top_passages]
        elif p.passages:
            chosen = list(range(min(p.top_passages, len(p.passages))))
        evidence = "\n".join(p.passages[i] for i in chosen)
        grounded = with_user_text(request, f"Context:\n{evidence}\n\n{question}") if evidence else request

        answerers = [n for n in models if n != p.checker] or list(models)
        params = request.params.model_copy(update={"temperature": p.temperature})

        async def answers(name):
            prompt = await render_prompt(models[name], grounded)
            return await models[name].generate([prompt] * p.samples, params)

        generations = await asyncio.gather(*(answers(n) for n in answerers))
        samples = [(n, g) for n, gens in zip(answerers, generations) for g in gens]
        best, agree = agreement([g.text for _, g in samples])
        name, best_gen = samples[best]
        score, support = agree, None
        if p.checker is not None:
            judge = f"{evidence}\n\nQuestion: {question}\nAnswer: {best_gen.text}\nIs the answer supported? Answer yes or no:"
            yes, no = await models[p.checker].loglikelihood([(judge, " yes"), (judge, " no")])
            support = float(1 / (1 + np.exp(no.logprob - yes.logprob)))  # P(yes) of the two
            score = (agree + support) / 2
        return await answer(
            best_gen,
            emit,
            {
                "output_model": name,
                "score": score,
                "flagged": score < p.threshold,
                "agreement": agree,
                "support": support,
                "samples": [{"model": n, "text": g.text} for n, g in samples],
                "passages": chosen,
            },
        )
