"""`fuse`: token-level fusion during decoding, p(y) = Σ_i w_i p_i(y) (GaC, Yu et al. 2024; UniTE, Yao et al. 2024).

All models decode in KV-cached sessions, stepped concurrently; each step sends only the new token
ids. Same vocabulary: average the distributions over token ids. Different vocabularies: map each
model's distribution into the union vocabulary of normalized token strings (`core.vocab`), fuse
there, and feed every model its own tokenization of the chosen string. Options: top-k union
(each model returns only its k best tokens), per-model weights, and a threshold mode that fuses
only when the primary model's top probability is below the threshold.

Multiple choice: p(c) = Σ_i w_i softmax(s_i / T_i)(c) over each model's acc_norm choice scores s_i,
with per-model temperatures T_i (temperature scaling, Guo et al. 2017) and weights w_i fitted on a
development split (`collab-ray ensemble fit --method fuse`: T_i minimizes model i's negative
log-likelihood of the gold choices, then w maximizes the mixture's likelihood by EM). Equal weights
at T = 1 lost to Gemma-3-270M by 3-5 points (benchmarks/results/ensemble.md): SmolLM2's choice
distribution is as sharp as Gemma's while being right less often.
"""

from __future__ import annotations

import asyncio
import codecs
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from collab_ray.core.backend import ModelBackend
from collab_ray.core.errors import ConfigError
from collab_ray.core.sampling import make_generator, process_logits, sample
from collab_ray.core.strategy import (
    Emit,
    Request,
    Strategy,
    StrategyResult,
    register,
    render_prompt,
)
from collab_ray.core.types import TopK, Usage
from collab_ray.core.vocab import (
    EOS,
    Key,
    TokenMap,
    UnionVocab,
    fuse_logprobs,
    greedy_split,
    to_union,
)
from collab_ray.eval.choice import ChoiceDecision, choice_probs

ANCHOR = "\n"  # encoded before a piece, then dropped, so SentencePiece adds no dummy prefix space


class FuseParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weights: list[float] | None = Field(
        None, description="Weight of each model, in model order (normalized to sum 1); default equal."
    )
    mode: Literal["auto", "same", "union"] = Field(
        "auto",
        description="'same': average over shared token ids; 'union': union vocabulary of normalized token "
        "strings; 'auto': 'same' when all token strings match, else 'union'.",
    )
    top_k: int | None = Field(
        None, ge=1, description="Union mode: fuse only the union of each model's k most likely tokens (faster)."
    )
    threshold: float | None = Field(
        None, ge=0.0, le=1.0, description="Fuse only at steps where the primary model's top probability is below this."
    )
    primary: str | None = Field(
        None, description="The model whose tokens are the output and whose confidence the threshold reads; default the first."
    )
    temperatures: list[float] | None = Field(
        None,
        description="Multiple choice: temperature of each model's choice distribution, in model order, applied before "
        "weighting (fitted with `collab-ray ensemble fit --method fuse`); default 1. Token-level fusion ignores it.",
    )


def fuse_step(rows: torch.Tensor, weights: torch.Tensor, primary: int, threshold: float | None) -> tuple[torch.Tensor, bool]:
    """rows [M, U] log-probs -> ([U] log p, fused?); p = Σ w_i p_i, or the primary's alone when it is sure."""
    if threshold is not None and float(rows[primary].max().exp()) >= threshold:
        return rows[primary], False
    return fuse_logprobs(rows, weights), True


def temper(rows: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    """rows [M, C] log-probs, temperatures [M] -> [M, C] log softmax(rows_i / T_i) (temperature scaling)."""
    return torch.log_softmax(rows / temperatures[:, None], dim=-1)


TEMPERATURES = np.geomspace(0.05, 20.0, 241)  # the grid `fit_temperature` searches (≈ 2.5% apart)


def fit_temperature(logp: list[np.ndarray], gold: np.ndarray) -> float:
    """Per-item log choice distributions [C_n] and gold [N] -> T minimizing Σ_n −log softmax(logp_n / T)[gold_n] (grid)."""
    def nll(t: float) -> float:
        return -sum(float(torch.log_softmax(torch.from_numpy(lp / t), 0)[g]) for lp, g in zip(logp, gold))

    return float(min(TEMPERATURES, key=nll))


def fit_weights(p_gold: np.ndarray, steps: int = 200) -> np.ndarray:
    """p_gold [N, M] probability each model gives the gold choice -> w [M] on the simplex maximizing
    Σ_n log Σ_i w_i p_gold[n, i] (EM for mixture weights: w_i ← mean_n of model i's responsibility)."""
    n, m = p_gold.shape
    w = np.full(m, 1.0 / m)
    for _ in range(steps):
        mix = p_gold * w  # [N, M]
        w = (mix / np.maximum(mix.sum(1, keepdims=True), 1e-300)).mean(0)
    return w


@dataclass
class Vocabs:
    """How the models' vocabularies line up for one fusion: maps, union and union ids per model."""

    same: bool
    maps: list[TokenMap]
    union: UnionVocab | None  # None when `same`
    index: list[torch.Tensor]  # per model, [V_i] union ids (same: the identity)


_MAPS: dict[tuple[str, int], TokenMap] = {}
_VOCABS: dict[tuple, Vocabs] = {}


async def token_map(backend: ModelBackend) -> tuple[tuple[str, int], TokenMap]:
    """The model's `TokenMap` and its cache key, built once per (model name, vocabulary size)."""
    info = await backend.info()
    key = (info.name, info.vocab_size)
    if key not in _MAPS:
        strings = await backend.token_strings()
        _MAPS[key] = TokenMap.build(strings, eos_ids=info.eos_token_ids, special_ids=info.special_token_ids)
    return key, _MAPS[key]


async def line_up(backends: list[ModelBackend], mode: str) -> Vocabs:
    """How the models' vocabularies line up, built once per (models, mode): the union takes ~0.3 s for 49k + 262k."""
    keyed = await asyncio.gather(*(token_map(b) for b in backends))
    key = (mode, *(k for k, _ in keyed))
    if key not in _VOCABS:
        _VOCABS[key] = _line_up([m for _, m in keyed], mode)
    return _VOCABS[key]


def _line_up(maps: list[TokenMap], mode: str) -> Vocabs:
    same = all(m.keys == maps[0].keys for m in maps)
    if mode == "same" and not same:
        raise ConfigError("fuse mode 'same' needs identical vocabularies; these models differ (use mode 'union')")
    if mode != "union" and same:
        ident = torch.arange(len(maps[0].keys))
        return Vocabs(True, maps, None, [ident] * len(maps))
    union = UnionVocab.build(maps)
    return Vocabs(False, maps, union, [torch.from_numpy(i) for i in union.index])


def step_rows(lps: list, voc: Vocabs, size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The models' log-probs (all [V_i] arrays, or all TopK) -> ([M, C] rows, [C] fusion-space ids, None when C is all U ids).

    With top k (every model is asked for the same k), C is the set of ids some model proposed: every
    other id is -inf in every row (p = 0 there), so fusing, sampling and normalizing over C equals
    doing it over all U, at the cost of ~2k entries instead of the 300k-wide union.
    """
    # torch.tensor copies: arrays from a remote backend are read-only
    if isinstance(lps[0], TopK):
        ids = [voc.index[i][torch.tensor(np.asarray(lp.ids), dtype=torch.int64)] for i, lp in enumerate(lps)]
        cand = torch.unique(torch.cat(ids))
        cand = cand[cand >= 0]
        compact = [torch.where(u >= 0, torch.searchsorted(cand, u), -1) for u in ids]
        rows = [to_union(torch.tensor(np.asarray(lp.logprobs)), c, len(cand)) for lp, c in zip(lps, compact)]
        return torch.stack(rows), cand
    rows = [torch.tensor(np.asarray(lp), dtype=torch.float32) for lp in lps]  # [V_i] each
    return torch.stack(rows if voc.same else [to_union(r, voc.index[i], size) for i, r in enumerate(rows)]), None


def own_choice(ids: list[int], lp) -> int:
    """Among a model's tokens spelling the chosen key, its most likely one."""
    if len(ids) == 1:
        return ids[0]
    if isinstance(lp, TopK):
        ranked = {int(i): float(v) for i, v in zip(lp.ids, lp.logprobs)}
        return max(ids, key=lambda i: ranked.get(i, float("-inf")))
    return max(ids, key=lambda i: float(lp[i]))


async def tokenize_piece(backend: ModelBackend, m: TokenMap, key: Key, lp, anchor: list[int]) -> list[int]:
    """The model's own token ids for the chosen key (empty when it has no such special token)."""
    if key in m.ids_of:
        return [own_choice(m.ids_of[key], lp)]
    if isinstance(key, str):
        return []
    try:
        text = key.decode("utf-8")
    except UnicodeDecodeError:
        return greedy_split(key, m)
    ids = await backend.encode(ANCHOR + text, add_special_tokens=False)
    if ids[: len(anchor)] == anchor and len(ids) > len(anchor):
        return ids[len(anchor) :]
    return greedy_split(key, m)


@register
class Fuse(Strategy):
    name = "fuse"
    min_models = 1
    Params = FuseParams

    def weights(self, names: list[str]) -> torch.Tensor:
        w = self.params.weights or [1.0] * len(names)
        if len(w) != len(names) or any(x < 0 for x in w) or sum(w) <= 0:
            raise ConfigError(f"fuse weights {w} must be {len(names)} non-negative numbers with a positive sum")
        t = torch.tensor(w, dtype=torch.float32)
        return t / t.sum()

    def temperatures(self, names: list[str]) -> torch.Tensor:
        t = self.params.temperatures or [1.0] * len(names)
        if len(t) != len(names) or any(not x > 0 for x in t):
            raise ConfigError(f"fuse temperatures {t} must be {len(names)} positive numbers, one per model {names}")
        return torch.tensor(t, dtype=torch.float32)

    def primary_index(self, names: list[str]) -> int:
        p = self.params.primary
        if p is not None and p not in names:
            raise ConfigError(f"fuse primary {p!r} is not one of the models {names}")
        return names.index(p) if p is not None else 0

    async def choose(self, models: dict[str, ModelBackend], context: str, choices: list[str]) -> ChoiceDecision:
        """Multiple choice: p(c) = Σ_i w_i p_i(c) over the models' (tempered) choice distributions, the
        sequence-level counterpart of token fusion (or the primary's alone when it is sure, in threshold mode)."""
        names = list(models)
        temperatures = self.temperatures(names)
        probs = await asyncio.gather(*(choice_probs(models[n], context, choices) for n in names))
        rows = temper(torch.log(torch.tensor(np.stack(probs), dtype=torch.float32)), temperatures)
        fused, did_fuse = fuse_step(rows, self.weights(names), self.primary_index(names), self.params.threshold)
        return ChoiceDecision(int(torch.argmax(fused)), {"fused": did_fuse})

    async def run(self, models: dict[str, ModelBackend], request: Request, emit: Emit | None = None) -> StrategyResult:
        names = list(models)
        backends = [models[n] for n in names]
        p = self.params
        primary = self.primary_index(names)
        weights = self.weights(names)
        voc = await line_up(backends, p.mode)
        top_k = None if voc.same else p.top_k
        size = len(voc.maps[0].keys) if voc.same else voc.union.size
        prompts = await asyncio.gather(*(render_prompt(b, request) for b in backends))
        prompt_ids = await asyncio.gather(*(b.encode(t) for b, t in zip(backends, prompts)))
        anchors = await asyncio.gather(*(b.encode(ANCHOR, add_special_tokens=False) for b in backends))
        params = request.params
        gen = make_generator(params.seed)
        sessions: list[str | None] = [None] * len(backends)
        out_ids: list[list[int]] = [[] for _ in backends]
        chosen_lp: list[float] = []
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        text, finish, fused_steps, emitted = "", "length", 0, 0
        hold = max(map(len, params.stop), default=1) - 1  # text that may still become a stop string is not streamed yet
        try:
            starts = await asyncio.gather(
                *(b.open_session(ids, top_k=top_k) for b, ids in zip(backends, prompt_ids)), return_exceptions=True
            )
            for i, s in enumerate(starts):
                sessions[i] = None if isinstance(s, BaseException) else s.session_id
            for s in starts:
                if isinstance(s, BaseException):
                    raise s
            lps = [s.logprobs for s in starts]
            for _ in range(params.max_tokens):
                rows, cand = step_rows(lps, voc, size)
                fused, did_fuse = fuse_step(rows, weights, primary, p.threshold)
                fused_steps += did_fuse
                c = sample(process_logits(fused, params), params, gen)
                chosen_lp.append(float(fused[c] - torch.logsumexp(fused, 0)))
                u = c if cand is None else int(cand[c])
                key = voc.maps[0].keys[u] if voc.same else voc.union.keys[u]
                if key == EOS and not params.ignore_eos:
                    for i, lp in enumerate(lps):
                        out_ids[i].append(own_choice(voc.maps[i].ids_of[EOS], lp) if EOS in voc.maps[i].ids_of else u)
                    finish = "stop"
                    break
                if voc.same:
                    feeds = [[u]] * len(backends)
                else:
                    feeds = await asyncio.gather(
                        *(tokenize_piece(b, voc.maps[i], key, lps[i], anchors[i]) for i, b in enumerate(backends))
                    )
                for i, ids in enumerate(feeds):
                    out_ids[i] += ids
                if isinstance(key, bytes):
                    text += decoder.decode(key)
                    if params.stop and any(s in text for s in params.stop):
                        cut = min(text.index(s) for s in params.stop if s in text)
                        text, finish, decoder = text[:cut], "stop", None
                        break
                    if emit is not None and len(text) - hold > emitted:
                        await emit(text[emitted : len(text) - hold])
                        emitted = len(text) - hold
                moved = [i for i, ids in enumerate(feeds) if ids]
                new = await asyncio.gather(*(backends[i].append(sessions[i], feeds[i], top_k=top_k) for i in moved))
                for i, lp in zip(moved, new):
                    lps[i] = lp
            if decoder is not None:
                text += decoder.decode(b"", final=True)
            if emit is not None and len(text) > emitted:
                await emit(text[emitted:])
        finally:
            await asyncio.gather(*(b.close_session(s) for b, s in zip(backends, sessions) if s is not None))
        return StrategyResult(
            text=text,
            finish_reason=finish,
            usage=Usage(len(prompt_ids[primary]), len(chosen_lp)),
            token_ids=out_ids[primary],
            logprobs=chosen_lp,
            meta={
                "output_model": names[primary],
                "collab": {
                    "mode": "same" if voc.same else "union",
                    "union_size": size,
                    "weights": dict(zip(names, weights.tolist())),
                    "steps": len(chosen_lp),
                    "fused_steps": fused_steps,
                    "top_k": top_k,
                    "threshold": p.threshold,
                },
            },
        )
