import math

import numpy as np
import pytest
from conftest import run

from collab_ray.core.pipeline import Pipeline
from collab_ray.core.sampling import SamplingParams
from collab_ray.core.strategy import Request
from collab_ray.core.types import Generation, Usage
from collab_ray.ensemble.cascade import agreement_confidence, calibrate, curve, mean_logprob_confidence, min_logprob_confidence, simulate, stop_stage

GREEDY = SamplingParams(max_tokens=6, temperature=0.0)
MODELS = dict(small="tiny:llama-bpe-small", mid="tiny:llama-sp", big="tiny:llama-bpe")


def test_confidence_signals():
    g = Generation("x", [1, 2], [-0.5, -1.5], "stop", Usage())
    assert mean_logprob_confidence(g) == -1.0 and min_logprob_confidence(g) == -1.5
    assert agreement_confidence(["a", "a", "b", None]) == 0.5


def test_stop_stage_on_fixtures():
    assert stop_stage([0.9, 0.2], [0.5, 0.5]) == 0
    assert stop_stage([0.1, 0.7], [0.5, 0.5]) == 1
    assert stop_stage([0.1, 0.2], [0.5, 0.5]) == 2  # none passes: the last stage


@pytest.mark.parametrize("threshold,stage", [(-math.inf, 0), (math.inf, 2)])
def test_infinite_thresholds_stop_first_or_reach_last(backends, threshold, stage):
    models = backends(**MODELS)
    for prompt in ("The cat", "Once upon a time", "Rivers"):
        out = run(Pipeline("cascade", models, {"thresholds": [threshold, threshold]}).run(Request(prompt=prompt, params=GREEDY)))
        assert out.meta["collab"]["stage"] == stage
        assert out.meta["output_model"] == list(MODELS)[stage]
        called = [m for m, s in out.meta["models"].items() if s["calls"]]
        assert called == list(MODELS)[: stage + 1]


def test_cascade_signals_run(backends):
    models = backends(small="tiny:llama-bpe-small", big="tiny:llama-bpe", judge="tiny:llama-sp")
    request = Request(prompt="The cat", params=GREEDY)
    agree = run(Pipeline("cascade", {k: models[k] for k in ("small", "big")}, {"signal": "agreement", "thresholds": [1.01]}).run(request))
    assert agree.meta["collab"]["stage"] == 1 and agree.meta["models"]["small"]["completion_tokens"] > 6
    verified = run(Pipeline("cascade", models, {"signal": "verifier", "verifier": "judge", "thresholds": [-math.inf]}).run(request))
    assert verified.meta["collab"]["stage"] == 0 and verified.meta["models"]["judge"]["calls"] == 1
    with pytest.raises(ValueError, match=r"\[0.5, 0.5\]"):
        run(Pipeline("cascade", {k: models[k] for k in ("small", "big")}, {"thresholds": [0.5, 0.5]}).run(request))


def fixture():
    # stage 0 is right exactly when it is confident (conf > 0.5); stage 1 is always right
    conf = np.array([[0.9, 0.0], [0.8, 0.0], [0.3, 0.0], [0.2, 0.0]])
    correct = np.array([[1, 1], [1, 1], [0, 1], [0, 1]], dtype=bool)
    return conf, correct


def test_simulate_and_calibrate_on_fixtures():
    conf, correct = fixture()
    p = simulate(conf, correct, [0.5])
    assert (p.accuracy, p.last_share, p.stage_counts) == (1.0, 0.5, [2, 2])
    assert simulate(conf, correct, [-math.inf]).accuracy == 0.5
    best = calibrate(conf, correct, target_accuracy=1.0)
    assert best.accuracy == 1.0 and best.last_share == 0.5  # the cheapest way to be always right
    cheap = calibrate(conf, correct, target_share=0.25)
    assert cheap.last_share <= 0.25 and cheap.accuracy == 0.75
    shares = [p.last_share for p in curve(conf, correct)]
    assert shares[0] == 0.0 and shares[-1] == 1.0
    with pytest.raises(ValueError, match="1.5"):
        calibrate(conf, correct, target_accuracy=1.5)
