import json

import numpy as np
import pytest
from conftest import run

from collab_ray.core.pipeline import Pipeline
from collab_ray.core.sampling import SamplingParams
from collab_ray.core.strategy import Request
from collab_ray.ensemble.route import Router, calibrate_threshold, decide, fit_router, gains, hash_features, train_router
from collab_ray.eval.datasets import load_jsonl

GREEDY = SamplingParams(max_tokens=4, temperature=0.0)


def test_decide_on_fixtures():
    assert decide(np.array([0.9, 0.2, 0.5]), threshold=0.0).model == 0  # dearest gains nothing
    assert decide(np.array([0.1, 0.2, 0.9]), threshold=0.5).model == 2  # gain 0.7 > 0.5
    assert decide(np.array([0.1, 0.2, 0.6]), threshold=0.5).model == 1  # gain 0.4: best cheaper model
    assert gains(np.array([[0.1, 0.2, 0.6]]))[0] == pytest.approx(0.4)


def test_calibrated_threshold_sends_the_target_share():
    pred = np.random.default_rng(0).normal(size=(200, 2))
    for share in (0.0, 0.1, 0.5, 1.0):
        t = calibrate_threshold(pred, share)
        assert np.mean(gains(pred) > t) == pytest.approx(share)
    with pytest.raises(ValueError, match="1.5"):
        calibrate_threshold(pred, 1.5)


def test_fit_learns_which_model_wins_by_topic():
    texts = [f"arithmetic sum of {i} and {i + 1}" for i in range(20)] + [f"history of the old kingdom {i}" for i in range(20)]
    scores = np.array([[1.0, 0.0]] * 20 + [[0.0, 1.0]] * 20)  # model 0 wins on sums, model 1 on history
    x = hash_features(texts)
    router = fit_router(x, scores, ["small", "big"], "hash", ridge=0.1)
    router.threshold = calibrate_threshold(router.predict(x), 0.5)
    picks = [decide(p, router.threshold).model for p in router.predict(hash_features(["arithmetic sum of 3 and 9", "history of the old kingdom"]))]
    assert picks == [0, 1]


def test_router_save_load_round_trip(tmp_path):
    r = Router(["a", "b"], "hash", np.arange(6, dtype=np.float32).reshape(3, 2), np.array([0.5, -0.5], dtype=np.float32), 0.25, {"items": 3})
    r.save(tmp_path / "r.npz")
    back = Router.load(tmp_path / "r.npz")
    assert back.models == r.models and back.threshold == r.threshold and back.meta == r.meta and back.features == "hash"
    assert np.array_equal(back.weights, r.weights) and np.array_equal(back.bias, r.bias)
    (tmp_path / "bad.npz").write_text("not a router")
    with pytest.raises(ValueError, match="bad.npz"):
        Router.load(tmp_path / "bad.npz")


def test_train_calibrate_save_and_route(backends, tmp_path):
    rows = [{"id": str(i), "question": q, "choices": ["the cat", "a dog", "blue sky"], "answer": i % 3} for i, q in enumerate(["Who sat on the mat?", "What barks?", "What is above?", "Pets?", "Colors?", "Animals?"])]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = load_jsonl(tmp_path / "d.jsonl")
    models = backends(small="tiny:llama-bpe-small", big="tiny:llama-bpe")
    router = run(train_router(models, dataset, features="hash", target_share=0.5))
    assert np.mean(gains(router.predict(hash_features([it.prompt for it in dataset.items]))) > router.threshold) == pytest.approx(0.5)
    router.save(tmp_path / "router.npz")
    pipeline = Pipeline("route", models, {"router": str(tmp_path / "router.npz")})
    out = run(pipeline.run(Request(prompt=dataset.items[0].prompt, params=GREEDY)))
    chosen = out.meta["collab"]["routed_to"]
    assert out.meta["output_model"] == chosen and [m for m, s in out.meta["models"].items() if s["calls"]] == [chosen]
    forced = Pipeline("route", models, {"router": str(tmp_path / "router.npz"), "threshold": float("-inf")})
    assert run(forced.run(Request(prompt="Anything?", params=GREEDY))).meta["collab"]["routed_to"] == "big"
