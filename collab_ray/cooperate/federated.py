"""`federated`: federated prompting — the private prompt stays local. The local side replaces the
private spans it finds (e-mail addresses, URLs, numbers, names and configured private terms) with
placeholders, the remote (large) model answers the generic prompt, and the local side puts the
specifics back into the answer (the survey's "federated cooperation"; Guo et al. 2023,
"Federated Prompting and Chain-of-Thought Reasoning"; Mireshghallah et al. 2023, on PII leakage).

Names: a capitalized word inside a sentence is a name. A sentence's first word is one when it
comes right before a name ("Bob Miller"), or when the local model, reading it mid-sentence, prefers
it capitalized: log p(" Alice") − log p(" alice") after a neutral context is above `name_margin`
(an LM truecasing test; SmolLM2-135M gives names +4.6 to +12 and openers such as "What",
"Please", "Answer" −3 to −7). What was sent remotely is in `meta["sent_remote"]`.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field

from collab_ray.core.backend import ModelBackend
from collab_ray.core.decoding import answer
from collab_ray.core.strategy import (
    Emit,
    Request,
    Strategy,
    StrategyResult,
    register,
    render_prompt,
)

PATTERNS = {  # kind -> regex, matched in this order; earlier kinds win overlaps
    "EMAIL": r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+",
    "URL": r"(?:https?://|www\.)\S+",
    "NUMBER": r"\+?\d(?:[\d\s().\-/]*\d)?",
}
WORD = re.compile(r"\b[A-Z][\w'\-]*[A-Za-z]")
SENTENCE_START = re.compile(r"(?:^|[.!?:;\n]\s*|[\"(]\s*)$")
NAME_CONTEXT = "They talked about it, and"  # a mid-sentence spot where any word, name or not, may follow
PLACEHOLDER = re.compile(r"\[?\b(EMAIL|URL|NUMBER|NAME|PRIVATE)_(\d+)\b\]?")


def find_spans(text: str, terms: list[str]) -> list[tuple[int, int, str]]:
    """Rule-found private spans (start, end, kind), non-overlapping, in text order; names excluded."""
    spans: list[tuple[int, int, str]] = []

    def free(s, e):
        return all(e <= a or s >= b for a, b, _ in spans)

    for term in terms:
        spans += [(m.start(), m.end(), "PRIVATE") for m in re.finditer(re.escape(term), text) if free(m.start(), m.end())]
    for kind, pattern in PATTERNS.items():
        spans += [(m.start(), m.end(), kind) for m in re.finditer(pattern, text) if free(m.start(), m.end())]
    return sorted(spans)


def name_candidates(text: str, taken: list[tuple[int, int, str]]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Capitalized words outside `taken`: (inside sentences, at sentence starts)."""
    inside, starts = [], []
    for m in WORD.finditer(text):
        if any(m.start() < b and m.end() > a for a, b, _ in taken):
            continue
        (starts if SENTENCE_START.search(text[: m.start()]) else inside).append((m.start(), m.end()))
    return inside, starts


def mask(text: str, spans: list[tuple[int, int, str]], table: dict[str, str]) -> str:
    """Replace spans with placeholders [KIND_i]; `table` (placeholder -> original) is shared across
    texts, and every occurrence of an original gets its placeholder."""
    originals = {v: k for k, v in table.items()}
    for s, e, kind in spans:
        value = text[s:e]
        if value not in originals:
            placeholder = f"[{kind}_{sum(k.startswith(f'[{kind}_') for k in table) + 1}]"
            table[placeholder] = value
            originals[value] = placeholder
    for value in sorted(originals, key=len, reverse=True):  # longest first: "Alice Jones" before "Alice"
        text = re.sub(rf"(?<!\w){re.escape(value)}(?!\w)", originals[value], text)
    return text


def restore(text: str, table: dict[str, str]) -> str:
    """Put the originals back for every placeholder (with or without its brackets)."""
    return PLACEHOLDER.sub(lambda m: table.get(f"[{m.group(1)}_{m.group(2)}]", m.group(0)), text)


class FederatedParams(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name_margin: float = Field(
        0.0,
        description="A sentence's first capitalized word is masked as a name when the local model, mid-sentence, "
        "prefers it capitalized over lowercased by more than this many nats.",
    )
    private_terms: list[str] = Field(default_factory=list, description="Strings always masked (account names, project code names, ...).")


@register
class Federated(Strategy):
    name = "federated"
    roles = ("local", "remote")
    Params = FederatedParams

    async def find(self, local: ModelBackend, text: str) -> list[tuple[int, int, str]]:
        """Private spans of `text`: rules, plus names — sentence-initial ones judged by the local model."""
        spans = find_spans(text, [t for t in self.params.private_terms if t])
        inside, starts = name_candidates(text, spans)
        before_name = [(s, e) for s, e in starts if any(re.fullmatch(r"\s+", text[e:a]) for a, _ in inside)]
        rest = [w for w in starts if w not in before_name]
        if rest:
            words = [" " + text[s:e] for s, e in rest]
            scored = await local.loglikelihood([(NAME_CONTEXT, w) for w in words] + [(NAME_CONTEXT, w.lower()) for w in words])
            cased, lower = scored[: len(rest)], scored[len(rest) :]
            rest = [w for w, c, low in zip(rest, cased, lower) if c.logprob - low.logprob > self.params.name_margin]
        inside += before_name + rest
        return sorted(spans + [(s, e, "NAME") for s, e in inside])

    async def run(self, models: dict[str, ModelBackend], request: Request, emit: Emit | None = None) -> StrategyResult:
        local, remote = models["local"], models["remote"]
        table: dict[str, str] = {}
        texts = [request.prompt] if request.messages is None else [m["content"] for m in request.messages]
        spans = [await self.find(local, t) for t in texts]
        # names found anywhere are masked everywhere (a name opening one sentence and inside another)
        names = {t[s:e] for t, found in zip(texts, spans) for s, e, kind in found if kind == "NAME"}
        for text, found in zip(texts, spans):
            for name in names:
                found += [(m.start(), m.end(), "NAME") for m in re.finditer(rf"(?<!\w){re.escape(name)}(?!\w)", text)]
        masked = [mask(t, sorted(set(found)), table) for t, found in zip(texts, spans)]
        if request.messages is None:
            generic = Request(prompt=masked[0], params=request.params)
        else:
            generic = Request(messages=[{**m, "content": c} for m, c in zip(request.messages, masked)], params=request.params)
        sent = await render_prompt(remote, generic)
        (gen,) = await remote.generate([sent], request.params)
        kinds = [k[1:].rsplit("_", 1)[0] for k in table]
        meta = {
            "output_model": "remote",
            "sent_remote": [sent],
            "masked": {kind: kinds.count(kind) for kind in sorted(set(kinds))},
        }
        return await answer(gen, emit, meta, restore(gen.text, table))
