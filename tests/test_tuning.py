"""Ray Tune merge search: search point -> merge config, a small search end to end, failed trials, resume.

The searches merge the `multitask-small` checkpoints (a seconds-sized recipe of the multi-task
experiment, built on first use) on the session's Ray cluster.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from xml.etree import ElementTree

import pytest
import yaml

import collab_ray.tuning.experiment  # noqa: F401  (registers multitask-small:… and task:…)
from collab_ray.core.errors import ConfigError
from collab_ray.merge.config import load_config
from collab_ray.tuning.space import merge_config, search_keys
from collab_ray.tuning.spec import load_spec


def spec_dict(**overrides) -> dict:
    spec = {
        "name": "small",
        "merge_method": "task_arithmetic",
        "base_model": "multitask-small:base",
        "models": [{"name": "add", "model": "multitask-small:add"}, {"name": "sort", "model": "multitask-small:sort"}],
        "search": {"weight": {"low": 0.2, "high": 1.2, "per_model": True}},
        "eval_items": [4, 8],
        "objective": [
            {"name": "add", "data": "task:add", "max_new_tokens": 4},
            {"name": "sort", "data": "task:sort", "max_new_tokens": 8},
        ],
        "num_samples": 4,
        "max_concurrent_trials": 2,
        "resources": {"cpu": 1},
    }
    return spec | overrides


# ------------------------------------------------------------------------------ pure function


def test_point_to_merge_config_per_model_grouped_and_global():
    spec = load_spec(
        spec_dict(
            merge_method="ties",
            models=[{"name": "a", "model": "/m/a", "parameters": {"weight": 0.7}}, {"name": "b", "model": "/m/b"}],
            base_model="/m/base",
            parameters={"normalize": True},
            dtype="float32",
            search={"density": {"low": 0.1, "high": 1.0, "per_model": True, "layer_groups": 2}, "lambda": {"values": [0.5, 1.0]}},
        )
    )
    assert [str(k) for k in search_keys(spec)] == ["density.a.g0", "density.a.g1", "density.b.g0", "density.b.g1", "lambda"]
    point = {"density.a.g0": 0.2, "density.a.g1": 0.4, "density.b.g0": 0.6, "density.b.g1": 0.8, "lambda": 0.5}
    config = merge_config(spec, point)
    assert config == {
        "merge_method": "ties",
        "models": [
            {"model": "/m/a", "parameters": {"weight": 0.7, "density": [0.2, 0.4]}},
            {"model": "/m/b", "parameters": {"density": [0.6, 0.8]}},
        ],
        "base_model": "/m/base",
        "parameters": {"normalize": True, "lambda": 0.5},
        "dtype": "float32",
    }
    assert merge_config(spec, point) == config  # pure: same point, same config
    assert load_config(yaml.safe_dump(config)).models[1].parameters["density"] == [0.6, 0.8]  # valid mergekit YAML


NEW_METHOD_SEARCHES = {
    "sce": {"select_topk": {"low": 0.1, "high": 1.0}},
    "della": {"density": {"low": 0.3, "high": 0.7, "per_model": True}, "epsilon": {"values": [0.05, 0.1, 0.2], "per_model": True}},
    "della_linear": {"epsilon": {"low": 0.01, "high": 0.2, "layer_groups": 2, "per_model": True}, "weight": {"low": 0.2, "high": 1.0, "per_model": True}},
    "nuslerp": {"weight": {"low": 0.1, "high": 1.0, "per_model": True}},
    "multislerp": {"weight": {"low": 0.1, "high": 1.0, "per_model": True}},
    "karcher": {"max_iter": {"values": [5, 10]}, "tol": {"low": 1e-6, "high": 1e-4, "log": True}},
    "nearswap": {"t": {"low": 0.001, "high": 0.1, "log": True, "layer_groups": 3}},
    "ramplus_tl": {"r": {"low": 0.0, "high": 0.5}, "alpha": {"low": 0.1, "high": 0.5}},
}


@pytest.mark.parametrize("method", list(NEW_METHOD_SEARCHES))
def test_new_methods_parameters_are_searchable(method, tmp_path):
    """Each new method's parameters make search points whose merge configs plan (no tensor is read)."""
    import shutil

    from collab_ray.merge.plan import build_plan
    from collab_ray.models.tiny import tiny_path
    from collab_ray.tuning.space import grid_values

    dirs = [str(shutil.copytree(tiny_path("llama-bpe"), tmp_path / n)) for n in ("base", "a", "b")]
    fixed = {"della": {"weight": 0.5}, "della_linear": {"density": 0.5}}.get(method, {})
    count = 1 if method == "nearswap" else 2
    models = [{"name": n, "model": d, "parameters": dict(fixed)} for n, d in zip("ab", dirs[1:])][:count]
    base = None if method == "karcher" else dirs[0]
    spec = load_spec(spec_dict(merge_method=method, models=models, base_model=base, search=NEW_METHOD_SEARCHES[method]))
    point = {str(k): grid_values(spec.search[k.param], 3)[1] for k in search_keys(spec)}
    config = merge_config(spec, point)
    assert all(name in str(config) for name in NEW_METHOD_SEARCHES[method])
    assert len(build_plan(load_config(config)).jobs) > 0


def test_tuner_modules_do_not_import_the_experiment():
    code = (
        "import sys, collab_ray.tuning.spec, collab_ray.tuning.evaluate, collab_ray.tuning.runner, collab_ray.tuning.space\n"
        "print(sorted(m for m in sys.modules if m.startswith('collab_ray.tuning')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "experiment" not in out and "collab_ray.tuning.references" in out
    with pytest.raises(ConfigError, match="registered"):
        from collab_ray.tuning.references import TASK_SOURCES, task_items

        saved = TASK_SOURCES.pop("task")
        try:
            task_items("task:add")
        finally:
            TASK_SOURCES["task"] = saved


def test_point_to_merge_config_global_weight_and_missing_key():
    spec = load_spec(spec_dict(merge_method="linear", base_model=None, search={"weight": {"low": 0.0, "high": 1.0}}))
    config = merge_config(spec, {"weight": 0.25})
    assert config == {
        "merge_method": "linear",
        "models": [{"model": "multitask-small:add"}, {"model": "multitask-small:sort"}],
        "parameters": {"weight": 0.25},
    }
    with pytest.raises(ConfigError, match="lacks weight"):
        merge_config(spec, {})


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"search": {"gamma": {"low": 0, "high": 1}}}, "search.gamma: not a parameter of merge_method 'task_arithmetic'"),
        ({"search": {"lambda": {"low": 0, "high": 1, "per_model": True}}}, "search.lambda: per_model needs a per-model parameter"),
        ({"search": {"weight": {"low": 1.0, "high": 0.5}}}, r"search.weight: low 1.0 must be below high 0.5"),
        ({"eval_items": [8, 4]}, r"eval_items: .*strictly increasing, got \[8, 4\]"),
        ({"searcher": {"kind": "bayes"}}, r"searcher.kind: .*\(got 'bayes'\)"),
        ({"merge_method": "nope"}, "merge_method 'nope' is not supported"),
    ],
)
def test_spec_errors_name_the_path_and_value(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_spec(spec_dict(**overrides))


def test_a_merge_every_trial_would_fail_is_an_error_before_the_search():
    from collab_ray.tuning.runner import run_search

    spec = load_spec(spec_dict(merge_method="ties", search={"density": {"low": 0.2, "high": 1.0}}))  # no weight
    with pytest.raises(ConfigError, match="merge of a search point fails: missing required parameter 'weight'"):
        run_search(spec, "/nonexistent/never-written")


def test_optuna_searcher_missing_is_a_clear_error():
    from collab_ray.tuning.runner import _searcher

    spec = load_spec(spec_dict(searcher={"kind": "optuna"}))
    try:
        import optuna  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="pip install optuna"):
            _searcher(spec)
    else:
        assert type(_searcher(spec)).__name__ == "OptunaSearch"


# ------------------------------------------------------------------------------- searches


@pytest.fixture(scope="module")
def ray_connected(ray_cluster):
    """The driver connected to the session's cluster; disconnected after this module only if it connected here."""
    import ray

    connected_here = not ray.is_initialized()
    if connected_here:
        ray.init(address=ray_cluster.address, log_to_driver=False)
    yield ray_cluster
    if connected_here:
        ray.shutdown()


def test_search_writes_outputs_and_best_rescores(ray_connected, tmp_path):
    from transformers import AutoTokenizer

    from collab_ray.merge.engine import merge_to_state_dict
    from collab_ray.merge.io import ModelFiles
    from collab_ray.tuning.evaluate import load_merged, load_validation, score_model, skeleton
    from collab_ray.tuning.experiment import task_items
    from collab_ray.tuning.runner import run_search

    text = tmp_path / "val.txt"
    text.write_text("".join(p + a + "\n" for p, a in task_items("sort", "validation")))
    spec = load_spec(spec_dict(objective=[*spec_dict()["objective"], {"name": "text", "data": str(text), "metric": "neg_perplexity", "seq_len": 16, "weight": 0.01}]))
    out = tmp_path / "out"
    outcome = run_search(spec, out, verbose=0)

    assert len(outcome.trials) == 4 and outcome.counts["error"] == 0 and outcome.best is not None
    assert len({t.metrics["pid"] for t in outcome.trials}) <= 2  # 4 trials in at most 2 reused actors (2 at once)
    for name in ("best.yaml", "trials.csv", "summary.json", "objective.svg", "params.svg"):
        assert (out / name).stat().st_size > 0, name
    assert len((out / "trials.csv").read_text().splitlines()) == 1 + 4
    svg = ElementTree.parse(out / "objective.svg").getroot()  # well-formed, one point per scored trial
    assert len(svg.findall("{http://www.w3.org/2000/svg}circle")) == 4
    assert len(ElementTree.parse(out / "params.svg").getroot().findall("{http://www.w3.org/2000/svg}circle")) == 2 * 4

    best = yaml.safe_load((out / "best.yaml").read_text())  # plain mergekit YAML over checkpoint directories
    assert all(Path(m["model"]).is_dir() for m in best["models"]) and Path(best["base_model"]).is_dir()
    donor = ModelFiles(best["base_model"])
    model = skeleton(donor.config, "cpu")
    load_merged(model, merge_to_state_dict(best))
    sets = [load_validation(v, donor.path, spec.eval_items[-1]) for v in spec.objective]
    rescored = score_model(model, AutoTokenizer.from_pretrained(donor.path), sets, spec)
    assert rescored["objective"] == pytest.approx(outcome.best.metrics["objective"], abs=1e-6)


GRID = [0.5, 1.0, 0.0, 1.5, 0.6, 0.7, 0.8, 0.9, 1.1, 1.2, 1.3, 1.4]


def _failing_spec(tmp_path: Path) -> Path:
    """A normalized linear merge over a grid of one global weight; at weight 0 (a sum of 0) the merge is non-finite.
    Twelve points, one at a time: enough that an interrupt after the first finished trial lands mid-search."""
    spec = spec_dict(
        name="failing",
        merge_method="linear",
        base_model=None,
        search={"weight": {"values": GRID}},
        searcher={"kind": "grid"},
        num_samples=None,  # a grid's default: each point once
        max_concurrent_trials=1,
    )
    path = tmp_path / "failing.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_failed_trial_is_recorded_and_resume_keeps_finished_trials(ray_connected, tmp_path):
    from collab_ray.tuning.runner import run_search

    spec_path = _failing_spec(tmp_path)
    out = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": ray_connected.address}
    cmd = [sys.executable, "-m", "collab_ray.cli", "tune-merge", str(spec_path), "--output", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = _read_until(proc, re.compile(r"Trial MergeTrial_\w+ completed"))  # Tune's progress report
    proc.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves the experiment state and stops
    log = "".join(lines) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 0 and "interrupted: continue with --resume" in log, log
    before = {p: p.read_text() for p in (out / "tune").glob("*/result.json") if '"done": true' in p.read_text()}
    assert before, log
    interrupted = json.loads((out / "summary.json").read_text())
    assert interrupted["planned"] == len(GRID) and interrupted["complete"] + interrupted["error"] < len(GRID), log

    outcome = run_search(load_spec(spec_path), out, resume=True, verbose=0)
    assert [t.point["weight"] for t in outcome.trials] == GRID, log  # each grid point once
    assert [t.status for t in outcome.trials] == ["error" if w == 0.0 else "complete" for w in GRID], log
    assert "non-finite" in outcome.trials[2].error
    assert all(p.read_text() == text for p, text in before.items())  # finished trials were not run again
    assert json.loads((out / "summary.json").read_text())["error"] == 1


def _read_until(proc, pattern: re.Pattern, timeout_s: float = 180) -> list[str]:
    """The process's output lines up to the first matching one (the result files of a running
    search cannot tell: Tune syncs them to the output directory in bursts)."""
    lines: list[str] = []
    timer = threading.Timer(timeout_s, proc.kill)
    timer.start()
    try:
        for line in proc.stdout:
            lines.append(line)
            if pattern.search(line):
                return lines
    finally:
        timer.cancel()
    raise AssertionError("the search ended (or timed out) before it could be interrupted:\n" + "".join(lines))
