import argparse
import json

import pytest
from conftest import local_backend, run

from collab_ray.config import load_config
from collab_ray.core import SamplingParams
from collab_ray.core.strategy import Request
from collab_ray.ensemble.route import Router
from collab_ray.eval import ensemble_cli as cli

ROWS = [{"id": str(i), "question": f"Question number {i}?", "choices": ["yes", "no"], "answer": i % 2} for i in range(6)]


def parser():
    p = argparse.ArgumentParser()
    cli.register(p.add_subparsers(dest="command"))
    return p


def test_route_train_and_cascade_calibrate(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    models = ["--model", "tiny:llama-bpe-small", "--model", "tiny:llama-bpe"]
    args = parser().parse_args(["route", "train", "--dataset", str(data), *models, "--features", "hash", "--target-share", "0.5", "--output", str(tmp_path / "r.npz")])
    assert args.func(args) == 0
    router = Router.load(tmp_path / "r.npz")
    assert router.models == ["tiny:llama-bpe-small", "tiny:llama-bpe"] and router.meta["items"] == 6
    capsys.readouterr()
    args = parser().parse_args(["cascade", "calibrate", "--dataset", str(data), *models, "--target-share", "0.5"])
    assert args.func(args) == 0
    point = json.loads(capsys.readouterr().out)
    assert point["last_share"] <= 0.5 and len(point["thresholds"]) == 1


def test_named_router_serves_a_config_pipeline(tmp_path):
    """`--model NAME=SOURCE` names the router's models as a config does; the YAML names the file relative to itself."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "routers").mkdir()
    models = ["--model", "draft=tiny:llama-bpe-small", "--model", "target=tiny:llama-bpe"]
    args = parser().parse_args(["route", "train", "--dataset", str(data), *models, "--features", "hash", "--output", str(tmp_path / "routers" / "r.npz")])
    assert args.func(args) == 0
    assert Router.load(tmp_path / "routers" / "r.npz").models == ["draft", "target"]
    (tmp_path / "c.yaml").write_text(
        "models: {draft: {source: tiny:llama-bpe-small}, target: {source: tiny:llama-bpe}}\n"
        "pipelines: {route: {strategy: route, models: [draft, target], params: {router: routers/r.npz}}}\n"
    )
    config = load_config(tmp_path / "c.yaml")
    assert config.pipelines["route"].params["router"] == str((tmp_path / "routers" / "r.npz").resolve())
    pipeline = config.build_pipeline("route", {"draft": local_backend("tiny:llama-bpe-small"), "target": local_backend("tiny:llama-bpe")})
    result = run(pipeline.run(Request(prompt="Question number 3?", params=SamplingParams(temperature=0, max_tokens=4))))
    assert result.meta["collab"]["routed_to"] in ("draft", "target") and result.meta["output_model"] == result.meta["collab"]["routed_to"]


CONFIG = (
    "models: {small: {source: tiny:llama-bpe-small}, big: {source: tiny:llama-bpe}}\n"
    "pipelines:\n"
    "  combine: {strategy: combine, models: [small, big], params: {combiner: fitted/c.npz}}\n"
    "  fuse: {strategy: fuse, models: [small, big]}\n"
    "  route: {strategy: route, models: [small, big], params: {router: fitted/r.npz}}\n"
    "  rank: {strategy: rank, models: [small, big], params: {scorer: learned, scorer_file: fitted/s.npz}}\n"
    "  cascade: {strategy: cascade, models: [small, big], params: {signal: learned, scorer_file: fitted/s.npz}}\n"
    "  route2: {strategy: route, models: [big, small], params: {router: fitted/r.npz}}\n"
    "  vote: {strategy: vote, models: [small, big]}\n"
)


def write_config(tmp_path, rows):
    (tmp_path / "c.yaml").write_text(CONFIG)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ["ensemble", "fit", str(tmp_path / "c.yaml"), "--dataset", str(tmp_path / "d.jsonl"), "--folds", "2"]


def test_config_fit_writes_where_the_pipelines_name_their_files(tmp_path, capsys):
    from collab_ray.cli import main
    from collab_ray.ensemble.combiner import Combiner

    rows = [{"id": str(i), "question": f"Question number {i}?", "choices": ["yes", "no", "maybe"], "answer": i % 3} for i in range(16)]
    argv = write_config(tmp_path, rows)
    assert main([*argv, "--pipelines", "combine,fuse,route", "--features", "hash+confidence", "--tolerance", "0.01"]) == 0
    out = json.loads(capsys.readouterr().out)["fitted"]
    assert out["combine"]["output"] == str(tmp_path / "fitted" / "c.npz") and out["combine"]["meta"]["test"]["items"] == 8
    assert out["fuse"]["output"] is None and len(out["fuse"]["params"]["temperatures"]) == 2
    assert 1.0 <= out["route"]["meta"]["test"]["calls_per_item"] <= 2.0
    assert Combiner.load(tmp_path / "fitted" / "c.npz").models == ["small", "big"]
    router = Router.load(tmp_path / "fitted" / "r.npz")
    assert router.models == ["small", "big"] and router.confidence == "choice" and (router.meta["items"], router.meta["tolerance"]) == (8, 0.01)
    config = load_config(tmp_path / "c.yaml")  # the YAML now finds what was written beside it
    assert config.build_pipeline("route", {"small": None, "big": None}).strategy.router.confidence == "choice"


def test_config_fit_of_learned_scorers_under_an_output_dir(tmp_path, capsys):
    from collab_ray.cli import main
    from collab_ray.ensemble.scorer import Scorer

    rows = [{"id": str(i), "question": f"Say {w}", "answers": [w]} for i, w in enumerate(["yes", "no", "one", "two", "red", "blue"] * 2)]
    argv = write_config(tmp_path, rows)
    assert main([*argv, "--pipelines", "rank,cascade"]) == 0  # one scorer file: fitted once, for both
    out = json.loads(capsys.readouterr().out)["fitted"]
    assert out["rank"] == out["cascade"] and out["rank"]["output"] == str(tmp_path / "fitted" / "s.npz")
    assert main([*argv, "--pipelines", "rank,cascade", "--output-dir", str(tmp_path / "out")]) == 0
    out = json.loads(capsys.readouterr().out)["fitted"]
    assert out["rank"]["output"] == str(tmp_path / "out" / "rank.npz") and set(out["cascade"]["meta"]["test"]) == {"rank", "cascade"}
    scorer = Scorer.load(tmp_path / "out" / "cascade.npz")
    assert scorer.models == ["small", "big"] and scorer.meta["cascade"]["stages"] == ["small", "big"]
    assert sorted(p.name for p in (tmp_path / "fitted").iterdir()) == ["s.npz"]


def test_config_fit_checks_everything_before_any_model_loads(tmp_path, capsys, monkeypatch):
    from collab_ray.cli import main
    from collab_ray.models import backend

    monkeypatch.setattr(backend, "TransformersBackend", lambda *a, **k: pytest.fail("a model loaded"))
    argv = write_config(tmp_path, ROWS)
    for pipelines, match in (
        ("vote", "pipeline 'vote' (strategy 'vote') has nothing to fit; fittable pipelines: combine, fuse, route, rank, cascade, route2"),
        ("route,route2", "pipelines 'route' and 'route2' name one file"),
        ("combine,nope", "'nope' is not a pipeline of config"),
        ("small", "pipeline 'small' (strategy 'single') has nothing to fit"),
        ("rank", "its scorer is fitted on short-answer items; the dataset holds multiple-choice items"),
    ):
        assert main([*argv, "--pipelines", pipelines]) == 2
        assert match in capsys.readouterr().err
    assert main([*argv, "--pipelines", "route", "--features", "words"]) == 2
    assert "unknown router features 'words'" in capsys.readouterr().err
    assert main([*argv, "--pipelines", "route", "--model", "tiny:llama-bpe"]) == 2
    assert "not both" in capsys.readouterr().err
