import pytest
from conftest import run

from collab_ray.core.pipeline import Pipeline
from collab_ray.core.sampling import SamplingParams
from collab_ray.core.strategy import Request
from collab_ray.core.types import LoglikelihoodResult
from collab_ray.ensemble.rank import best_of, judge_scores, mean_logprob, pairwise_scores

GREEDY = SamplingParams(max_tokens=6, temperature=0.0)


def test_mean_logprob_and_best_of():
    scores = [mean_logprob(LoglikelihoodResult(-6.0, 3, False)), mean_logprob(LoglikelihoodResult(-3.0, 3, False))]
    assert scores == [-2.0, -1.0]
    assert best_of(scores).index == 1
    assert best_of([1.0, 1.0]).index == 0  # ties: the first candidate


def test_pairwise_scores_cancel_position_bias():
    # the judge prefers whatever is shown first by +1, and truly prefers candidate 2 by 0.5 over each other
    true = [0.0, 0.0, 0.5]
    margins = [[1.0 + true[i] - true[j] if i != j else 0.0 for j in range(3)] for i in range(3)]
    s = pairwise_scores(margins)
    assert best_of(s).index == 2 and s[0] == pytest.approx(s[1])


def test_judge_scores_prefer_a_known_good_continuation(backends):
    judge = backends(j="tiny:llama-bpe")["j"]
    request = Request(prompt="The cat sat on", params=GREEDY)
    greedy = run(judge.generate(["The cat sat on"], GREEDY))[0].text
    scores = run(judge_scores(judge, request, ["qxz zqv xqz", greedy], "logprob"))
    assert best_of(scores).index == 1
    for scorer in ("yes_no", "pairwise"):
        assert len(run(judge_scores(judge, request, ["a", "b", "c"], scorer))) == 3


@pytest.mark.parametrize("scorer", ["logprob", "yes_no", "pairwise"])
def test_rank_pipeline(backends, scorer):
    models = backends(a="tiny:llama-bpe", b="tiny:llama-sp")
    out = run(Pipeline("rank", models, {"scorer": scorer, "judges": ["a"]}).run(Request(prompt="The cat", params=GREEDY)))
    c = out.meta["collab"]
    assert len(c["candidates"]) == 2 and c["candidates"][c["chosen"]]["model"] == out.meta["output_model"]
    assert out.meta["models"]["b"]["calls"] == 1  # b only generates; a generates and judges
