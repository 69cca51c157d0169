"""Multiple-choice answering through a model: the distribution over choices from log-likelihoods.

Strategies that can answer multiple-choice items define `async choose(models, context, choices)
-> ChoiceDecision`; the eval harness calls it (and answers `single` pipelines with `model_choice`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from collab_ray.core.backend import ModelBackend
from collab_ray.eval.metrics import acc_norm_scores


@dataclass
class ChoiceDecision:
    index: int  # the chosen choice
    meta: dict = field(default_factory=dict)  # what the strategy decided (as in a response's `collab`)


def choice_pairs(context: str, choices: list[str]) -> list[tuple[str, str]]:
    """(context, " " + choice) requests, lm-eval-harness style."""
    return [(context, " " + c) for c in choices]


async def choice_probs(backend: ModelBackend, context: str, choices: list[str]) -> np.ndarray:
    """[C] softmax over the choices' acc_norm scores (log-likelihood per byte): the model's choice distribution."""
    rs = await backend.loglikelihood(choice_pairs(context, choices))
    s = np.array(acc_norm_scores([r.logprob for r in rs], choices), dtype=np.float64)
    e = np.exp(s - s.max())
    return e / e.sum()


async def model_choice(backend: ModelBackend, context: str, choices: list[str]) -> ChoiceDecision:
    """A single model's answer: argmax acc_norm."""
    p = await choice_probs(backend, context, choices)
    return ChoiceDecision(int(np.argmax(p)), {"confidence": float(p.max())})
