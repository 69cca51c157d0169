"""Score pipelines on a dataset: accuracy with a confidence interval, model calls, tokens, wall time,
per-item records, and a paired test of every pipeline against the best single model.

Multiple-choice items are answered by log-likelihood (`single` pipelines: argmax acc_norm; ensemble
strategies through their `choose`); short-answer items by running the pipeline and exact match.
Pipelines over the same model objects share a cache of deterministic results (log-likelihoods,
greedy generations), so a model scores an item once while every pipeline is still charged the
calls and tokens it makes. Each model pass and each pipeline pass shows a progress bar (tqdm, on
stderr). A model pass asks for log-likelihoods in chunks bounded by continuation tokens times the
model's vocabulary (`SCORE_BUDGET_BYTES`): the engine keeps a [tokens, vocabulary] row of logits
per continuation token in flight, so long choices (PIQA-like) asked all at once held gigabytes
(8 items of two ~130-token choices, a 262k vocabulary, GPU-sized 2048-token engine steps, on CPU:
+3.5 GB peak RSS at once, +0.66 GB and 1.8x faster in bounded calls; with CPU-sized steps the engine
bounds it already, +0.56 GB either way).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
from tqdm import tqdm

from collab_ray.core.backend import ModelBackend
from collab_ray.core.errors import ConfigError
from collab_ray.core.metering import MeteredBackend, ModelStats
from collab_ray.core.pipeline import Pipeline
from collab_ray.core.sampling import SamplingParams
from collab_ray.core.strategy import Request, Strategy
from collab_ray.eval.choice import choice_pairs, choice_probs, model_choice
from collab_ray.eval.datasets import Dataset, Item
from collab_ray.eval.metrics import (
    Accuracy,
    Paired,
    accuracy,
    exact_match,
    paired_comparison,
)

SHORT_ANSWER = SamplingParams(max_tokens=16, temperature=0.0, stop=("\n",))  # greedy, one line
SCORE_BUDGET_BYTES = 256 << 20  # float32 logits one log-likelihood call of a model pass may hold (tokens × vocabulary × 4)
KINDS = {"choice": "multiple-choice", "short": "short-answer"}


def cannot_answer(strategy: Strategy, kind: str) -> str | None:
    """Why `strategy` cannot answer items of `kind` ('choice' or 'short'), or None when it can. A strategy
    answers multiple choice with `choose`, unless its `choice_refusal` (parameters that only score
    generated answers) says otherwise."""
    if kind != "choice" or strategy.name == "single":
        return None
    if not hasattr(strategy, "choose"):
        return f"strategy {strategy.name!r} only generates; it cannot answer {KINDS[kind]} items"
    return getattr(strategy, "choice_refusal", None)


def bar(total: int, desc: str) -> tqdm:
    """A progress bar over items (rate and ETA) on stderr."""
    return tqdm(total=total, desc=desc, unit="item", file=sys.stderr, dynamic_ncols=True)


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
    reason = cannot_answer(strategy, "choice")
    if reason:
        raise ConfigError(reason)
    if hasattr(strategy, "choose"):
        d = await strategy.choose(metered, item.prompt, item.choices)
    else:  # single
        (backend,) = metered.values()
        d = await model_choice(backend, item.prompt, item.choices)
    _add(stats, metered)
    return d.index, d.meta


async def score_pipeline(
    name: str, pipeline: Pipeline, dataset: Dataset, params: SamplingParams = SHORT_ANSWER, batch: int = 16
) -> PipelineScore:
    """Run one pipeline over every item of the dataset (a progress bar on stderr)."""
    stats: dict[str, ModelStats] = {}
    correct, decisions = [], []
    start = time.perf_counter()
    items = dataset.items
    with bar(len(items), f"pipeline {name}") as progress:
        if dataset.kind == "choice":
            for item in items:
                index, meta = await choose_item(pipeline, item, stats)
                correct.append(index == item.answer)
                decisions.append({"choice": index, **meta})
                progress.update()
        elif pipeline.strategy.name == "single":  # batched: one generate call per `batch` items
            ((role, backend),) = pipeline.models.items()
            metered = MeteredBackend(backend)
            for s in range(0, len(items), batch):
                chunk = items[s : s + batch]
                gens = await metered.generate([it.prompt for it in chunk], params)
                for it, g in zip(chunk, gens):
                    correct.append(exact_match(g.text, it.answers))
                    decisions.append({"text": g.text})
                progress.update(len(chunk))
            _add(stats, {role: metered})
        else:
            for item in items:
                result = await pipeline.run(Request(prompt=item.prompt, params=params))
                correct.append(exact_match(result.text, item.answers))
                decisions.append({"text": result.text, **result.meta.get("collab", {})})
                for role, m in result.meta["models"].items():
                    s = stats.setdefault(role, ModelStats())
                    s.calls += m["calls"]
                    s.prompt_tokens += m["prompt_tokens"]
                    s.completion_tokens += m["completion_tokens"]
                progress.update()
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


async def choice_chunks(backend: ModelBackend, items: list[Item], batch: int) -> list[list[Item]]:
    """`items` in consecutive chunks of at most `batch` items whose choices' tokens, times the model's
    vocabulary in float32 logits, stay within SCORE_BUDGET_BYTES (an item over it on its own is a chunk)."""
    vocab = (await backend.info()).vocab_size
    budget = max(1, SCORE_BUDGET_BYTES // (4 * vocab))
    lengths = await asyncio.gather(*(backend.encode(c, add_special_tokens=False) for it in items for _, c in choice_pairs(it.prompt, it.choices)))
    sizes, k = [], 0
    for it in items:
        sizes.append(sum(len(ids) for ids in lengths[k : k + len(it.choices)]))
        k += len(it.choices)
    chunks: list[list[Item]] = []
    tokens = 0
    for it, n in zip(items, sizes):
        if not chunks or len(chunks[-1]) == batch or tokens + n > budget:
            chunks.append([])
            tokens = 0
        chunks[-1].append(it)
        tokens += n
    return chunks


async def run_model(
    backend: ModelBackend, dataset: Dataset, params: SamplingParams = SHORT_ANSWER, batch: int = 16
) -> ModelRun:
    """Score one model on the dataset in batched calls (log-likelihood or greedy generation), with a
    progress bar on stderr."""
    start = time.perf_counter()
    items = dataset.items
    correct, conf, score = [], [], []
    backend = backend if isinstance(backend, CachedBackend) else CachedBackend(backend)  # each item is scored once
    name = (await backend.info()).name
    if dataset.kind == "choice":
        chunks = await choice_chunks(backend, items, batch)
    else:
        chunks = [items[s : s + batch] for s in range(0, len(items), batch)]
    with bar(len(items), f"model {name}") as progress:
        for chunk in chunks:
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
            progress.update(len(chunk))
    return ModelRun(np.array(correct), np.array(conf), np.array(score), time.perf_counter() - start)


@dataclass
class Evaluation:
    """What an evaluation has computed so far: each model's own pass, then each pipeline's."""

    dataset: Dataset
    runs: dict[str, ModelRun] = field(default_factory=dict)  # model name -> its pass
    scores: dict[str, PipelineScore] = field(default_factory=dict)  # pipeline name -> its score

    def best_single(self) -> str | None:
        """The model whose own pass is most accurate (the first of equals), once any has run."""
        return max(self.runs, key=lambda m: self.runs[m].correct.mean(), default=None)

    def paired(self) -> dict[str, Paired]:
        """Each pipeline against the best single model, by McNemar's exact test on the same items."""
        best = self.best_single()
        if best is None:
            return {}
        reference = self.runs[best].correct.tolist()
        return {n: paired_comparison(s.correct, reference) for n, s in self.scores.items()}

    def records(self) -> list[dict]:
        """Per item: its id, the gold answer, and each pipeline's answer and whether it is right."""
        key = "choice" if self.dataset.kind == "choice" else "text"
        return [
            {
                "id": item.id,
                "gold": item.gold,
                "pipelines": {n: {"answer": s.decisions[i][key], "correct": s.correct[i]} for n, s in self.scores.items()},
            }
            for i, item in enumerate(self.dataset.items)
        ]

    def as_dict(self, complete: bool) -> dict:
        """The JSON of a run (`complete` False while passes are still to come, or after one failed)."""
        return {
            "dataset": self.dataset.name,
            "kind": self.dataset.kind,
            "items": len(self.dataset.items),
            "complete": complete,
            "models": {m: {"accuracy": float(r.correct.mean()), "wall_s": r.wall_s} for m, r in self.runs.items()},
            "best_single": self.best_single(),
            "pipelines": {n: asdict(s) for n, s in self.scores.items()},
            "paired_vs_best_single": {n: asdict(p) for n, p in self.paired().items()},
            "records": self.records(),
        }


async def evaluate(
    pipelines: dict[str, Pipeline],
    dataset: Dataset,
    params: SamplingParams = SHORT_ANSWER,
    on_update: Callable[[Evaluation], None] | None = None,
) -> Evaluation:
    """Score every pipeline on the dataset, sharing cached model results.

    Every pipeline is first checked to answer the dataset's kind of item. Every distinct model then
    answers every item in batched calls (`run_model`, timed per model); pipelines then run one after
    another on cached results where they ask the same things. `on_update` gets the evaluation after
    every pass, so what was computed survives a later failure.
    """
    unable = {n: r for n, p in pipelines.items() if (r := cannot_answer(p.strategy, dataset.kind))}
    if unable:
        raise ConfigError("; ".join(f"pipeline {n!r}: {r}" for n, r in unable.items()))
    shared = share_cache(pipelines)
    models = {}
    for p in shared.values():
        for b in p.models.values():
            models.setdefault(id(b), b)
    done = Evaluation(dataset)
    for b in models.values():
        done.runs[(await b.info()).name] = await run_model(b, dataset, params)
        if on_update:
            on_update(done)
    for name, p in shared.items():
        done.scores[name] = await score_pipeline(name, p, dataset, params)
        if on_update:
            on_update(done)
    return done
