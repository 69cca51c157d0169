"""`detect` (agreement, checker, retriever) and `federated` (no private span leaves the machine)."""

import dataclasses
import re

import pytest

from collab_ray.core import ConfigError, SamplingParams
from collab_ray.core.pipeline import Pipeline
from collab_ray.core.strategy import Request
from collab_ray.cooperate.detect import agreement, token_f1
from collab_ray.cooperate.federated import restore
from conftest import run

PASSAGES = ["The river runs past the old mill.", "Gulls circle above the harbour wall.", "The baker opens the shop."]


def detect(models, prompt, params, **strategy_params):
    return run(Pipeline("detect", models, strategy_params).run(Request(prompt=prompt, params=params)))


def test_agreement_picks_the_medoid():
    assert token_f1("The old mill.", "the old MILL") == 1.0 and token_f1("a b", "c d") == 0.0
    best, score = agreement(["the old mill", "the mill", "a red boat"])
    assert best == 0 and score == pytest.approx((0.8 + 0.0) / 2)
    assert agreement(["only"]) == (0, 1.0)


def test_identical_answers_agree_and_divergent_samples_are_flagged(backends):
    models = backends(a="tiny:llama-bpe", b="tiny:llama-bpe")
    greedy = detect(models, "The river runs", SamplingParams(max_tokens=12), temperature=0.0, samples=2)
    (expected,) = run(models["a"].generate(["The river runs"], SamplingParams(temperature=0, max_tokens=12)))
    assert greedy.text == expected.text and greedy.meta["agreement"] == 1.0 and not greedy.meta["flagged"]
    assert len(greedy.meta["samples"]) == 4
    hot = detect(models, "The river runs", SamplingParams(max_tokens=12, seed=3), temperature=2.0, samples=3)
    assert hot.meta["agreement"] < 0.5 and hot.meta["flagged"]
    assert hot.text in [s["text"] for s in hot.meta["samples"]]


def test_retriever_ranks_passages_and_checker_scores_support(backends):
    models = backends(answer="tiny:llama-bpe", judge="tiny:llama-bpe-small")
    question = "Where does the river run?"
    params = SamplingParams(max_tokens=8, seed=1)
    result = detect(models, question, params, retriever="judge", checker="judge", passages=PASSAGES, top_passages=2)
    scored = run(models["judge"].loglikelihood([(f"{p}\n\nQuestion:", f" {question}") for p in PASSAGES]))
    relevance = [r.logprob / r.num_tokens for r in scored]
    assert result.meta["passages"] == sorted(range(3), key=lambda i: -relevance[i])[:2]
    assert 0.0 <= result.meta["support"] <= 1.0
    assert result.meta["score"] == pytest.approx((result.meta["agreement"] + result.meta["support"]) / 2)
    assert {s["model"] for s in result.meta["samples"]} == {"answer"}  # the checker does not answer
    with pytest.raises(ConfigError, match="'nobody'"):
        detect(models, question, params, checker="nobody")


class Recorder:
    """Forwards to a backend and keeps every text and token id it was sent."""

    def __init__(self, inner):
        self.inner = inner
        self.sent: list[str] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def _text(self, items):
        for item in items:
            self.sent.append(item if isinstance(item, str) else await self.inner.decode(item))

    async def generate(self, prompts, params):
        await self._text(prompts)
        return await self.inner.generate(prompts, params)

    async def encode(self, text, add_special_tokens=True):
        await self._text([text])
        return await self.inner.encode(text, add_special_tokens)


PRIVATE = {
    "Bob Miller called me yesterday about the loan.": ["Bob", "Miller"],
    "My name is Alice Johnson and my e-mail is alice.j@example.com.": ["Alice", "Johnson", "alice.j@example.com", "example"],
    "Call me on +1 415-555-0199, I was born in 1984.": ["415", "555", "0199", "1984"],
    "Alice wants the statement of account 12345678 sent to www.acme-bank.example/private.": ["12345678", "acme"],
}


@pytest.mark.parametrize("chat", [False, True])
def test_federated_never_sends_a_private_span(backends, chat):
    models = backends(local="tiny:llama-bpe-small", remote="tiny:llama-bpe")
    remote = Recorder(models["remote"])
    text = " ".join(PRIVATE) + " Please write a short letter to the bank."
    params = SamplingParams(temperature=0, max_tokens=12)
    request = Request(messages=[{"role": "user", "content": text}], params=params) if chat else Request(prompt=text, params=params)
    result = run(Pipeline("federated", {"local": models["local"], "remote": remote}).run(request))
    sent = "\n".join(result.meta["sent_remote"])
    assert sent in remote.sent  # the metadata is what the remote model really got
    for span in (s for spans in PRIVATE.values() for s in spans):
        assert not any(span in s for s in remote.sent), span
    assert "Please write a short letter" in sent  # the generic part goes through unchanged
    assert result.meta["masked"]["EMAIL"] == 1 and result.meta["masked"]["NUMBER"] >= 3
    assert not re.search(r"\[(NAME|EMAIL|NUMBER|URL)_\d+\]", result.text)


def test_restore_puts_the_specifics_back():
    table = {"[NAME_1]": "Alice", "[EMAIL_1]": "a@b.org"}
    assert restore("Dear [NAME_1], write to EMAIL_1 or [NAME_2].", table) == "Dear Alice, write to a@b.org or [NAME_2]."


@pytest.mark.real
def test_federated_truecasing_masks_names_not_sentence_openers(smollm2):
    from collab_ray.cooperate.federated import Federated

    text = "What is the capital of France? Answer in one sentence. Alice wants it. Please send it to Priya."
    found = {text[s:e] for s, e, kind in run(Federated().find(smollm2, text)) if kind == "NAME"}
    assert found == {"France", "Alice", "Priya"}


class Inventing(Recorder):
    """A remote model that answers with placeholders of its own, as small chat models do."""

    def __init__(self, inner, answer):
        super().__init__(inner)
        self.answer = answer

    async def generate(self, prompts, params):
        await self._text(prompts)
        (g,) = await self.inner.generate(prompts[:1], params)
        return [dataclasses.replace(g, text=self.answer, token_ids=[], logprobs=[]) for _ in prompts]


class Filling:
    """A local model that writes `fill` wherever it is asked to continue (and forwards the rest)."""

    def __init__(self, inner, fill):
        self.inner, self.fill, self.asked = inner, fill, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def generate(self, prompts, params):
        self.asked += prompts
        (g,) = await self.inner.generate(prompts[:1], params)
        return [dataclasses.replace(g, text=self.fill, token_ids=[], logprobs=[]) for _ in prompts]


@pytest.mark.parametrize("fill", [" Paris, of course.", " [NAME_7]", ""])
def test_federated_never_emits_a_placeholder_it_did_not_make(backends, fill):
    models = backends(local="tiny:llama-bpe-small", remote="tiny:llama-bpe")
    remote = Inventing(models["remote"], "The capital of [NAME_1] is [NAME_2]. Ask [name 3] [PRIVATE_9")
    local = Filling(models["local"], fill)
    request = Request(messages=[{"role": "user", "content": "What is the capital of France?"}], params=SamplingParams(max_tokens=16))
    result = run(Pipeline("federated", {"local": local, "remote": remote}).run(request))
    assert "France" not in "\n".join(remote.sent)
    assert not re.search(r"(?i)\[?(NAME|EMAIL|NUMBER|URL|PRIVATE)[_ ]?\d*\]?", result.text), result.text
    assert result.text.startswith("The capital of France is")
    invented = result.meta["invented"]
    if fill == " Paris, of course.":  # the local model's words, up to the first punctuation
        assert result.text == "The capital of France is Paris. Ask Paris" and invented["repaired"] == {"[NAME_2]": "Paris", "[name 3]": "Paris"}
        assert local.asked[0].endswith("The capital of France is") and "What is the capital of France?" in local.asked[0]
    else:  # nothing usable (a placeholder again, or nothing): dropped, the sentence tidied
        assert result.text == "The capital of France is. Ask" and invented["dropped"] == ["[NAME_2]", "[name 3]"]


def test_restore_is_lenient_about_brackets_and_case_but_not_about_prose():
    table = {"[NAME_1]": "Alice", "[NUMBER_2]": "42"}
    assert restore("[name 1] has [Number_2] and NAME_1.", table) == "Alice has 42 and Alice."
    assert restore("the number 2 and name 1", table) == "the number 2 and name 1"
