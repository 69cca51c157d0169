"""`combine`: a learned multiple-choice combiner over several models' per-choice scores (stacking).

Owns the records a combiner is fitted from (item, each model's per-choice log-likelihoods and
token counts, gold), the per-choice features, the classifier, its artefact, the fallback decision
and the `combine` strategy. Why it exists: the hand-written ensembles (fuse, vote, rank) average
or vote over the models' choice distributions and lose to the better model when the two are far
apart (issue 17: fuse −5.3, vote −6.0 points against Gemma-3-270M); a classifier that sees every
model's scores of every choice learns how far to trust each model, and when (stacking, Wolpert
1992; the PairRanker of LLM-Blender, Jiang et al. 2023, and the answer scorer of FrugalGPT, Chen
et al. 2023, learn the same kind of judge from the models' outputs).

Per choice c of an item and per model m the features are (`FEATURES`): the log-likelihood of the
choice (raw, per token, per byte), the model's choice distribution p_m(c) = softmax of per-byte
scores, the choice's rank under the model, its margin to the model's best, the entropy of p_m;
and across models: the share of models whose pick c is. A logistic regression scores each choice
(P(correct | features)); the item's answer is the argmax over its choices (a conditional-logit
reading of a binary classifier, as in learning-to-rank).

Measured (benchmarks/results/ensemble.md; SmolLM2-135M + Gemma-3-270M, 256-448 items per set, every
item answered by a fit on the other half): Δ vs the better single model +10.1 points on OpenBookQA
(p < 0.001), +3.8 on ARC-Easy (p = 0.002), +2.3 on SciQ (p = 0.031), +2.2 on CommonsenseQA (p = 0.11),
0.0 on Social IQa, −1.7 on ARC-Challenge (p = 0.58). Pooled over all 2 283 items its cross-validation
beat Gemma by +0.9 (p = 0.059): the shipped demo combiner falls back to Gemma.

Artefacts are `.npz` with arrays and a JSON header, loaded with `allow_pickle=False` (as routers).
The fallback is decided at fit time on held-out folds: when the combiner does not beat the best
single model there with McNemar p < `alpha`, the artefact answers with that model instead.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from collab_ray.core.backend import ModelBackend
from collab_ray.core.errors import ConfigError
from collab_ray.core.strategy import Strategy, register
from collab_ray.ensemble.common import fit_logistic
from collab_ray.ensemble.fuse import fit_temperature, fit_weights
from collab_ray.eval.choice import ChoiceDecision, choice_pairs
from collab_ray.eval.metrics import paired_comparison

FORMAT = "collab-ray-combiner/1"


# ---- records ------------------------------------------------------------------------------------
@dataclass
class ChoiceScores:
    """One model on one item: per choice, the summed log-likelihood and the number of tokens."""

    logprob: np.ndarray  # [C] log P(" " + choice | prompt)
    tokens: np.ndarray  # [C] continuation tokens


@dataclass
class Record:
    """One multiple-choice item as the combiner sees it: choices, gold (None when unknown), every model's scores."""

    id: str
    choices: list[str]
    answer: int | None
    scores: dict[str, ChoiceScores]  # model name -> its scores


async def score_choices(backend: ModelBackend, prompts: Sequence[str], choices: Sequence[list[str]]) -> list[ChoiceScores]:
    """One batched log-likelihood call over every (prompt, " " + choice) pair of the items."""
    pairs = [p for prompt, cs in zip(prompts, choices) for p in choice_pairs(prompt, cs)]
    rs = await backend.loglikelihood(pairs) if pairs else []
    out, k = [], 0
    for cs in choices:
        chunk = rs[k : k + len(cs)]
        k += len(cs)
        out.append(ChoiceScores(np.array([r.logprob for r in chunk]), np.array([r.num_tokens for r in chunk])))
    return out


# ---- features -----------------------------------------------------------------------------------
MODEL_FEATURES = (
    "lp_raw",  # log P(choice), summed over its tokens
    "lp_token",  # per token
    "lp_byte",  # per byte (acc_norm's score)
    "log_p",  # log of the model's choice distribution p = softmax(per-byte scores)
    "top",  # 1 when the choice is the model's pick
    "rank",  # rank under the model, 0 best, scaled to [0, 1]
    "margin",  # per-byte score minus the model's best
    "entropy",  # entropy of p over the item's choices / log C (item level)
    "log_p_sure",  # log_p · (1 − entropy): trust the model where it is sure
)
SHARED_FEATURES = ("agree",)  # share of the models whose pick the choice is


def model_features(logprob: np.ndarray, tokens: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
    """One model on one item: logprob, tokens, bytes [C] -> [C, len(MODEL_FEATURES)].

    p = softmax(logprob / bytes) is the distribution `choice_probs` gives (acc_norm, Gao et al. 2021).
    """
    per_byte = logprob / np.maximum(nbytes, 1)  # [C]
    z = per_byte - per_byte.max()
    log_p = z - np.log(np.exp(z).sum())  # [C]
    c = len(logprob)
    entropy = float(-(np.exp(log_p) * log_p).sum() / np.log(c)) if c > 1 else 0.0
    rank = np.argsort(np.argsort(-per_byte, kind="stable"), kind="stable") / max(c - 1, 1)  # [C]
    return np.stack(
        [logprob, logprob / np.maximum(tokens, 1), per_byte, log_p, (rank == 0).astype(float), rank, z,
         np.full(c, entropy), log_p * (1.0 - entropy)],
        axis=1,
    )  # fmt: skip


def item_features(record: Record, models: Sequence[str]) -> np.ndarray:
    """One item -> [C, M·len(MODEL_FEATURES) + len(SHARED_FEATURES)] features of its choices (models in `models` order)."""
    nbytes = np.array([len(c.encode("utf-8")) for c in record.choices], dtype=np.float64)  # as `acc_norm_scores`
    per_model = []
    for m in models:
        s = record.scores.get(m)
        if s is None:
            raise ConfigError(f"item {record.id!r} has no scores of model {m!r} (it has {sorted(record.scores)})")
        if len(s.logprob) != len(record.choices):
            raise ConfigError(f"item {record.id!r}: model {m!r} scored {len(s.logprob)} choices, the item has {len(record.choices)}")
        per_model.append(model_features(np.asarray(s.logprob, float), np.asarray(s.tokens, float), nbytes))
    agree = np.mean([f[:, MODEL_FEATURES.index("top")] for f in per_model], axis=0)  # [C]
    return np.concatenate([*per_model, agree[:, None]], axis=1)


def feature_names(models: Sequence[str]) -> list[str]:
    return [f"{m}.{f}" for m in models for f in MODEL_FEATURES] + list(SHARED_FEATURES)


def design(records: Sequence[Record], models: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """records -> X [R, F] (one row per choice), y [R] (1: the right choice), item [R] (index of the row's record)."""
    xs, ys, item = [], [], []
    for i, r in enumerate(records):
        f = item_features(r, models)
        xs.append(f)
        ys.append(np.arange(len(r.choices)) == r.answer)
        item.append(np.full(len(r.choices), i))
    return np.concatenate(xs), np.concatenate(ys).astype(int), np.concatenate(item)


def pick_per_item(logits: np.ndarray, item: np.ndarray, n_items: int) -> np.ndarray:
    """logits [R], item [R] -> [n_items] the index, within its item, of each item's highest-scoring choice."""
    picks = np.zeros(n_items, dtype=int)
    start = np.r_[0, np.flatnonzero(np.diff(item)) + 1]  # rows of an item are contiguous
    for s, e in zip(start, np.r_[start[1:], len(item)]):
        picks[item[s]] = int(np.argmax(logits[s:e]))
    return picks


def single_picks(records: Sequence[Record], model: str) -> np.ndarray:
    """[N] each item's acc_norm pick by one model."""
    return np.array([int(np.argmax(item_features(r, [model])[:, MODEL_FEATURES.index("lp_byte")])) for r in records])


# ---- the combiner and its artefact --------------------------------------------------------------
@dataclass
class Combiner:
    """A logistic regression over standardized choice features; or, after fallback, one model alone."""

    models: list[str]  # the models whose scores it reads, in feature order
    coef: np.ndarray  # [F]
    intercept: float
    mean: np.ndarray  # [F] standardization
    scale: np.ndarray  # [F]
    fallback: str | None = None  # answer with this model alone (decided at fit time)
    meta: dict = field(default_factory=dict)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """x [R, F] -> [R] logit of P(choice is right) = ((x − μ) / σ) · w + b."""
        return (x - self.mean) / self.scale @ self.coef + self.intercept

    def choose(self, record: Record, use_fallback: bool = True) -> int:
        if use_fallback and self.fallback is not None:
            return int(single_picks([record], self.fallback)[0])
        return int(np.argmax(self.logits(item_features(record, self.models))))

    def save(self, path: str | Path) -> None:
        header = {"format": FORMAT, "models": self.models, "features": feature_names(self.models),
                  "intercept": self.intercept, "fallback": self.fallback, "meta": self.meta}  # fmt: skip
        with open(path, "wb") as f:  # a file object keeps numpy from appending '.npz'
            np.savez(f, coef=self.coef, mean=self.mean, scale=self.scale, header=np.array(json.dumps(header)))

    @classmethod
    def load(cls, path: str | Path) -> Combiner:
        try:
            z = np.load(path, allow_pickle=False)
            header = json.loads(str(z["header"]))
            coef, mean, scale = (np.asarray(z[k], dtype=np.float64) for k in ("coef", "mean", "scale"))
        except (OSError, KeyError, ValueError, TypeError) as e:
            raise ConfigError(f"combiner file {str(path)!r} cannot be read: {e}") from e
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            got = header.get("format") if isinstance(header, dict) else header
            raise ConfigError(f"combiner file {str(path)!r} has format {got!r}, expected {FORMAT!r}")
        models = header.get("models")
        expected = feature_names(models) if isinstance(models, list) and models else None
        if expected is None or header.get("features") != expected:
            raise ConfigError(f"combiner file {str(path)!r}: features {header.get('features')!r} are not those of models {models!r}")
        if not coef.shape == mean.shape == scale.shape == (len(expected),) or not np.all(scale > 0):
            raise ConfigError(f"combiner file {str(path)!r}: coef/mean/scale must be {len(expected)} numbers (scale > 0), got shapes {coef.shape}, {mean.shape}, {scale.shape}")
        fallback = header.get("fallback")
        if fallback is not None and fallback not in models:
            raise ConfigError(f"combiner file {str(path)!r}: fallback {fallback!r} is not one of its models {models}")
        return cls(models, coef, float(header["intercept"]), mean, scale, fallback, header.get("meta", {}))


# ---- fitting ------------------------------------------------------------------------------------
class FitConfig(BaseModel):
    """How a combiner is fitted (every choice below is made on held-out folds of the development records)."""

    model_config = ConfigDict(extra="forbid")

    folds: int = Field(5, ge=2, description="Cross-validation folds over the development items (grouped by item).")
    c_grid: list[float] = Field(
        [0.01, 0.1, 1.0], min_length=1, description="Inverse L2 strengths of the logistic regression tried; the best by CV accuracy is kept."
    )
    fallback: bool = Field(
        True, description="Answer with the best single model when the combiner does not beat it significantly on the held-out folds."
    )
    alpha: float = Field(0.05, gt=0.0, le=1.0, description="McNemar p-value below which the combiner counts as significantly better.")
    seed: int = Field(0, description="Seed of the fold assignment.")


def folds_of(n: int, k: int, seed: int) -> np.ndarray:
    """[n] fold index of each item, balanced and shuffled."""
    return np.random.default_rng(seed).permutation(np.arange(n) % k)


def _fit_logreg(x: np.ndarray, y: np.ndarray, c: float) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """Standardize x, fit an L2 logistic regression (`common.fit_logistic`) -> (coef, intercept, mean, scale)."""
    mean, scale = x.mean(0), x.std(0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    coef, b = fit_logistic((x - mean) / scale, y, c)
    return np.asarray(coef, dtype=np.float64), float(b), mean, scale


def cross_val_picks(records: Sequence[Record], models: Sequence[str], c: float, fold: np.ndarray) -> np.ndarray:
    """[N] each item's pick by a combiner fitted on the other folds (out-of-fold predictions)."""
    x, y, item = design(records, models)
    picks = np.zeros(len(records), dtype=int)
    for k in np.unique(fold):
        test = fold[item] == k
        coef, b, mean, scale = _fit_logreg(x[~test], y[~test], c)
        idx = np.flatnonzero(fold == k)
        logits = (x[test] - mean) / scale @ coef + b
        local = np.searchsorted(idx, item[test])  # rows of the held-out items, renumbered 0..len(idx)
        picks[idx] = pick_per_item(logits, local, len(idx))
    return picks


def fit_combiner(records: Sequence[Record], models: Sequence[str], config: FitConfig | None = None) -> Combiner:
    """Fit on development records: choose C and the fallback on out-of-fold predictions, then refit on all of them.

    The meta records the held-out evidence: each single model's accuracy, the combiner's out-of-fold
    accuracy at every C, and the paired McNemar test against the best single model.
    """
    cfg = config or FitConfig()
    records = [r for r in records if r.answer is not None]
    if len(records) < 2 * cfg.folds:
        raise ConfigError(f"fitting a combiner needs at least {2 * cfg.folds} items with a gold answer, got {len(records)}")
    models = list(models)
    gold = np.array([r.answer for r in records])
    singles = {m: single_picks(records, m) == gold for m in models}
    best = max(models, key=lambda m: singles[m].mean())
    fold = folds_of(len(records), cfg.folds, cfg.seed)
    cv = {c: cross_val_picks(records, models, c, fold) == gold for c in cfg.c_grid}
    c = max(cfg.c_grid, key=lambda c: cv[c].mean())
    test = paired_comparison(cv[c].tolist(), singles[best].tolist())
    significant = test.diff > 0 and test.p_value < cfg.alpha
    x, y, _ = design(records, models)
    coef, b, mean, scale = _fit_logreg(x, y, c)
    meta = {
        "items": len(records),
        "folds": cfg.folds,
        "C": c,
        "cv_accuracy": {str(k): float(v.mean()) for k, v in cv.items()},
        "single_accuracy": {m: float(v.mean()) for m, v in singles.items()},
        "best_single": best,
        "vs_best_single": {"diff": test.diff, "only_combiner": test.a_only, "only_best": test.b_only, "p_value": test.p_value},
        "significant": bool(significant),
        "alpha": cfg.alpha,
    }
    fallback = best if cfg.fallback and not significant else None
    return Combiner(models, coef, b, mean, scale, fallback, meta)


# ---- the strategy -------------------------------------------------------------------------------
class CombineParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    combiner: str = Field(
        description="Path of the combiner file written by `collab-ray ensemble fit` (.npz); relative to the YAML it is named in.",
        json_schema_extra={"file": True},
    )
    fallback: bool = Field(
        True, description="Honour the artefact's fallback (answer with the best single model when the fit was not significantly better); false: always combine."
    )


@register
class Combine(Strategy):
    """Multiple choice: every model scores every choice, the fitted classifier picks (or the fallback model alone).

    Generation requests have no choices to score: the artefact's best single model answers them.
    """

    name = "combine"
    min_models = 1
    Params = CombineParams

    def __init__(self, params=None):
        super().__init__(params)
        self.combiner = Combiner.load(self.params.combiner)

    def needed(self, models: dict) -> list[str]:
        missing = [m for m in self.combiner.models if m not in models]
        if missing:
            raise ConfigError(f"combiner {self.params.combiner!r} reads model {missing[0]!r}, which is not one of the models {list(models)}")
        fallback = self.combiner.fallback if self.params.fallback else None
        return [fallback] if fallback else self.combiner.models

    async def choose(self, models: dict[str, ModelBackend], context: str, choices: list[str]) -> ChoiceDecision:
        names = self.needed(models)
        scores = await asyncio.gather(*(score_choices(models[m], [context], [choices]) for m in names))
        record = Record("request", list(choices), None, {m: s[0] for m, s in zip(names, scores)})
        if names != self.combiner.models:  # the fallback model alone
            return ChoiceDecision(int(single_picks([record], names[0])[0]), {"fallback": names[0]})
        logits = self.combiner.logits(item_features(record, self.combiner.models))
        return ChoiceDecision(int(np.argmax(logits)), {"scores": logits.tolist()})

    async def run(self, models, request, emit=None):
        from collab_ray.core.single import Single

        name = self.combiner.fallback or self.combiner.meta.get("best_single") or self.combiner.models[-1]
        self.needed(models)
        result = await Single().run({name: models[name]}, request, emit)
        result.meta.setdefault("collab", {})["answered_by"] = name
        return result


# ---- from models and datasets -------------------------------------------------------------------
async def model_records(models: dict[str, ModelBackend], items: Sequence, batch: int = 16, progress=None) -> list[Record]:
    """Every model scores every choice of the multiple-choice items (`eval.datasets.Item`), `batch` items per call."""
    scores: dict[str, list[ChoiceScores]] = {m: [] for m in models}
    for s in range(0, len(items), batch):
        chunk = items[s : s + batch]
        for m, backend in models.items():
            scores[m] += await score_choices(backend, [it.prompt for it in chunk], [it.choices for it in chunk])
        if progress is not None:
            progress(s + len(chunk), len(items))
    return [Record(it.id, list(it.choices), it.answer, {m: scores[m][i] for m in models}) for i, it in enumerate(items)]


def split_dev_test(n: int, dev_share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random split of n items -> (dev indices, test indices), both sorted."""
    if not 0.0 < dev_share < 1.0:
        raise ConfigError(f"dev share {dev_share} must be in (0, 1)")
    order = np.random.default_rng(seed).permutation(n)
    k = int(round(dev_share * n))
    if k == 0 or k == n:
        raise ConfigError(f"{n} items cannot be split {dev_share:.2f} / {1 - dev_share:.2f} into a development and a test part")
    return np.sort(order[:k]), np.sort(order[k:])


def held_out_report(picks: np.ndarray, records: Sequence[Record], best: str) -> dict:
    """Accuracy of `picks` on records the fit never saw, and McNemar against the dev-chosen best single model."""
    gold = np.array([r.answer for r in records])
    return paired_report(picks == gold, single_picks(records, best) == gold, best)


def paired_report(ours: np.ndarray, single: np.ndarray, best: str) -> dict:
    """ours, single [N] right on each held-out item -> accuracies and McNemar of the ensemble against model `best`."""
    t = paired_comparison(np.asarray(ours).tolist(), np.asarray(single).tolist())
    return {"items": len(ours), "accuracy": float(np.mean(ours)), "best_single": best, "best_single_accuracy": float(np.mean(single)),
            "diff": t.diff, "only_ensemble": t.a_only, "only_best": t.b_only, "p_value": t.p_value}  # fmt: skip


def log_choice_probs(record: Record, model: str) -> np.ndarray:
    """[C] the model's log choice distribution (`choice_probs`: softmax of per-byte scores)."""
    return item_features(record, [model])[:, MODEL_FEATURES.index("log_p")]


def fit_fuse(records: Sequence[Record], models: Sequence[str]) -> tuple[list[float], list[float]]:
    """Development records -> (weights, temperatures) of `fuse`: each T_m by its own likelihood of the gold
    choices, then the mixture weights of the tempered distributions by EM (`fuse.fit_temperature`, `fit_weights`)."""
    records = [r for r in records if r.answer is not None]
    if not records:
        raise ConfigError("fitting fuse needs items with a gold answer, got none")
    gold = np.array([r.answer for r in records])
    temps, p_gold = [], []
    for m in models:
        logp = [log_choice_probs(r, m) for r in records]
        t = fit_temperature(logp, gold)
        temps.append(t)
        p_gold.append([float(np.exp(tempered(lp, t)[g])) for lp, g in zip(logp, gold)])
    return fit_weights(np.array(p_gold).T).tolist(), temps


def tempered(logp: np.ndarray, t: float) -> np.ndarray:
    """[C] log softmax(logp / T)."""
    z = logp / t
    return z - z.max() - np.log(np.exp(z - z.max()).sum())


def fuse_picks(records: Sequence[Record], models: Sequence[str], weights: Sequence[float], temperatures: Sequence[float]) -> np.ndarray:
    """[N] the picks of `fuse` (multiple choice) with these weights and temperatures: argmax Σ_m w_m softmax(logp_m / T_m)."""
    w = np.asarray(weights) / np.sum(weights)
    return np.array([
        int(np.argmax(sum(wm * np.exp(tempered(log_choice_probs(r, m), t)) for m, wm, t in zip(models, w, temperatures))))
        for r in records
    ])  # fmt: skip


def records_to_jsonl(records: Sequence[Record], path: str | Path) -> None:
    """Write records (one JSON object per line) so that a later fit reads them instead of running the models."""
    with open(path, "w") as f:
        for r in records:
            scores = {m: {"logprob": s.logprob.tolist(), "tokens": s.tokens.tolist()} for m, s in r.scores.items()}
            f.write(json.dumps({"id": r.id, "choices": r.choices, "answer": r.answer, "scores": scores}) + "\n")


def records_from_jsonl(path: str | Path) -> list[Record]:
    """Records written by `records_to_jsonl`; errors name the line."""
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            scores = {m: ChoiceScores(np.array(s["logprob"], float), np.array(s["tokens"], float)) for m, s in row["scores"].items()}
            out.append(Record(str(row["id"]), list(row["choices"]), row["answer"], scores))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"{path}:{n}: not a combiner record ({type(e).__name__}: {e})") from e
    return out
