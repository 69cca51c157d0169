"""The learned multiple-choice combiner (`combine`) and fuse's fitted temperatures and weights: synthetic records, no models."""

import json

import numpy as np
import pytest
from conftest import local_backend, run
from pydantic import ValidationError

from collab_ray.core.errors import ConfigError
from collab_ray.core.types import LoglikelihoodResult
from collab_ray.ensemble import combiner as cb
from collab_ray.ensemble.fuse import Fuse, fit_temperature, fit_weights

CHOICES = ["ant", "bee", "cat", "dog"]  # equal byte lengths: per-byte scores order as raw ones


def record(i: int, answer: int, a: np.ndarray, b: np.ndarray) -> cb.Record:
    """An item whose choices models 'a' and 'b' score with log-likelihoods a [C] and b [C] (one token each)."""
    ones = np.ones(len(CHOICES))
    return cb.Record(f"q{i}", list(CHOICES), answer, {"a": cb.ChoiceScores(a, ones), "b": cb.ChoiceScores(b, ones)})


def complementary(n: int, seed: int) -> list[cb.Record]:
    """Only a combination is right: each model's top choice is wrong (a different one for each model), and the
    right choice is the one both models rank second; every single model scores 0."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        gold, top_a, top_b, other = rng.permutation(4)
        a, b = np.full(4, -12.0), np.full(4, -12.0)
        a[top_a], a[gold] = -2.0, -4.0
        b[top_b], b[gold] = -2.0, -4.0
        out.append(record(i, int(gold), a + rng.normal(0, 0.3, 4), b + rng.normal(0, 0.3, 4)))
    return out


def one_model_right(n: int, seed: int) -> list[cb.Record]:
    """Model 'a' is right on every item, 'b' picks at random: nothing to gain over 'a'."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        gold = int(rng.integers(4))
        a, b = rng.normal(-8, 0.5, 4), rng.normal(-8, 0.5, 4)
        a[gold] = -3.0
        b[int(rng.integers(4))] = -3.0
        out.append(record(i, gold, a, b))
    return out


class Table:
    """A `ModelBackend` stand-in answering `loglikelihood` from a table of records (one model's scores), counting calls."""

    def __init__(self, records: list[cb.Record], model: str):
        self.table = {(q, " " + c): (float(r.scores[model].logprob[k]), int(r.scores[model].tokens[k]))
                      for q, r in zip(prompts(records), records) for k, c in enumerate(r.choices)}  # fmt: skip
        self.calls = 0

    async def loglikelihood(self, requests):
        self.calls += 1
        return [LoglikelihoodResult(*self.table[r], False) for r in requests]


def prompts(records):
    return [f"Question: {r.id}?\nAnswer:" for r in records]


def test_features_of_one_model():
    f = cb.model_features(np.array([-2.0, -4.0, -9.0]), np.array([1.0, 2.0, 3.0]), np.array([2.0, 2.0, 2.0]))
    names = cb.MODEL_FEATURES
    assert f.shape == (3, len(names))
    assert f[:, names.index("top")].tolist() == [1.0, 0.0, 0.0]
    assert f[:, names.index("rank")].tolist() == [0.0, 0.5, 1.0]
    assert f[:, names.index("lp_token")].tolist() == [-2.0, -2.0, -3.0]
    assert f[:, names.index("margin")].tolist() == [0.0, -1.0, -3.5]
    assert np.exp(f[:, names.index("log_p")]).sum() == pytest.approx(1.0)
    assert 0.0 < f[0, names.index("entropy")] < 1.0


def test_combiner_beats_every_member_where_only_a_combination_is_right():
    dev, test = complementary(200, seed=0), complementary(200, seed=1)
    fitted = cb.fit_combiner(dev, ["a", "b"])
    gold = np.array([r.answer for r in test])
    combined = np.mean([fitted.choose(r) for r in test] == gold)
    singles = {m: np.mean(cb.single_picks(test, m) == gold) for m in "ab"}
    assert max(singles.values()) == 0.0
    assert combined > 0.9
    assert fitted.fallback is None and fitted.meta["significant"]
    assert fitted.meta["vs_best_single"]["p_value"] < 0.05


def test_fit_serialise_load_round_trip(tmp_path):
    fitted = cb.fit_combiner(complementary(60, seed=2), ["a", "b"], cb.FitConfig(folds=3, c_grid=[0.1, 1.0]))
    fitted.save(tmp_path / "c.npz")
    back = cb.Combiner.load(tmp_path / "c.npz")
    assert back.models == ["a", "b"] and back.fallback == fitted.fallback and back.meta == json.loads(json.dumps(fitted.meta))
    x = cb.item_features(complementary(1, seed=3)[0], ["a", "b"])
    assert np.allclose(back.logits(x), fitted.logits(x))
    z = np.load(tmp_path / "c.npz", allow_pickle=False)  # arrays and a JSON header, nothing pickled
    assert sorted(z.files) == ["coef", "header", "mean", "scale"]


def test_fallback_to_the_best_single_model_when_not_significantly_better(tmp_path):
    records = one_model_right(80, seed=4)
    fitted = cb.fit_combiner(records, ["a", "b"])
    assert fitted.fallback == "a" and fitted.meta["best_single"] == "a" and not fitted.meta["significant"]
    assert cb.fit_combiner(records, ["a", "b"], cb.FitConfig(fallback=False)).fallback is None
    fitted.save(tmp_path / "c.npz")
    items = records[:5]
    tables = {m: Table(items, m) for m in "ab"}
    pipe = cb.Combine({"combiner": str(tmp_path / "c.npz")})
    picks = [run(pipe.choose(tables, p, r.choices)) for p, r in zip(prompts(items), items)]
    assert [d.index for d in picks] == [r.answer for r in items] and picks[0].meta == {"fallback": "a"}
    assert tables["b"].calls == 0  # the fallback asks only its model
    always = cb.Combine({"combiner": str(tmp_path / "c.npz"), "fallback": False})
    d = run(always.choose(tables, prompts(items)[0], items[0].choices))
    assert "scores" in d.meta and tables["b"].calls == 1


def test_strategy_answers_with_the_fitted_combiner(tmp_path):
    cb.fit_combiner(complementary(200, seed=5), ["a", "b"]).save(tmp_path / "c.npz")
    items = complementary(20, seed=6)
    tables = {m: Table(items, m) for m in "ab"}
    pipe = cb.Combine({"combiner": str(tmp_path / "c.npz")})
    picks = [run(pipe.choose(tables, p, r.choices)).index for p, r in zip(prompts(items), items)]
    assert np.mean(np.array(picks) == [r.answer for r in items]) > 0.9
    with pytest.raises(ConfigError, match="'b'"):
        run(pipe.choose({"a": tables["a"]}, prompts(items)[0], items[0].choices))


def test_bad_artefacts_and_params_name_the_bad_value(tmp_path):
    (tmp_path / "junk.npz").write_text("not a combiner")
    with pytest.raises(ConfigError, match="junk.npz"):
        cb.Combiner.load(tmp_path / "junk.npz")
    with pytest.raises(ConfigError, match="missing.npz"):
        cb.Combine({"combiner": str(tmp_path / "missing.npz")})
    fitted = cb.fit_combiner(complementary(40, seed=7), ["a", "b"], cb.FitConfig(folds=2))
    fitted.save(tmp_path / "ok.npz")
    z = dict(np.load(tmp_path / "ok.npz", allow_pickle=False))
    header = json.loads(str(z["header"]))
    for change, match in (({"format": "other/9"}, "other/9"), ({"fallback": "c"}, "'c'"), ({"models": ["a"]}, "features")):
        with open(tmp_path / "bad.npz", "wb") as f:
            np.savez(f, **{**z, "header": np.array(json.dumps({**header, **change}))})
        with pytest.raises(ConfigError, match=match):
            cb.Combiner.load(tmp_path / "bad.npz")
    with pytest.raises(ValidationError, match="thresh"):
        cb.Combine({"combiner": str(tmp_path / "ok.npz"), "thresh": 1})
    with pytest.raises(ConfigError, match="got 9"):
        cb.fit_combiner(complementary(9, seed=8), ["a", "b"], cb.FitConfig(folds=5))
    with pytest.raises(ConfigError, match="'c'"):
        cb.item_features(complementary(1, seed=9)[0], ["a", "c"])


def test_fuse_temperature_and_weights_fitted():
    rng = np.random.default_rng(10)
    s = rng.normal(0, 1.5, size=(1000, 4))  # calibrated scores: gold ~ softmax(s)
    p = np.exp(s) / np.exp(s).sum(1, keepdims=True)
    gold = np.array([rng.choice(4, p=row) for row in p])
    t = fit_temperature([row * 3.0 for row in s], gold)  # a model 3x overconfident: the fit undoes it
    assert 2.4 < t < 3.7
    w = fit_weights(np.array([[0.9, 0.1]] * 90 + [[0.1, 0.9]] * 10))  # the first model explains most items
    assert w.sum() == pytest.approx(1.0) and w[0] > 0.8
    with pytest.raises(ConfigError, match=r"\[1.0, -2.0\]"):
        Fuse({"temperatures": [1.0, -2.0]}).temperatures(["a", "b"])


def test_fit_fuse_and_picks_on_records():
    records = one_model_right(120, seed=11)
    weights, temps = cb.fit_fuse(records, ["a", "b"])
    assert weights[0] > weights[1] and all(t > 0 for t in temps)
    gold = np.array([r.answer for r in records])
    assert np.mean(cb.fuse_picks(records, ["a", "b"], weights, temps) == gold) >= np.mean(cb.fuse_picks(records, ["a", "b"], [1, 1], [1, 1]) == gold)


def test_cli_fit_from_records_writes_a_loadable_artefact(tmp_path, capsys):
    from collab_ray.cli import main

    records = complementary(60, seed=12)
    rows = [{"id": r.id, "question": f"{r.id}?", "choices": r.choices, "answer": r.answer} for r in records]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cb.records_to_jsonl(records, tmp_path / "scores.jsonl")
    out = tmp_path / "c.npz"
    argv = ["ensemble", "fit", "--dataset", str(tmp_path / "d.jsonl"), "--model", "a=unused", "--model", "b=unused",
            "--records", str(tmp_path / "scores.jsonl"), "--output", str(out), "--folds", "3"]  # fmt: skip
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["meta"]["test"]["items"] == 30 and printed["meta"]["dev_items"] == 30
    assert cb.Combiner.load(out).models == ["a", "b"]
    assert main([*argv[:-4], "--output", str(tmp_path / "f.json"), "--method", "fuse"]) == 0
    fuse = json.loads((tmp_path / "f.json").read_text())
    assert fuse["strategy"] == "fuse" and len(fuse["params"]["temperatures"]) == 2
    rows[0]["id"] = "other"
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(argv) != 0
    assert "scores.jsonl" in capsys.readouterr().err


def test_demo_config_combine_pipeline_loads_and_generates_with_its_best_single(tmp_path):
    from collab_ray.config import load_config
    from collab_ray.core.pipeline import Pipeline
    from collab_ray.core.sampling import SamplingParams
    from collab_ray.core.strategy import Request

    config = load_config("demo")
    shipped = config.build_pipeline("combine", {m: object() for m in config.models}).strategy.combiner
    assert shipped.models == ["smollm2", "gemma"] and shipped.meta["items"] > 0
    fitted = cb.fit_combiner(one_model_right(40, seed=13), ["a", "b"], cb.FitConfig(folds=2))
    fitted.save(tmp_path / "c.npz")
    models = {"a": local_backend("tiny:llama-bpe-small"), "b": local_backend("tiny:llama-bpe")}
    out = run(Pipeline("combine", models, {"combiner": str(tmp_path / "c.npz")}).run(Request(prompt="Hi", params=SamplingParams(max_tokens=3, temperature=0.0))))
    assert out.meta["output_model"] == fitted.meta["best_single"] == "a" and out.meta["collab"]["answered_by"] == "a"
