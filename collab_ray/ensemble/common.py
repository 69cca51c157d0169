"""Helpers shared by the ensemble strategies: pick models, sample them all, respond, fit a logistic regression."""

from __future__ import annotations

import asyncio
import re

import numpy as np

from collab_ray.core.backend import ModelBackend
from collab_ray.core.decoding import answer
from collab_ray.core.errors import ConfigError
from collab_ray.core.strategy import Emit, Request, StrategyResult, render_prompt
from collab_ray.core.types import Generation


def repeats_question(answer: str, question: str) -> bool:
    """Whether `answer` only repeats the question (base models often echo it) or says nothing.

    After lower-casing and dropping punctuation: no word that the question lacks, and at least half of
    the question's words (so a short answer that reuses a word of the question, "blue", is an answer).
    """
    words = re.findall(r"\w+", answer.lower())
    asked = re.findall(r"\w+", question.lower())
    if not words:
        return True
    return set(words) <= set(asked) and len(words) >= max(1, len(set(asked)) // 2)


def pick(models: dict[str, ModelBackend], names: list[str] | None, what: str) -> list[str]:
    """The model names a parameter selects (all models when None); errors name the unknown one."""
    if names is None:
        return list(models)
    for n in names:
        if n not in models:
            raise ConfigError(f"{what}: {n!r} is not one of the models {list(models)}")
    return list(names)


async def sample_models(
    models: dict[str, ModelBackend], names: list[str], request: Request, n: int, temperature: float | None
) -> dict[str, list[Generation]]:
    """n completions of the request from each named model, all models concurrently (batched per model)."""
    params = request.params if temperature is None else request.params.model_copy(update={"temperature": temperature})

    async def one(name: str) -> list[Generation]:
        prompt = await render_prompt(models[name], request)
        return await models[name].generate([prompt] * n, params)

    gens = await asyncio.gather(*(one(name) for name in names))
    return dict(zip(names, gens))


async def respond(g: Generation, model: str, collab: dict, emit: Emit | None) -> StrategyResult:
    """The chosen generation as the response (streamed in one piece), with what the strategy decided.

    Its usage is the chosen answer's (so `completion_tokens` never exceeds the request's `max_tokens`);
    what every model generated on the way, candidates and stages included, is counted per model in the
    response's `models` metadata.
    """
    return await answer(g, emit, {"output_model": model, "collab": collab})


def fit_logistic(x, y: np.ndarray, c: float, w: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """x [N, F] (dense or sparse), y [N] bool, sample weights w [N] -> (coef [F], bias): an L2 logistic
    regression (scikit-learn, lbfgs, C = c); a constant y gives zero weights and its clipped log-odds."""
    from sklearn.linear_model import LogisticRegression

    if y.all() or not y.any():
        rate = np.clip(y.mean(), 1e-3, 1 - 1e-3)
        return np.zeros(x.shape[1]), float(np.log(rate / (1 - rate)))
    clf = LogisticRegression(C=c, max_iter=2000).fit(x, y, sample_weight=w)
    return clf.coef_[0], float(clf.intercept_[0])
