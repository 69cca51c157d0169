"""Specialists as a collaboration: the `correct` router, the learned answer scorer (rank, cascade),
their files, the fallback option, and deploy/specialists.yaml with its committed router and scorer."""

import numpy as np
import pytest
from conftest import local_backend, run

from collab_ray.config import load_config
from collab_ray.core.errors import ConfigError
from collab_ray.core.pipeline import Pipeline
from collab_ray.core.sampling import SamplingParams
from collab_ray.core.strategy import Request, get_strategy
from collab_ray.ensemble.cascade import learned_thresholds, simulate
from collab_ray.ensemble.route import Router, featurize, fit_correct_router, route_choices, share_curve
from collab_ray.ensemble.scorer import Records, Scorer, candidate_features, fit_scorer, item_features

MODELS = ["base", "add", "reverse", "sort"]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, stop=("\n",))


def task_prompts(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    """Prompts of three tasks (A…, R…, S…) and which of MODELS is right on each: only the task's specialist."""
    r = np.random.default_rng(seed)
    tasks = r.integers(0, 3, n)
    prompts = []
    for t in tasks:
        body = "".join(map(str, r.integers(0, 10, r.integers(3, 7)))) if t != 1 else "".join(r.choice(list("abcdefgh"), r.integers(4, 8)))
        prompts.append(f"{'ARS'[t]}{body}{'+3' if t == 0 else ''}=")
    correct = np.zeros((n, 4), dtype=bool)
    correct[np.arange(n), tasks + 1] = r.random(n) < 0.95  # the specialist, mostly
    correct[:, 0] = r.random(n) < 0.1  # the base, rarely
    return prompts, correct


def test_correct_router_beats_every_member_on_held_out_prompts(tmp_path):
    prompts, correct = task_prompts(150, seed=0)
    router = fit_correct_router(featurize(prompts, "chars"), correct, MODELS, "chars")
    assert router.meta["cv_accuracy"] > 0.85 and router.meta["fallback_model"] is None
    router.save(tmp_path / "r.npz")
    back = Router.load(tmp_path / "r.npz")
    assert back.target == "correct" and back.meta == router.meta and np.array_equal(back.weights, router.weights)
    test_prompts, test_correct = task_prompts(300, seed=1)
    pred = back.predict(featurize(test_prompts, "chars"))
    routed = test_correct[np.arange(300), route_choices(pred, back.threshold)].mean()
    assert routed > test_correct.mean(0).max() + 0.4  # each member is right on about a third
    curve = share_curve(pred, test_correct, offsets=[-2.0, 0.0, 2.0])
    assert {p["model"] for p in curve} == {0, 1, 2, 3} and max(p["accuracy"] for p in curve) == pytest.approx(routed)
    everything_to_base = next(p for p in curve if p["model"] == 0 and p["offset"] == 2.0)
    assert everything_to_base["shares"][0] == 1.0 and everything_to_base["accuracy"] == pytest.approx(test_correct[:, 0].mean())


def test_router_without_signal_records_the_best_single_as_fallback(tmp_path):
    prompts, _ = task_prompts(100, seed=2)
    correct = np.zeros((100, 4), dtype=bool)
    correct[:, 2] = True  # one model is always right: routing cannot beat it
    router = fit_correct_router(featurize(prompts, "chars"), correct, MODELS, "chars")
    assert router.meta["fallback_model"] == "reverse"
    router.save(tmp_path / "r.npz")
    route = get_strategy("route")({"router": str(tmp_path / "r.npz"), "fallback": True})
    assert route.choose_model(dict.fromkeys(MODELS), "A12+3=")[0] == "reverse"


def synthetic_records(n: int, seed: int) -> Records:
    """Each model answers every item; it is right on its share, and then more confident (higher log-probs)
    and agreeing with no one (wrong answers of the others coincide half the time)."""
    r = np.random.default_rng(seed)
    prompts, correct = task_prompts(n, seed)
    texts, logprobs = [], []
    for i in range(n):
        wrong = str(r.integers(0, 2))
        texts.append([f"right{i}" if correct[i, m] else f"wrong{wrong}{m % 2}" for m in range(4)])
        logprobs.append([list(r.normal(-0.2 if correct[i, m] else -1.5, 0.4, r.integers(2, 6))) for m in range(4)])
    return Records(list(MODELS), prompts, texts, logprobs, correct)


@pytest.mark.parametrize("features", [None, "hash"])  # query features: any route.featurize kind
def test_learned_scorer_picks_the_right_candidate_and_round_trips(tmp_path, features):
    scorer, stage_p = fit_scorer(synthetic_records(120, seed=3), features)
    assert scorer.meta["cv_rank_accuracy"] > 0.85 and scorer.meta["fallback_model"] is None and stage_p.shape == (120, 4)
    scorer.save(tmp_path / "s.npz")
    back = Scorer.load(tmp_path / "s.npz")
    assert back.models == MODELS and back.meta == scorer.meta and back.features == features
    assert np.array_equal(back.weights, scorer.weights)
    test = synthetic_records(300, seed=4)
    chosen = [test.correct[i, int(np.argmax(back.predict(item_features(test, i, "rank", features))))] for i in range(300)]
    assert np.mean(chosen) > test.correct.mean(0).max() + 0.4  # no member is right on more than a third
    Router(MODELS, "chars", np.zeros((3, 4)), np.zeros(4)).save(tmp_path / "router.npz")
    with pytest.raises(ConfigError, match="router.npz.*not a scorer"):
        Scorer.load(tmp_path / "router.npz")


def test_candidate_features_and_agreement():
    x = candidate_features(1, 3, [-1.0, -3.0], None)
    assert x.shape == (4 * 3 + 2,) and x[4:8].tolist() == [1.0, -2.0, -3.0, pytest.approx(np.log(3))] and x[-2:].tolist() == [0.0, 0.0]
    q = candidate_features(1, 3, [-1.0], 0.5, query=np.array([7.0, 8.0]))
    assert q.shape == (14 + 3 * 2,) and q[14:].tolist() == [0, 0, 7, 8, 0, 0] and q[12:14].tolist() == [0.5, 1.0]
    scorer = Scorer(["a", "b", "c"], np.zeros(14), 0.0)
    scorer.weights[-2] = 4.0  # agreement is all it looks at
    p = scorer.score("6*7=", ["a", "b", "c"], [[-1.0]] * 3, ["42", "42\n", "7"], [[1, 2], [0, 2], [0, 1]])
    assert p[0] == p[1] > p[2] == 0.5
    with pytest.raises(ConfigError, match="'d'"):
        scorer.score("1=", ["d"], [[-1.0]], ["1"], [[]])


def test_learned_cascade_thresholds_stop_at_the_confident_stage():
    r = np.random.default_rng(5)
    correct = np.zeros((400, 3), dtype=bool)
    who = r.integers(0, 3, 400)
    correct[np.arange(400), who] = True
    conf = np.where(correct, 0.9, 0.1) + r.normal(0, 0.05, (400, 3))
    point = learned_thresholds(conf, correct)
    assert point.accuracy > 0.95 and point.calls == pytest.approx(simulate(conf, correct, point.thresholds).calls)
    assert point.calls < 2.1  # stops at the right stage: (1 + 2 + 3) / 3 = 2 calls on average


def test_learned_params_are_checked():
    with pytest.raises(ValueError, match="scorer_file"):
        get_strategy("rank").Params(scorer="learned")
    with pytest.raises(ValueError, match="scorer_file"):
        get_strategy("cascade").Params(scorer_file="x.npz")
    with pytest.raises(ConfigError, match="no-such.npz"):
        get_strategy("rank")({"scorer": "learned", "scorer_file": "no-such.npz"})


def test_specialists_config_loads_and_its_router_routes_by_task():
    config = load_config("specialists")
    assert list(config.models) == MODELS and {"route", "rank", "cascade", "fuse", "vote"} <= set(config.pipelines)
    assert all(m.source == f"multitask-hard:{n}" for n, m in config.models.items())
    route = get_strategy("route")(config.pipelines["route"].params)
    picks = [route.choose_model(dict.fromkeys(MODELS), p)[0] for p in ("A347+8=", "Rkrtmq=", "S80531=")]
    assert picks == ["add", "reverse", "sort"]
    for name in ("rank", "cascade"):
        strategy = get_strategy(name)(config.pipelines[name].params)
        assert strategy.scorer.models == MODELS and strategy.scorer.meta["dataset"] == "multitask-hard:validation"
    assert len(get_strategy("cascade")(config.pipelines["cascade"].params).stages(dict.fromkeys(MODELS))[1]) == 3


def test_learned_rank_and_cascade_run_on_real_checkpoints(tmp_path):
    """multitask-small checkpoints (seconds-sized): the pipelines run end to end with a scorer file."""
    models = {n: local_backend(f"multitask-small:{n}") for n in ("base", "add")}
    scorer = Scorer(["base", "add"], np.zeros(4 * 2 + 2), 0.0, {"fallback_model": "add"})
    scorer.weights[4] = 5.0  # the add model's candidates win
    scorer.meta["cascade"] = {"stages": ["base", "add"], "thresholds": [0.9]}
    scorer.save(tmp_path / "s.npz")
    request = Request(prompt="A12+3=", params=GREEDY)
    rank = run(Pipeline("rank", models, {"scorer": "learned", "scorer_file": str(tmp_path / "s.npz")}).run(request))
    assert rank.meta["output_model"] == "add" and len(rank.meta["collab"]["candidates"]) == 2
    cascade = run(Pipeline("cascade", models, {"signal": "learned", "scorer_file": str(tmp_path / "s.npz")}).run(request))
    assert cascade.meta["collab"]["stage"] == 1 and len(cascade.meta["collab"]["confidences"]) == 2  # P = 0.5 < 0.9 at base
    fallback = run(Pipeline("rank", models, {"scorer": "learned", "scorer_file": str(tmp_path / "s.npz"), "fallback": True}).run(request))
    assert fallback.meta["output_model"] == "add" and fallback.meta["collab"]["fallback_model"] == "add"
    assert fallback.meta["models"]["base"]["calls"] == 0 and fallback.meta["models"]["add"]["calls"] == 1  # the fallback alone
