"""A learned answer scorer for generation: P(a candidate answer is correct), the role of FrugalGPT's
scorer (Chen et al. 2023), fitted from (item, each model's answer and token log-probs, correct?) records.

Features of a candidate (`candidate_features`) are what every model's generation already carries,
so scoring costs no model call: which model wrote it (one-hot), and per model its mean and least
token log-prob and its length (each model's confidence is calibrated on its own scale), its
agreement with the other candidates available when it is scored (all of them in `rank`, the
earlier stages in `cascade`), and, as FrugalGPT's scorer reads the query with the answer, the
query's features (`route.featurize`, e.g. hashed character n-grams) per model: how likely THIS
model is right on such a query. A logistic regression (scikit-learn) maps them to P(correct); the
artefact is a `.npz` (arrays and a JSON header, no pickle) that `rank` (`scorer: learned`) and
`cascade` (`signal: learned`) name with `scorer_file`. Measured on the multitask-hard specialists'
768 test items: without the query features the scorer cannot tell a model's confident wrong answer
on another task from a right one (rank 86.3%, cascade 59.9%); with them rank reaches 90.6% (the
oracle: 91.4%) and cascade 77.7% at 2.55 calls (`benchmarks/results/ensemble-specialists.md`).

Calibration holds out: `fit_scorer` measures itself by 5-fold cross-validation over items of the
development data (out-of-fold probabilities), compares the out-of-fold `rank` choice with the best
single model (McNemar), and records that model as `meta["fallback_model"]` when the learned choice
is not significantly better; the pipelines' `fallback` option then answers with it alone.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from collab_ray.core.backend import ModelBackend
from collab_ray.core.errors import ConfigError
from collab_ray.core.sampling import SamplingParams
from collab_ray.ensemble.common import fit_logistic
from collab_ray.ensemble.route import featurize
from collab_ray.ensemble.vote import extract_text
from collab_ray.eval.metrics import paired_comparison

PER_MODEL = 4  # [1, mean log-prob, min log-prob, log(1 + tokens)] per generator model
SIGNIFICANCE = 0.05


def answer_features(model: int, n_models: int, logprobs: Sequence[float], agreement: float | None) -> np.ndarray:
    """[PER_MODEL·M + 2] features of one candidate answer of generator `model` (of `n_models`):

    onehot(model) ⊗ [1, (1/T) Σ_t log p_t, min_t log p_t, log(1 + T)] (one confidence scale per model),
    then [agreement, 1 if other candidates were available] (agreement: their share with the same answer).
    """
    lp = np.asarray(logprobs, dtype=np.float64)
    own = [1.0, lp.mean() if lp.size else 0.0, lp.min() if lp.size else 0.0, np.log1p(lp.size)]
    x = np.zeros(PER_MODEL * n_models + 2)
    x[PER_MODEL * model : PER_MODEL * (model + 1)] = own
    x[-2:] = (0.0, 0.0) if agreement is None else (agreement, 1.0)
    return x


def candidate_features(
    model: int, n_models: int, logprobs: Sequence[float], agreement: float | None, query: np.ndarray | None = None
) -> np.ndarray:
    """`answer_features`, then onehot(model) ⊗ query ([M·Q]; none without query features [Q])."""
    x = answer_features(model, n_models, logprobs, agreement)
    if query is None:
        return x
    q = np.zeros(n_models * len(query))
    q[model * len(query) : (model + 1) * len(query)] = query
    return np.concatenate([x, q])


def agreement(answers: Sequence[str | None], i: int, others: Sequence[int]) -> float | None:
    """Share of candidates `others` whose (normalized first-line) answer equals candidate i's; None without others."""
    if not others:
        return None
    return sum(answers[j] is not None and answers[j] == answers[i] for j in others) / len(others)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


@dataclass
class Scorer:
    """Logistic regression P(correct | candidate features) over the candidates of `models`."""

    models: list[str]  # generator models, in the order of the one-hot features
    weights: np.ndarray  # [F]
    bias: float
    meta: dict = field(default_factory=dict)
    features: str | None = None  # query features (`route.featurize` kind), or None: the answers' only

    def index(self, model: str) -> int:
        if model not in self.models:
            raise ConfigError(f"scorer fitted on models {self.models} cannot score a candidate of {model!r}")
        return self.models.index(model)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """[N, F] candidate features -> [N] P(correct) = σ(x w + b)."""
        return sigmoid(x @ self.weights + self.bias)

    def score(
        self, query: str, models: Sequence[str], logprobs: Sequence[Sequence[float]], texts: Sequence[str], others: Sequence[Sequence[int]]
    ) -> np.ndarray:
        """P(correct) of candidates (model, token log-probs, text) to `query`; candidate i agrees with candidates others[i]."""
        answers = [extract_text(t) for t in texts]
        q = featurize([query], self.features)[0] if self.features else None
        x = np.stack(
            [
                candidate_features(self.index(m), len(self.models), lp, agreement(answers, i, others[i]), q)
                for i, (m, lp) in enumerate(zip(models, logprobs))
            ]
        )
        return self.predict(x)

    def save(self, path: str | Path) -> None:
        header = {"kind": "scorer", "models": self.models, "bias": self.bias, "meta": self.meta, "features": self.features}
        with open(path, "wb") as f:  # a file object keeps numpy from appending '.npz'
            np.savez(f, weights=self.weights, header=np.array(json.dumps(header)))

    @classmethod
    def load(cls, path: str | Path) -> Scorer:
        try:
            z = np.load(path, allow_pickle=False)
            header = json.loads(str(z["header"]))
            if header.get("kind") != "scorer":
                raise ValueError(f"it holds a {header.get('kind', 'router')!r}, not a scorer")
            return cls(header["models"], z["weights"], float(header["bias"]), header["meta"], header.get("features"))
        except (OSError, KeyError, ValueError) as e:
            raise ConfigError(f"scorer file {str(path)!r} cannot be read: {e}") from e


@dataclass
class Records:
    """Every model's greedy answer to every item: the scorer's training data."""

    models: list[str]
    prompts: list[str]  # [N]
    texts: list[list[str]]  # [N][M]
    logprobs: list[list[list[float]]]  # [N][M][T]
    correct: np.ndarray  # [N, M] bool

    def answers(self, i: int) -> list[str | None]:
        return [extract_text(t) for t in self.texts[i]]

    def take(self, index: Sequence[int]) -> Records:
        """The records of items `index` only (a development or test part)."""
        return Records(self.models, [self.prompts[i] for i in index], [self.texts[i] for i in index],
                       [self.logprobs[i] for i in index], self.correct[np.asarray(index, dtype=int)])  # fmt: skip


def every_subset(m: int, c: int) -> list[list[int]]:
    """All subsets of the models other than c (2^(m−1)): the candidates a scorer may have seen beside c."""
    rest = [j for j in range(m) if j != c]
    return [list(s) for k in range(m) for s in itertools.combinations(rest, k)]


def design(records: Records, features: str | None):
    """(x [R, F] sparse, y [R], item [R], weight [R]): rows of every (item, candidate, set of other candidates
    seen), every subset of the other models with weight 1/2^(M−1) each, so that one scorer serves `rank`
    (all others seen) and `cascade` (the earlier stages seen) alike."""
    from scipy import sparse

    m = len(records.models)
    dense, ys, items, cands, ws = [], [], [], [], []
    for i in range(len(records.texts)):
        answers = records.answers(i)
        for c in range(m):
            subsets = every_subset(m, c)
            for s in subsets:
                dense.append(answer_features(c, m, records.logprobs[i][c], agreement(answers, c, s)))
                ys.append(bool(records.correct[i, c]))
                items.append(i)
                cands.append(c)
                ws.append(1.0 / len(subsets))
    x = sparse.csr_matrix(np.stack(dense))
    items, cands = np.array(items), np.array(cands)
    if features:  # onehot(candidate) ⊗ query, as candidate_features lays it out
        q = sparse.csr_matrix(featurize(records.prompts, features))[items].tocoo()
        width = q.shape[1]
        block = sparse.csr_matrix((q.data, (q.row, q.col + cands[q.row] * width)), shape=(len(items), m * width))
        x = sparse.hstack([x, block]).tocsr()
    return x, np.array(ys), items, np.array(ws)


def item_features(records: Records, i: int, context: str, features: str | None) -> np.ndarray:
    """[M, F] features of item i's candidates as `rank` scores them (context 'rank': each against all the
    others) or as `cascade` does ('cascade': stage k against stages < k)."""
    m, answers = len(records.models), records.answers(i)
    q = featurize([records.prompts[i]], features)[0] if features else None
    seen = (lambda c: [j for j in range(m) if j != c]) if context == "rank" else (lambda c: list(range(c)))
    return np.stack([candidate_features(c, m, records.logprobs[i][c], agreement(answers, c, seen(c)), q) for c in range(m)])


def out_of_fold(records: Records, features: str | None, c: float = 1.0, folds: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold P(correct) of every candidate, [N, M] as `rank` sees them and [N, M] as `cascade` does:
    each fold's items scored by a scorer fitted on the other folds (folds by item)."""
    from sklearn.model_selection import KFold

    x, y, item, w = design(records, features)
    n = len(records.texts)
    rank_p, stage_p = np.zeros((n, len(records.models))), np.zeros((n, len(records.models)))
    for train, test in KFold(folds, shuffle=True, random_state=seed).split(np.arange(n)):
        rows = np.isin(item, train)
        coef, bias = fit_logistic(x[rows], y[rows], c, w[rows])
        for i in test:
            rank_p[i] = sigmoid(item_features(records, i, "rank", features) @ coef + bias)
            stage_p[i] = sigmoid(item_features(records, i, "cascade", features) @ coef + bias)
    return rank_p, stage_p


def fit_scorer(
    records: Records, features: str | None = "chars", c: float = 1.0, folds: int = 5, seed: int = 0
) -> tuple[Scorer, np.ndarray]:
    """Fit on all the records; measure by cross-validation. Returns the scorer and the out-of-fold
    `cascade` probabilities [N, M] (for choosing stage thresholds on data the scorer did not see).

    meta: out-of-fold accuracy of the learned `rank` choice, each model's, the McNemar test of the
    former against the best single model, and `fallback_model` (that model) when it is not
    significantly better (Δ ≤ 0 or p ≥ 0.05).
    """
    if len(records.texts) < folds:
        raise ValueError(f"fitting a scorer needs at least {folds} items, got {len(records.texts)}")
    x, y, _, w = design(records, features)
    coef, bias = fit_logistic(x, y, c, w)
    rank_p, stage_p = out_of_fold(records, features, c, folds, seed)
    n = len(records.texts)
    chosen = records.correct[np.arange(n), rank_p.argmax(1)]
    single = records.correct.mean(0)
    best = int(np.argmax(single))
    test = paired_comparison(chosen.tolist(), records.correct[:, best].tolist())
    meta = {
        "items": n,
        "C": c,
        "folds": folds,
        "cv_rank_accuracy": float(chosen.mean()),
        "accuracy": dict(zip(records.models, map(float, single))),
        "best_single": records.models[best],
        "cv_vs_best_single": {"diff": test.diff, "p_value": test.p_value},
        "fallback_model": None if test.diff > 0 and test.p_value < SIGNIFICANCE else records.models[best],
    }
    return Scorer(list(records.models), coef.astype(np.float32), bias, meta, features), stage_p


async def collect(models: dict[str, ModelBackend], prompts: Sequence[str], correct, params: SamplingParams, batch: int = 64) -> Records:
    """Every model's answer to every prompt (batched generate calls); `correct(i, text)` judges answer i."""
    names = list(models)
    texts = [[""] * len(names) for _ in prompts]
    logprobs = [[[] for _ in names] for _ in prompts]
    for k, name in enumerate(names):
        for s in range(0, len(prompts), batch):
            for i, g in enumerate(await models[name].generate(list(prompts[s : s + batch]), params), s):
                texts[i][k], logprobs[i][k] = g.text, list(g.logprobs)
    ok = np.array([[bool(correct(i, t)) for t in row] for i, row in enumerate(texts)])
    return Records(names, list(prompts), texts, logprobs, ok)
