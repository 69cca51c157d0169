import argparse
import json

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
