"""`cascade`: call models from cheapest to dearest, stop at the first whose confidence passes its
threshold (FrugalGPT, Chen et al. 2023). Signals: mean or min token log-prob, agreement among
samples, a verifier model's yes/no score, or `learned`: FrugalGPT's answer scorer, the P(correct) of
a fitted `collab_ray.ensemble.scorer` given the stage's answer and its agreement with the earlier
stages'. `calibrate` picks thresholds on dev data; `learned_thresholds` picks the learned signal's
from out-of-fold scores (data the scorer was not fitted on) and they travel in the scorer file."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from collab_ray.core.decoding import user_text
from collab_ray.core.errors import ConfigError
from collab_ray.core.strategy import Emit, Request, Strategy, StrategyResult, register
from collab_ray.core.types import Generation
from collab_ray.ensemble.common import pick, respond, sample_models
from collab_ray.ensemble.rank import judge_scores
from collab_ray.ensemble.scorer import Records, Scorer, fit_scorer
from collab_ray.ensemble.vote import EXTRACTORS, majority_vote
from collab_ray.eval.choice import ChoiceDecision, model_choice
from collab_ray.eval.datasets import Dataset
from collab_ray.eval.harness import run_model


def mean_logprob_confidence(g: Generation) -> float:
    """(1/T) Σ_t log p(y_t): the stage's average token log-prob."""
    return sum(g.logprobs) / max(1, len(g.logprobs))


def min_logprob_confidence(g: Generation) -> float:
    """min_t log p(y_t): the stage's least certain token."""
    return min(g.logprobs, default=0.0)


def agreement_confidence(answers: list[str | None]) -> float:
    """Share of samples agreeing with the majority answer (self-consistency as confidence)."""
    d = majority_vote(answers, [1.0] * len(answers))
    return d.counts.get(d.answer, 0.0) / len(answers) if d.answer is not None else 0.0


def stop_stage(confidences: Sequence[float], thresholds: Sequence[float]) -> int:
    """The first stage i with confidence_i ≥ threshold_i; the last stage (index len(thresholds)) when none passes."""
    for i, (c, t) in enumerate(zip(confidences, thresholds)):
        if c >= t:
            return i
    return len(thresholds)


@dataclass
class CascadePoint:
    """One operating point of a cascade on dev data."""

    thresholds: list[float]
    accuracy: float
    last_share: float  # share of items that reach the last (dearest) stage
    stage_counts: list[int] = field(default_factory=list)

    @property
    def calls(self) -> float:
        """Mean stages run per item (model calls, one generation each)."""
        return sum((k + 1) * c for k, c in enumerate(self.stage_counts)) / max(1, sum(self.stage_counts))


def simulate(conf: np.ndarray, correct: np.ndarray, thresholds: Sequence[float]) -> CascadePoint:
    """conf, correct: [N, S] per item and stage (every stage run on dev data) -> accuracy and cost."""
    n, s = conf.shape
    stages = np.array([stop_stage(conf[i, : s - 1], thresholds) for i in range(n)])
    acc = float(correct[np.arange(n), stages].mean())
    return CascadePoint(list(map(float, thresholds)), acc, float((stages == s - 1).mean()), np.bincount(stages, minlength=s).tolist())


def curve(conf: np.ndarray, correct: np.ndarray, points: int = 21) -> list[CascadePoint]:
    """Operating points from 'always stop early' to 'always go to the end': every stage's threshold
    is its own confidence quantile q, for q on a grid from 0 to 1 (plus −∞ and +∞)."""
    s = conf.shape[1]
    out = [simulate(conf, correct, [-math.inf] * (s - 1))]
    for q in np.linspace(0, 1, points):
        out.append(simulate(conf, correct, [float(np.quantile(conf[:, k], q)) for k in range(s - 1)]))
    out.append(simulate(conf, correct, [math.inf] * (s - 1)))
    return out


def calibrate(
    conf: np.ndarray, correct: np.ndarray, *, target_accuracy: float | None = None, target_share: float | None = None
) -> CascadePoint:
    """Cheapest point reaching `target_accuracy`, or the most accurate with last-stage share ≤ `target_share`."""
    if (target_accuracy is None) == (target_share is None):
        raise ValueError("calibrate needs exactly one of target_accuracy and target_share")
    points = curve(conf, correct, points=101)
    if target_accuracy is not None:
        ok = [p for p in points if p.accuracy >= target_accuracy]
        if not ok:
            raise ValueError(f"no threshold reaches accuracy {target_accuracy}; best is {max(p.accuracy for p in points):.3f}")
        return min(ok, key=lambda p: (p.last_share, -p.accuracy))
    ok = [p for p in points if p.last_share <= target_share]
    return max(ok, key=lambda p: (p.accuracy, -p.last_share))


def learned_thresholds(conf: np.ndarray, correct: np.ndarray, tolerance: float = 0.01) -> CascadePoint:
    """conf: out-of-fold P(correct) [N, S] of each stage's answer (as the cascade sees it). One threshold t
    for every stage (a probability means the same at each); of t on a grid of 0.05–0.95, the fewest
    calls per item among the points within `tolerance` of the most accurate."""
    points = [simulate(conf, correct, [t] * (conf.shape[1] - 1)) for t in np.linspace(0.05, 0.95, 19)]
    best = max(p.accuracy for p in points)
    return min((p for p in points if p.accuracy >= best - tolerance), key=lambda p: (p.calls, -p.accuracy))


def fit_learned_cascade(records: Records, features: str | None = "chars") -> tuple[Scorer, np.ndarray]:
    """`fit_scorer`, with the stop threshold of signal 'learned' chosen on its out-of-fold stage probabilities
    (`learned_thresholds`) and stored in `meta["cascade"]` (stages: the records' models, cheapest first).
    Returns the scorer and those probabilities [N, M]."""
    scorer, stage_p = fit_scorer(records, features)
    point = learned_thresholds(stage_p, records.correct)
    scorer.meta["cascade"] = {"stages": records.models, "thresholds": point.thresholds, "cv_accuracy": point.accuracy, "cv_calls": point.calls}
    return scorer, stage_p


async def calibrate_cascade(
    models: dict, dataset: Dataset, *, target_accuracy: float | None = None, target_share: float | None = None
) -> CascadePoint:
    """Run every stage (cheapest first) on dev data and pick thresholds (`calibrate`). Confidence: the top
    choice probability on multiple-choice items, the mean token log-prob ('mean_logprob') on short answers."""
    runs = [await run_model(b, dataset) for b in models.values()]
    conf = np.stack([r.confidence for r in runs], 1)
    correct = np.stack([r.correct for r in runs], 1)
    return calibrate(conf, correct, target_accuracy=target_accuracy, target_share=target_share)


class CascadeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    thresholds: list[float] | None = Field(
        None, description="Confidence threshold of each stage but the last, cheapest first; default −∞ (stop at stage 1)."
    )
    signal: Literal["mean_logprob", "min_logprob", "agreement", "verifier", "learned"] = Field(
        "mean_logprob", description="Confidence signal of a stage's answer ('learned': P(correct) from `scorer_file`)."
    )
    scorer_file: str | None = Field(
        None,
        description="Learned scorer (.npz, `collab_ray.ensemble.scorer`; relative to the YAML) of signal 'learned'; "
        "its thresholds are the default.",
        json_schema_extra={"file": True},
    )
    fallback: bool = Field(
        False,
        description="With signal 'learned': answer with the scorer's `meta.fallback_model` alone, when it has one (the best "
        "single model, recorded when the learned choice was not significantly better in cross-validation).",
    )
    samples: int = Field(3, ge=2, le=64, description="Samples per stage for the 'agreement' signal.")
    temperature: float = Field(0.7, ge=0.0, le=100.0, description="Sampling temperature of the 'agreement' samples.")
    extract: Literal["choice", "number", "text"] = Field("text", description="Answer extraction for 'agreement'.")
    verifier: str | None = Field(
        None, description="Model (not a stage) whose yes/no log-odds is the 'verifier' signal; stages are the other models, in order."
    )

    @model_validator(mode="after")
    def _learned(self):
        if (self.signal == "learned") != (self.scorer_file is not None):
            raise ValueError(f"signal {self.signal!r} with scorer_file {self.scorer_file!r}: scorer_file goes with signal 'learned'")
        return self


@register
class Cascade(Strategy):
    name = "cascade"
    min_models = 1
    Params = CascadeParams

    def __init__(self, params=None):
        super().__init__(params)
        self.scorer = Scorer.load(self.params.scorer_file) if self.params.scorer_file else None

    async def confidence(
        self, models, request: Request, name: str, earlier: list[tuple[str, Generation]]
    ) -> tuple[Generation, float, list[Generation]]:
        """A stage's answer and its confidence (`earlier`: the previous stages' answers, for signal 'learned')."""
        p = self.params
        if p.signal == "agreement":
            gens = (await sample_models(models, [name], request, p.samples, p.temperature))[name]
            answers = [EXTRACTORS[p.extract](g.text) for g in gens]
            d = majority_vote(answers, [1.0] * len(gens))
            return gens[d.index], agreement_confidence(answers), gens
        (g,) = (await sample_models(models, [name], request, 1, None))[name]
        if p.signal == "mean_logprob":
            return g, mean_logprob_confidence(g), [g]
        if p.signal == "min_logprob":
            return g, min_logprob_confidence(g), [g]
        if p.signal == "learned":
            seen = [*earlier, (name, g)]
            probs = self.scorer.score(
                user_text(request), [n for n, _ in seen], [x.logprobs for _, x in seen], [x.text for _, x in seen],
                [list(range(k)) for k in range(len(seen))],
            )
            return g, float(probs[-1]), [g]
        (score,) = await judge_scores(models[p.verifier], request, [g.text], "yes_no")
        return g, score, [g]

    def stages(self, models) -> tuple[list[str], list[float]]:
        """The stage models, cheapest first, and their thresholds (checked against each other)."""
        p = self.params
        if (p.signal == "verifier") != (p.verifier is not None):
            raise ConfigError(f"cascade signal {p.signal!r} with verifier {p.verifier!r}: the verifier goes with signal 'verifier'")
        if p.verifier is not None and p.verifier not in models:
            raise ConfigError(f"cascade verifier {p.verifier!r} is not one of the models {list(models)}")
        stages = [n for n in models if n != p.verifier]
        fallback = self.scorer.meta.get("fallback_model") if self.scorer is not None and p.fallback else None
        if fallback is not None:
            return pick(models, [fallback], "cascade scorer's fallback model"), []
        if p.thresholds is not None:
            thresholds = p.thresholds
        elif self.scorer is not None and "cascade" in self.scorer.meta:
            learned = self.scorer.meta["cascade"]
            if learned["stages"] != stages:
                raise ConfigError(f"scorer {p.scorer_file!r} chose thresholds for stages {learned['stages']}, not {stages}: set thresholds")
            thresholds = learned["thresholds"]
        else:
            thresholds = [-math.inf] * (len(stages) - 1)
        if len(thresholds) != len(stages) - 1:
            raise ConfigError(f"cascade thresholds {thresholds} need one per stage but the last ({len(stages) - 1})")
        return stages, thresholds

    @property
    def choice_refusal(self) -> str | None:
        """Why these parameters cannot answer multiple-choice items (None: they can); checked before any model runs."""
        if self.params.signal == "learned" and not self.params.fallback:
            return "cascade with signal 'learned' scores generated answers; it cannot answer multiple-choice items"
        return None

    async def choose(self, models, context: str, choices: list[str]) -> ChoiceDecision:
        """Multiple choice: a stage's confidence is its top choice probability, whatever `signal` says."""
        if self.choice_refusal:
            raise ConfigError(self.choice_refusal)
        stages, thresholds = self.stages(models)
        confidences = []
        for i, name in enumerate(stages):
            d = await model_choice(models[name], context, choices)
            confidences.append(d.meta["confidence"])
            if i == len(stages) - 1 or confidences[-1] >= thresholds[i]:
                return ChoiceDecision(d.index, {"stage": i, "model": name, "confidences": confidences})

    async def run(self, models, request: Request, emit: Emit | None = None) -> StrategyResult:
        p = self.params
        stages, thresholds = self.stages(models)
        confidences, earlier = [], []
        for i, name in enumerate(stages):
            g, conf, _ = await self.confidence(models, request, name, earlier)
            confidences.append(conf)
            earlier.append((name, g))
            if i == len(stages) - 1 or conf >= thresholds[i]:
                break
        collab = {"stage": i, "model": name, "signal": p.signal, "confidences": confidences}
        return await respond(g, name, collab, emit)
