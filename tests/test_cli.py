"""The `collab-ray` command line."""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from collab_ray.cli import LAZY, OWN, build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def test_models_list(capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "gemma3-270m" in out and "tiny:llama-sp" in out


def test_models_pull_unknown_name_is_refused_before_fetching(capsys):
    assert main(["models", "pull", "smollm2-135m-instruct", "llama-9000"]) == 2
    assert "llama-9000" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["models"], ["route"], ["cascade"]])
def test_every_command_group_prints_its_help_when_bare(capsys, argv):
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: collab-ray{' ' + argv[0] if argv else ''}") and "required" not in out


def test_help_is_fast_and_lists_every_command():
    code = "import sys, time; t = time.perf_counter(); from collab_ray.cli import main; main(['--help'])"
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    assert out.returncode == 0 and all(c in out.stdout for c in [*LAZY, "models", "demo", "serve"])
    heavy = subprocess.run([sys.executable, "-c", "import sys; from collab_ray.cli import build_parser; build_parser(['--help'])\n"
                            "print(sorted(m for m in ('torch', 'ray', 'transformers') if m in sys.modules))"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    assert heavy.stdout.strip() == "[]"  # nothing heavy imported: fast on any machine
    assert elapsed < 10  # ~0.5 s here; generous for a loaded CI box


def test_lazy_command_help_matches_the_registered_one():
    full = build_parser()  # imports every command module
    sub = next(a for a in full._actions if isinstance(a, argparse._SubParsersAction))
    registered = {a.dest: a.help for a in sub._choices_actions if a.dest not in OWN}
    assert registered == {name: h for name, (_, h) in LAZY.items()}  # a new command belongs in LAZY too


def test_bad_demo_arguments_get_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--max-tokens", "0"])
    assert "expected a positive integer, got 0" in capsys.readouterr().err
    assert main(["demo", "--config", "tiny", "--pipelines", "fuse,nope"]) == 2
    assert "'nope'" in capsys.readouterr().err


def test_packaged_configs_are_found_by_name_from_anywhere(tmp_path, monkeypatch):
    from collab_ray import configs
    from collab_ray.config import load_config

    monkeypatch.chdir(tmp_path)
    assert configs.names() == ["demo", "specialists", "tiny"]
    assert "speculative" in load_config("tiny").pipelines
    demo = load_config("demo")
    assert Path(demo.pipelines["route"].params["router"]).is_file()  # the router travels with the config
    specialists = load_config("specialists").pipelines  # and so do the specialists' router and scorer
    assert Path(specialists["route"].params["router"]).is_file() and Path(specialists["rank"].params["scorer_file"]).is_file()
    with pytest.raises(ValueError, match="'nope'"):
        configs.packaged_config("nope")
    with pytest.raises(ValueError, match="tiny.yml"):
        load_config("tiny.yml")  # a path that is not there, named in the error


def test_deploy_configs_are_links_to_the_packaged_ones():
    for name in ("demo.yaml", "tiny.yaml", "specialists.yaml", "routers", "scorers"):
        link = ROOT / "deploy" / name
        assert link.is_symlink() and link.resolve() == (ROOT / "collab_ray" / "configs" / name).resolve()


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "collab_ray.cli", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in out.stdout and "models" in out.stdout


def test_demo_result_shows_full_answers_wrapped_with_the_models_calls():
    from collab_ray.demo import Answer, PipelineResult, format_result

    long = "Paris is the capital of France and its largest city, on the Seine. " * 3
    r = PipelineResult("vote", "vote", [Answer("What is the capital of France?", long, 32, 2.5, "length")],
                       {"smollm2": {"calls": 2, "completion_tokens": 96}}, 3.0)  # fmt: skip
    block = format_result(r, 2, 17, width=60)
    lines = block.splitlines()
    assert lines[0] == "[2/17] vote (vote), 3.0 s" and lines[1] == "  Q: What is the capital of France?"
    assert all(len(line) <= 60 for line in lines) and "…" not in block
    assert " ".join(line.strip().removeprefix("A: ") for line in lines[2:-2]) == long.strip()  # every word, in order
    assert "(32 tokens, 2.5 s, cut at max_tokens)" in block and "models: smollm2 2 calls/96 tokens out" in block
    r.description = "Three samples from each model; the one that agrees most with the others wins."
    described = format_result(r, 2, 17, width=60).splitlines()
    assert described[1:3] == ["  Three samples from each model; the one that agrees most", "  with the others wins."]


def test_demo_says_when_ray_does_not_start_and_points_at_the_log(tmp_path, monkeypatch):
    import io

    import ray

    from collab_ray import demo
    from collab_ray.serving import app

    def fail(config, quiet=False):
        os.write(2, b"raylet noise\n")  # Ray's own output (its C++ side writes to the descriptors): into the log
        raise RuntimeError("The current node timed out during startup.")

    monkeypatch.setattr(app, "init_ray", fail)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    out = io.StringIO()
    assert demo.main("tiny", pipelines=["target"], log_path=str(tmp_path / "ray.log"), console=demo.Console(out)) == 1
    text = out.getvalue()
    assert "Ray Serve did not start: RuntimeError: The current node timed out during startup." in text
    assert f"Ray's log: {tmp_path / 'ray.log'}" in text and "raylet noise" not in text
    assert "raylet noise" in (tmp_path / "ray.log").read_text()
