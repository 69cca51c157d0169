import pytest
from conftest import run

from collab_ray.core.pipeline import Pipeline
from collab_ray.core.sampling import SamplingParams
from collab_ray.core.strategy import Request
from collab_ray.ensemble.vote import extract_choice, extract_number, extract_text, majority_vote


def test_extractors():
    assert extract_choice("The answer is (C).") == "C"
    assert extract_choice("B. because plants need light") == "B"
    assert extract_choice("I think it's D") == "D"
    assert extract_choice("no letter here") is None
    assert extract_choice("The answer is a dog, so B") == "B"  # the letter must be a capital
    assert extract_number("3 apples and then 1,250.0 more") == "1250"
    assert extract_number("none") is None
    assert extract_text("\n  The Eiffel Tower!\nmore") == "eiffel tower"


def test_majority_vote_weights_and_ties():
    d = majority_vote(["A", "B", "B", None, "A", "A"], [1, 1, 1, 1, 1, 1])
    assert (d.answer, d.index, d.counts) == ("A", 0, {"A": 3, "B": 2})
    assert majority_vote(["A", "B", "B"], [3, 1, 1]).answer == "A"  # one heavy model outvotes two
    assert majority_vote(["B", "A"], [1, 1]).answer == "B"  # tie: the first seen
    assert majority_vote([None, None], [1, 1]).answer is None


def test_vote_pipeline_counts_samples_of_every_model(backends):
    models = backends(a="tiny:llama-bpe", b="tiny:llama-sp")
    params = SamplingParams(max_tokens=6, temperature=0.8, seed=1)
    out = run(Pipeline("vote", models, {"samples": 3, "weights": {"a": 2.0}}).run(Request(prompt="The cat", params=params)))
    c = out.meta["collab"]
    assert [len(v) for v in c["answers"].values()] == [3, 3]
    assert sum(c["counts"].values()) == pytest.approx(sum(2.0 if m == "a" else 1.0 for m, v in c["answers"].items() for a in v if a))
    assert out.meta["models"]["a"]["calls"] == 1 and out.meta["models"]["b"]["calls"] == 1  # samples batched


def test_vote_refuses_weights_of_unknown_models(backends):
    models = backends(a="tiny:llama-bpe", b="tiny:llama-sp")
    with pytest.raises(ValueError, match="'c'"):
        run(Pipeline("vote", models, {"weights": {"c": 1}}).run(Request(prompt="x")))
