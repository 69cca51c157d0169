"""`vote`: majority vote / self-consistency over answers extracted from samples of several models
(Wang et al. 2023, self-consistency; weighted by model as in LLM-Blender-style ensembles).

Free-form answers rarely match exactly, so `extract: consensus` votes by similarity instead: each
sample scores the weighted unigram F1 it shares with the others, and the most agreed-with sample
wins (a medoid, as in minimum-Bayes-risk decoding and universal self-consistency). A sample that
only repeats the question does not vote. The response is one sample, so its length is bounded
by `max_tokens`; every sample's tokens are counted per model in the metadata.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from collab_ray.cooperate.detect import token_f1
from collab_ray.core.decoding import user_text
from collab_ray.core.strategy import Emit, Request, Strategy, StrategyResult, register
from collab_ray.ensemble.common import pick, repeats_question, respond, sample_models
from collab_ray.eval.choice import ChoiceDecision, choice_probs
from collab_ray.eval.metrics import normalize_answer

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_choice(text: str, letters: str = "ABCDE") -> str | None:
    """The multiple-choice letter a text picks: 'answer is X', '(X)', a leading 'X.'/'X)', else a lone capital."""
    cls = f"[{re.escape(letters)}]"
    for pattern in (rf"(?i:answer\s*(?:is|:)?)\s*\(?({cls})\b", rf"\(({cls})\)", rf"^\s*({cls})[.):]", rf"\b({cls})\b"):
        m = re.search(pattern, text)
        if m:
            return m.group(1).upper()
    return None


def extract_number(text: str) -> str | None:
    """The last number in the text, without thousands separators or a trailing '.0' (GSM8K convention)."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    n = found[-1].replace(",", "")
    return n[:-2] if n.endswith(".0") else n


def extract_text(text: str) -> str | None:
    """The first non-empty line, normalized like SQuAD/TriviaQA exact match."""
    for line in text.strip().splitlines():
        norm = normalize_answer(line)
        if norm:
            return norm
    return None


EXTRACTORS: dict[str, Callable[[str], str | None]] = {"choice": extract_choice, "number": extract_number, "text": extract_text}


@dataclass
class VoteDecision:
    answer: str | None  # the winning answer (None when no sample had one)
    index: int  # the first sample giving it (its text is the response)
    counts: dict[str, float] = field(default_factory=dict)  # answer -> summed weight


def majority_vote(answers: list[str | None], weights: list[float]) -> VoteDecision:
    """argmax_a Σ_i w_i [answers_i = a]; ties go to the answer seen first; None answers do not vote."""
    counts: Counter = Counter()
    for a, w in zip(answers, weights):
        if a is not None:
            counts[a] += w
    if not counts:
        return VoteDecision(None, 0, {})
    best = max(counts.values())
    answer = next(a for a in answers if a is not None and counts[a] == best)
    return VoteDecision(answer, answers.index(answer), dict(counts))


def consensus_vote(texts: list[str], weights: list[float], voting: list[bool] | None = None) -> VoteDecision:
    """argmax_i Σ_{j≠i} w_j F1(text_i, text_j) over the voting samples (all by default); ties go to the first.

    `counts` maps each voting sample's index (as a string) to its agreement score.
    """
    voting = voting if voting is not None else [True] * len(texts)
    idx = [i for i, v in enumerate(voting) if v]
    if not idx:
        return VoteDecision(None, 0, {})
    if len(idx) == 1:
        return VoteDecision(texts[idx[0]], idx[0], {str(idx[0]): 0.0})
    score = {i: sum(weights[j] * token_f1(texts[i], texts[j]) for j in idx if j != i) for i in idx}
    best = max(idx, key=lambda i: (score[i], -i))
    return VoteDecision(texts[best], best, {str(i): round(s, 4) for i, s in score.items()})


class VoteParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    samples: int = Field(1, ge=1, le=64, description="Completions drawn from each model.")
    temperature: float | None = Field(
        None, ge=0.0, le=100.0, description="Sampling temperature of the votes; default the request's."
    )
    extract: Literal["choice", "number", "text", "consensus"] = Field(
        "text",
        description="How samples vote: by their multiple-choice letter, last number, or normalized first line (exact "
        "match), or `consensus`: the sample sharing the most words with the others wins (free-form answers).",
    )
    weights: dict[str, float] | None = Field(None, description="Vote weight per model name; default 1 each.")


@register
class Vote(Strategy):
    name = "vote"
    min_models = 1
    Params = VoteParams

    async def choose(self, models, context: str, choices: list[str]) -> ChoiceDecision:
        """Multiple choice: each model votes for its acc_norm choice; ties go to the most confident voter."""
        names = list(models)
        weights = self.params.weights or {}
        pick(models, list(weights), "vote weights")
        probs = await asyncio.gather(*(choice_probs(models[n], context, choices) for n in names))
        order = sorted(range(len(names)), key=lambda i: -probs[i].max())
        d = majority_vote([str(int(np.argmax(probs[i]))) for i in order], [weights.get(names[i], 1.0) for i in order])
        return ChoiceDecision(int(d.answer), {"counts": d.counts})

    async def run(self, models, request: Request, emit: Emit | None = None) -> StrategyResult:
        p = self.params
        weights = p.weights or {}
        pick(models, list(weights), "vote weights")
        gens = await sample_models(models, list(models), request, p.samples, p.temperature)
        flat = [(name, g) for name, gs in gens.items() for g in gs]
        w = [weights.get(name, 1.0) for name, _ in flat]
        question = user_text(request)
        voting = [not repeats_question(g.text, question) for _, g in flat]
        if p.extract == "consensus":
            answers = [g.text.strip() for _, g in flat]
            decision = consensus_vote(answers, w, voting if any(voting) else None)
        else:
            extract = EXTRACTORS[p.extract]
            answers = [extract(g.text) if v or not any(voting) else None for (_, g), v in zip(flat, voting)]
            decision = majority_vote(answers, w)
        name, chosen = flat[decision.index]
        collab = {
            "answer": decision.answer,
            "counts": decision.counts,
            "answers": {m: [answers[i] for i, (n, _) in enumerate(flat) if n == m] for m in gens},
        }
        return await respond(chosen, name, collab, emit)
