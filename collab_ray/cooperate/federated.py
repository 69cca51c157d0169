"""`federated`: federated prompting — the private prompt stays local. The local side replaces the
private spans it finds (e-mail addresses, URLs, numbers, names and configured private terms) with
placeholders, the remote (large) model answers the generic prompt, and the local side puts the
specifics back into the answer (the survey's "federated cooperation"; Guo et al. 2023,
"Federated Prompting and Chain-of-Thought Reasoning"; Mireshghallah et al. 2023, on PII leakage).

A remote model may write placeholders of its own ("The capital of [NAME_1] is [NAME_2].", where only
[NAME_1] was sent), or stop in the middle of one. No placeholder ever reaches the user: the known
ones are restored, and the local model (which may read the private prompt) writes the words of each
invented one from the prompt and the answer so far; one it cannot fill is dropped
(`meta["invented"]`).

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
from collab_ray.core.sampling import SamplingParams
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
# "[NAME_1]" (in brackets: any case, "_" or " " or nothing before the number) or a bare "NAME_1"
PLACEHOLDER = re.compile(
    r"\[(?i:(EMAIL|URL|NUMBER|NAME|PRIVATE))[_ ]?(\d+)\]|\[?\b(EMAIL|URL|NUMBER|NAME|PRIVATE)_(\d+)\b\]?"
)
# a placeholder the remote model began when max_tokens ran out ("… is [NAM")
CUT_PLACEHOLDER = re.compile(r"\s*\[(?:EMAIL|URL|NUMBER|NAME|PRIVATE|[A-Z]{1,7})?(?:_\d*)?$", re.I)
FILL_END = re.compile(r"[\n.,;:!?\[\]()\"]")  # a repaired span ends at the first of these
MAX_FILL_TOKENS = 8


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


def _key(m: re.Match) -> str:
    """The table key of a placeholder match: "[name 2]" -> "[NAME_2]"."""
    return f"[{(m.group(1) or m.group(3)).upper()}_{m.group(2) or m.group(4)}]"


def restore(text: str, table: dict[str, str]) -> str:
    """Put the originals back for every placeholder of `table` (with or without its brackets, any case);
    placeholders not in the table are left as they are (`repair` handles those)."""
    return PLACEHOLDER.sub(lambda m: table.get(_key(m), m.group(0)), text)


def unknown_placeholders(text: str, table: dict[str, str]) -> list[re.Match]:
    """Placeholders in `text` that `table` does not hold: ones the remote model made up."""
    return [m for m in PLACEHOLDER.finditer(text) if _key(m) not in table]


def drop_span(text: str, start: int, end: int) -> str:
    """`text` without [start, end), the spaces around the cut tidied ("is [X]." -> "is.")."""
    before, after = text[:start].rstrip(), text[end:].lstrip()
    if before and after and not re.match(r"[.,;:!?)\]]", after):
        return f"{before} {after}"
    return before + after


def clean_fill(text: str) -> str:
    """The words a local model wrote for a placeholder: up to the first punctuation or line end."""
    fill = FILL_END.split(text.strip(), maxsplit=1)[0].strip()
    return "" if not fill or PLACEHOLDER.search(fill) else fill


async def repair(local: ModelBackend, context: str, text: str, table: dict[str, str]) -> tuple[str, dict, list[str]]:
    """Restore `text` and fix the placeholders the remote model invented: the local model, which may see
    the private prompt, writes each one's words from `context` (the private prompt rendered for it) and the
    answer so far; one it cannot fill is dropped. Returns (text, {invented: fill}, [dropped])."""
    text = CUT_PLACEHOLDER.sub("", restore(text, table))
    repaired: dict[str, str] = {}
    dropped: list[str] = []
    params = SamplingParams(temperature=0, max_tokens=MAX_FILL_TOKENS)
    while found := unknown_placeholders(text, table):
        m = found[0]
        prefix = text[: m.start()].rstrip()
        (gen,) = await local.generate([context + (" " if prefix and not context[-1:].isspace() else "") + prefix], params)
        fill = clean_fill(gen.text)
        if fill:
            repaired[m.group(0)] = fill
            text = f"{text[: m.start()].rstrip()} {fill}{text[m.end():]}" if m.start() else fill + text[m.end() :]
        else:
            dropped.append(m.group(0))
            text = drop_span(text, m.start(), m.end())
    return text, repaired, dropped


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
        text = restore(gen.text, table)
        repaired: dict[str, str] = {}
        dropped: list[str] = []
        if unknown_placeholders(text, table) or CUT_PLACEHOLDER.search(text):
            context = await render_prompt(local, request)  # the private prompt: it never leaves the local model
            text, repaired, dropped = await repair(local, context, text, table)
        meta = {
            "output_model": "remote",
            "sent_remote": [sent],
            "masked": {kind: kinds.count(kind) for kind in sorted(set(kinds))},
            "invented": {"repaired": repaired, "dropped": dropped},
        }
        return await answer(gen, emit, meta, text)
