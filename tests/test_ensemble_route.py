import json

import numpy as np
import pytest
from conftest import local_backend, run

from collab_ray.core.pipeline import Pipeline
from collab_ray.core.sampling import SamplingParams
from collab_ray.core.strategy import Request
from collab_ray.ensemble.route import (
    Router,
    answer_confidence,
    calibrate_threshold,
    cheapest_threshold,
    choice_confidence,
    decide,
    fit_correct_router,
    fit_router,
    gains,
    hash_features,
    parse_features,
    route_choices,
    router_inputs,
    train_router,
)
from collab_ray.eval.datasets import Item, load_jsonl
from collab_ray.eval.harness import choose_item

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


def confident_when_right(n: int, seed: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """n prompts of one form (the text says nothing), the cheap model right on a random half and then sure of
    itself, the dear one right on 70% -> (prompts, [n, 3] the cheap model's choice confidence, [n, 2] correct)."""
    r = np.random.default_rng(seed)
    cheap_right = r.random(n) < 0.5
    peaks = [np.array([0.85, 0.05, 0.05, 0.05]) if ok else np.array([0.3, 0.25, 0.25, 0.2]) for ok in cheap_right]
    noisy = [r.permutation(p + r.uniform(0, 0.05, 4)) for p in peaks]
    conf = np.stack([choice_confidence(q / q.sum()) for q in noisy])
    prompts = [f"Question: which of these is item {r.integers(1000)}?\nAnswer:" for _ in range(n)]
    return prompts, conf, np.stack([cheap_right, r.random(n) < 0.7], 1)


def test_confidence_router_beats_the_text_only_router_where_confidence_tells():
    prompts, conf, correct = confident_when_right(200, seed=1)
    text_only = fit_correct_router(router_inputs(prompts, "hash"), correct, ["cheap", "dear"], "hash")
    with_conf = fit_correct_router(router_inputs(prompts, "hash", conf), correct, ["cheap", "dear"], "hash")
    assert with_conf.meta["cv_accuracy"] > text_only.meta["cv_accuracy"] + 0.08
    assert with_conf.meta["cv_shares"]["cheap"] > 50 and with_conf.meta["fallback_model"] is None
    frugal = fit_correct_router(router_inputs(prompts, "hash", conf), correct, ["cheap", "dear"], "hash", tolerance=0.02)
    assert frugal.meta["cv_shares"]["dear"] <= with_conf.meta["cv_shares"]["dear"]
    assert frugal.meta["cv_accuracy"] >= with_conf.meta["cv_accuracy"] - 0.02 - 1e-9


def test_cheapest_threshold_sends_the_fewest_to_the_dearest_within_tolerance():
    pred = np.array([[0.9, 0.95], [0.2, 0.8], [0.6, 0.62], [0.5, 0.9]])  # gains 0.05, 0.6, 0.02, 0.4
    correct = np.array([[1, 1], [0, 1], [1, 1], [0, 1]], dtype=bool)
    assert route_choices(pred, cheapest_threshold(pred, correct, 0.0)).tolist() == [0, 1, 0, 1]
    assert route_choices(pred, cheapest_threshold(pred, correct, 0.25)).tolist() == [0, 1, 0, 0]


def test_confidence_features_and_options():
    top, margin, entropy = choice_confidence(np.array([0.7, 0.2, 0.1]))
    assert (top, margin) == pytest.approx((0.7, 0.5)) and 0 < entropy < 1
    assert choice_confidence(np.full(4, 0.25))[2] == pytest.approx(1.0)
    assert answer_confidence([-1.0, -3.0]) == pytest.approx([-2.0, np.log(3)]) and answer_confidence([]).tolist() == [0.0, 0.0]
    assert parse_features("chars+confidence") == ("chars", True) and parse_features("hash") == ("hash", False)
    with pytest.raises(ValueError, match="chars\\+conf"):
        parse_features("chars+conf")


def test_confidence_router_save_load_round_trip(tmp_path):
    r = Router(["a", "b"], "hash", np.ones((512 + 3, 2), np.float32), np.zeros(2, np.float32), 0.0, {"items": 3}, "correct", "choice")
    r.save(tmp_path / "r.npz")
    back = Router.load(tmp_path / "r.npz")
    assert (back.confidence, back.target, back.features) == ("choice", "correct", "hash") and np.array_equal(back.weights, r.weights)
    assert Router.load(tmp_path / "r.npz").predict(router_inputs(["x"], "hash", np.zeros((1, 3)))).shape == (1, 2)


def confidence_route(tmp_path, cheap_bias: float, kind: str) -> Pipeline:
    """A route pipeline over the tiny models whose confidence router always keeps the cheap model (bias > 0) or escalates."""
    width = 512 + (3 if kind == "choice" else 2)
    Router(["small", "big"], "hash", np.zeros((width, 2), np.float32), np.array([cheap_bias, -cheap_bias], np.float32),
           0.0, {}, "correct", kind).save(tmp_path / f"r-{kind}.npz")  # fmt: skip
    models = {"small": local_backend("tiny:llama-bpe-small"), "big": local_backend("tiny:llama-bpe")}
    return Pipeline("route", models, {"router": str(tmp_path / f"r-{kind}.npz")})


def test_confidence_route_makes_one_call_unless_it_escalates(tmp_path):
    item = Item("q", "What barks?", choices=["a dog", "the cat"], answer=0)
    for bias, answered_by, calls in ((5.0, "small", {"small": 1}), (-5.0, "big", {"small": 1, "big": 1})):
        stats = {}
        _, meta = run(choose_item(confidence_route(tmp_path, bias, "choice"), item, stats))
        assert meta["answered_by"] == answered_by and meta["calls"] == len(calls)
        assert {m: s.calls for m, s in stats.items() if s.calls} == calls
        out = run(confidence_route(tmp_path, bias, "short").run(Request(prompt="What barks?", params=GREEDY)))
        assert out.meta["collab"]["answered_by"] == out.meta["output_model"] == answered_by and out.meta["collab"]["calls"] == len(calls)
        assert {m: s["calls"] for m, s in out.meta["models"].items() if s["calls"]} == calls
    with pytest.raises(ValueError, match="generated answers"):
        run(choose_item(confidence_route(tmp_path, 5.0, "short"), item, {}))
    with pytest.raises(ValueError, match="multiple-choice items"):
        run(confidence_route(tmp_path, 5.0, "choice").run(Request(prompt="What barks?", params=GREEDY)))
