"""Score pipelines on a dataset: accuracy with a confidence interval, model calls, tokens, wall time.

Multiple-choice items are answered by log-likelihood (`single` pipelines: argmax acc_norm; ensemble
strategies through their `choose`); short-answer items by running the pipeline and exact match.
Pipelines over the same model objects share a cache of deterministic results (log-likelihoods,
greedy generations), so a model scores an item once while every pipeline is still charged the
calls and tokens it makes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from collab_ray.core.backend import ModelBackend
from collab_ray.core.errors import ConfigError
from collab_ray.core.metering import MeteredBackend, ModelStats
from collab_ray.core.pipeline import Pipeline
from collab_ray.core.sampling import SamplingParams
from collab_ray.core.strategy import Request
from collab_ray.eval.choice import choice_pairs, choice_probs, model_choice
from collab_ray.eval.datasets import Dataset, Item
from collab_ray.eval.metrics import Accuracy, accuracy, exact_match

SHORT_ANSWER = SamplingParams(max_tokens=16, temperature=0.0, stop=("\n",))  # greedy, one line


class CachedBackend:
    """A `ModelBackend` that remembers log-likelihoods and greedy generations of `inner`."""

    def __init__(self, inner: ModelBackend):
        self.inner = inner
        self._ll: dict = {}
        self._gen: dict = {}

    def __getattr__(self, name):  # every other call goes straight through
        return getattr(self.inner, name)

    async def loglikelihood(self, requests):
        keys = [(_key(c), _key(x)) for c, x in requests]
        todo = list(dict.fromkeys(k for k in keys if k not in self._ll))
        if todo:
            index = {k: i for i, k in enumerate(keys)}
            for k, r in zip(todo, await self.inner.loglikelihood([requests[index[k]] for k in todo])):
                self._ll[k] = r
        return [self._ll[k] for k in keys]

    async def generate(self, prompts, params):
        if not params.greedy:
            return await self.inner.generate(prompts, params)
        keys = [(_key(p), params) for p in prompts]
        todo = list(dict.fromkeys(k for k in keys if k not in self._gen))
        if todo:
            index = {k: i for i, k in enumerate(keys)}
            for k, g in zip(todo, await self.inner.generate([prompts[index[k]] for k in todo], params)):
                self._gen[k] = g
        return [self._gen[k] for k in keys]


def _key(prompt):
    return prompt if isinstance(prompt, str) else tuple(prompt)


def share_cache(pipelines: dict[str, Pipeline]) -> dict[str, Pipeline]:
    """The same pipelines over one `CachedBackend` per distinct model object."""
    cached: dict[int, CachedBackend] = {}
    out = {}
    for name, p in pipelines.items():
        models = {role: cached.setdefault(id(b), CachedBackend(b)) for role, b in p.models.items()}
        out[name] = Pipeline(p.strategy, models)
    return out


@dataclass
class PipelineScore:
    name: str
    correct: list[bool]
    accuracy: Accuracy
    calls: int
    tokens: int
    wall_s: float
    decisions: list[dict] = field(default_factory=list)  # per item: what the strategy decided

    def row(self) -> list:
        n = len(self.correct)
        return [self.name, str(self.accuracy), f"{self.calls / n:.2f}", f"{self.tokens / n:.0f}", f"{self.wall_s:.1f}"]


HEADER = ["pipeline", "accuracy [95% CI]", "model calls / item", "tokens / item", "wall s"]


def _add(stats: dict[str, ModelStats], metered: dict[str, MeteredBackend]) -> None:
    for role, m in metered.items():
        s = stats.setdefault(role, ModelStats())
        s.calls += m.stats.calls
        s.prompt_tokens += m.stats.prompt_tokens
        s.completion_tokens += m.stats.completion_tokens


async def choose_item(pipeline: Pipeline, item: Item, stats: dict[str, ModelStats]) -> tuple[int, dict]:
    """One multiple-choice answer of a pipeline, and its decision meta."""
    metered = {role: MeteredBackend(b) for role, b in pipeline.models.items()}
    strategy = pipeline.strategy
    if hasattr(strategy, "choose"):
        d = await strategy.choose(metered, item.prompt, item.choices)
    elif strategy.name == "single":
        (backend,) = metered.values()
        d = await model_choice(backend, item.prompt, item.choices)
    else:
        raise ConfigError(f"strategy {strategy.name!r} cannot answer multiple-choice items (it only generates)")
    _add(stats, metered)
    return d.index, d.meta


async def score_pipeline(
    name: str,
    pipeline: Pipeline,
    dataset: Dataset,
    params: SamplingParams = SHORT_ANSWER,
    progress: Callable[[str, int, int], None] | None = None,
    batch: int = 16,
) -> PipelineScore:
    """Run one pipeline over every item of the dataset."""
    stats: dict[str, ModelStats] = {}
    correct, decisions = [], []
    start = time.perf_counter()
    items = dataset.items
    if dataset.kind == "choice":
        for i, item in enumerate(items):
            index, meta = await choose_item(pipeline, item, stats)
            correct.append(index == item.answer)
            decisions.append({"choice": index, **meta})
            if progress:
                progress(name, i + 1, len(items))
    elif pipeline.strategy.name == "single":  # batched: one generate call per `batch` items
        ((role, backend),) = pipeline.models.items()
        metered = MeteredBackend(backend)
        for s in range(0, len(items), batch):
            chunk = items[s : s + batch]
            gens = await metered.generate([it.prompt for it in chunk], params)
            for it, g in zip(chunk, gens):
                correct.append(exact_match(g.text, it.answers))
                decisions.append({"text": g.text})
            if progress:
                progress(name, s + len(chunk), len(items))
        _add(stats, {role: metered})
    else:
        for i, item in enumerate(items):
            result = await pipeline.run(Request(prompt=item.prompt, params=params))
            correct.append(exact_match(result.text, item.answers))
            decisions.append({"text": result.text, **result.meta.get("collab", {})})
            for role, m in result.meta["models"].items():
                s = stats.setdefault(role, ModelStats())
                s.calls += m["calls"]
                s.prompt_tokens += m["prompt_tokens"]
                s.completion_tokens += m["completion_tokens"]
            if progress:
                progress(name, i + 1, len(items))
    wall = time.perf_counter() - start
    calls = sum(s.calls for s in stats.values())
    tokens = sum(s.prompt_tokens + s.completion_tokens for s in stats.values())
    return PipelineScore(name, correct, accuracy(correct), calls, tokens, wall, decisions)


@dataclass
class ModelRun:
    """One model on every item of a dataset: the inputs of router training and cascade calibration."""

    correct: np.ndarray  # [N] bool
    confidence: np.ndarray  # [N] top choice probability (choice) or mean token log-prob (short answer)
    score: np.ndarray  # [N] router target: probability of the right choice, or exact match
    wall_s: float


async def run_model(
    backend: ModelBackend, dataset: Dataset, params: SamplingParams = SHORT_ANSWER, batch: int = 16
) -> ModelRun:
    """Score one model on the dataset in batched calls (log-likelihood or greedy generation)."""
    start = time.perf_counter()
    items = dataset.items
    correct, conf, score = [], [], []
    for s in range(0, len(items), batch):
        chunk = items[s : s + batch]
        if dataset.kind == "choice":
            await backend.loglikelihood([pair for it in chunk for pair in choice_pairs(it.prompt, it.choices)])
            for it in chunk:  # answered from the results just cached
                p = await choice_probs(backend, it.prompt, it.choices)
                correct.append(int(np.argmax(p)) == it.answer)
                conf.append(float(p.max()))
                score.append(float(p[it.answer]))
        else:
            for it, g in zip(chunk, await backend.generate([it.prompt for it in chunk], params)):
                em = exact_match(g.text, it.answers)
                correct.append(em)
                conf.append(sum(g.logprobs) / max(1, len(g.logprobs)))
                score.append(float(em))
    return ModelRun(np.array(correct), np.array(conf), np.array(score), time.perf_counter() - start)


async def evaluate(
    pipelines: dict[str, Pipeline],
    dataset: Dataset,
    params: SamplingParams = SHORT_ANSWER,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[dict[str, PipelineScore], dict[str, ModelRun]]:
    """Score every pipeline on the dataset, sharing cached model results.

    Every distinct model first answers every item in batched calls (`run_model`, timed per model);
    pipelines then run one after another on cached results where they ask the same things.
    """
    shared = share_cache(pipelines)
    models = {}
    for p in shared.values():
        for b in p.models.values():
            models.setdefault(id(b), b)
    runs = {}
    for b in models.values():
        name = (await b.info()).name
        runs[name] = await run_model(b, dataset, params)
        if progress:
            progress(f"model {name}", len(dataset.items), len(dataset.items))
    scores = {name: await score_pipeline(name, p, dataset, params, progress) for name, p in shared.items()}
    return scores, runs
