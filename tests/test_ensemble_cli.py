import argparse
import json

from collab_ray.ensemble import cli
from collab_ray.ensemble.route import Router

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
