"""Metrics: exact match, acc_norm choice scores, accuracy with a confidence interval, paired tests."""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower-case, drop punctuation and articles, collapse whitespace (SQuAD / TriviaQA evaluation)."""
    return " ".join(_ARTICLES.sub(" ", s.lower().translate(_PUNCT)).split())


def exact_match(prediction: str, answers: Sequence[str]) -> bool:
    """The prediction's first non-empty line equals one of the reference answers after normalization."""
    lines = [line for line in prediction.strip().splitlines() if line.strip()]
    pred = normalize_answer(lines[0]) if lines else ""
    return pred != "" and pred in {normalize_answer(a) for a in answers}


def acc_norm_scores(logprobs: Sequence[float], choices: Sequence[str]) -> list[float]:
    """log P(choice | context) / len(choice in bytes), lm-eval-harness `acc_norm` (Gao et al. 2021)."""
    return [lp / max(1, len(c.encode("utf-8"))) for lp, c in zip(logprobs, choices)]


@dataclass
class Accuracy:
    value: float
    low: float  # 95% Wilson score interval
    high: float
    n: int

    def __str__(self) -> str:
        return f"{100 * self.value:.1f}% [{100 * self.low:.1f}, {100 * self.high:.1f}]"


def accuracy(correct: Sequence[bool], z: float = 1.96) -> Accuracy:
    """Mean of `correct` with its Wilson score interval (Wilson 1927)."""
    n = len(correct)
    if n == 0:
        raise ValueError("accuracy of an empty list")
    p = sum(map(bool, correct)) / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return Accuracy(p, max(0.0, centre - half), min(1.0, centre + half), n)


@dataclass
class Paired:
    diff: float  # accuracy of a minus accuracy of b
    a_only: int  # items only a gets right
    b_only: int
    p_value: float  # exact two-sided McNemar (binomial on the discordant pairs)


def paired_comparison(a: Sequence[bool], b: Sequence[bool]) -> Paired:
    """Compare two pipelines on the same items with McNemar's exact test (McNemar 1947): a two-sided
    binomial test of the discordant pairs."""
    if len(a) != len(b):
        raise ValueError(f"paired comparison needs the same items, got {len(a)} and {len(b)} results")
    from scipy.stats import binomtest  # seconds to import: only where a test runs

    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    n = a_only + b_only
    p = binomtest(a_only, n, 0.5).pvalue if n else 1.0
    return Paired((a_only - b_only) / len(a), a_only, b_only, float(p))
