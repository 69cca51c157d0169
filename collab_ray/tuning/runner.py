"""Run a merge search with Ray Tune and write its outputs.

`run_search(spec, output)` puts the input weights into the object store once, runs the trials
(`MergeTrial`, actors reused, failures recorded), and writes to `output/`:

    best.yaml       the best complete trial's merge config (`collab-ray merge best.yaml OUT` re-runs it)
    trials.csv      every trial: status, point, items scored, objective and per-set metrics, error
    summary.json    the best trial and counts
    objective.svg   objective vs trial; params.svg: each searched value vs objective
    tune/           Tune's experiment directory (`resume=True` continues it with Tuner.restore)
    best-model/     the merged checkpoint (save_model=True)
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from collab_ray.core.errors import ConfigError
from collab_ray.tuning.evaluate import ValidationData, load_validation
from collab_ray.tuning.plot import objective_svg, params_svg
from collab_ray.tuning.space import (
    grid_values,
    merge_config,
    param_space,
    planned_trials,
    search_keys,
)
from collab_ray.tuning.references import resolve_models
from collab_ray.tuning.spec import TuneSpec, load_spec

METRIC = "objective"
KEPT = ("items", "merge_s", "eval_s", "finished_at", "time_total_s", "pid")  # reported fields kept besides the metrics


@dataclass
class TrialRow:
    """One trial as the outputs report it."""

    index: int  # creation order
    trial_id: str  # Tune's, as in the names of the trial directories under tune/
    status: str  # complete | stopped (early, by ASHA or an interruption) | error | pending (interrupted before it ran)
    point: dict
    steps: int  # evaluation subsets reported
    metrics: dict = field(default_factory=dict)  # the last report: objective, METRIC/NAME and KEPT
    error: str = ""


@dataclass
class SearchOutcome:
    """What a search wrote: every trial, the best complete one and its merge config."""

    trials: list[TrialRow]
    best: TrialRow | None
    best_config: dict | None
    output: Path
    planned: int  # trials of the whole search

    @property
    def interrupted(self) -> bool:
        """Stopped before every planned trial ran (a searcher may not have created the later ones yet)."""
        return self.counts["pending"] > 0 or len(self.trials) < self.planned

    @property
    def counts(self) -> dict[str, int]:
        """Trials by status."""
        return {s: sum(t.status == s for t in self.trials) for s in ("complete", "stopped", "error", "pending")}


def run_search(
    spec: TuneSpec | str | Path, output: str | Path, *, resume: bool = False, save_model: bool = False, verbose: int = 1
) -> SearchOutcome:
    """Run (or with `resume`, continue) the search of `spec`; write the outputs under `output`."""
    spec = resolve_models(spec if isinstance(spec, TuneSpec) else load_spec(spec))
    _check_merge(spec)
    output = Path(output).resolve()
    _check_output(spec, output, resume)
    tuner = _tuner(spec, output, resume, verbose)
    results = sorted(tuner.fit(), key=_trial_id)  # trial ids count up in creation order
    return write_outputs(spec, [_row(i, r, spec) for i, r in enumerate(results)], output, save_model)


def _check_merge(spec: TuneSpec) -> None:
    """Plan the merge of one point (no tensor is read) so that a config every trial would fail on (a required
    parameter missing, shapes that differ, …) is an error before the search starts."""
    from collab_ray.merge.config import load_config
    from collab_ray.merge.plan import build_plan

    point = {str(k): grid_values(spec.search[k.param], 2)[0] for k in search_keys(spec)}
    try:
        build_plan(load_config(merge_config(spec, point)))
    except ConfigError as e:
        raise ConfigError(f"tune spec {spec.name!r}: the merge of a search point fails: {e}") from None


def _check_output(spec: TuneSpec, output: Path, resume: bool) -> None:
    """A new search needs a fresh directory; a resumed one needs the same spec as the interrupted run."""
    saved = output / "spec.json"
    if resume:
        if not saved.is_file():
            raise ConfigError(f"--resume: {str(output)!r} holds no search to continue")
        if json.loads(saved.read_text()) != spec.model_dump(mode="json"):
            raise ConfigError(f"--resume: the spec differs from the one {str(output)!r} was started with ({saved})")
        return
    if (output / "tune").exists():
        raise ConfigError(f"{str(output)!r} already holds a search; pass --resume to continue it, or another --output")
    output.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(spec.model_dump(mode="json"), indent=2) + "\n")


def prepare(spec: TuneSpec) -> dict:
    """What every trial needs, put into the object store once: input weights, tokenizer, validation data."""
    import ray
    from transformers import AutoTokenizer

    from collab_ray.merge.io import ModelFiles
    from collab_ray.tuning.shared import read_weights

    donor = ModelFiles(spec.base_model or spec.models[0].model)
    refs = list(dict.fromkeys([m.model for m in spec.models] + ([spec.base_model] if spec.base_model else [])))
    inputs = {ref: ray.put(read_weights(ref)) for ref in refs} if spec.inputs == "object_store" else {}
    sets: list[ValidationData] = [load_validation(v, donor.path, spec.eval_items[-1]) for v in spec.objective]
    return dict(spec=spec, inputs=inputs, tokenizer=AutoTokenizer.from_pretrained(donor.path), sets=sets, model_config=donor.config)


def _tuner(spec: TuneSpec, output: Path, resume: bool, verbose: int):
    import ray
    from ray import tune

    from collab_ray.tuning.trainable import MergeTrial

    if not ray.is_initialized():
        ray.init(log_to_driver=False)  # Ray's rules: RAY_ADDRESS, else a `ray start` cluster of this machine, else a new one
    resources = {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu}
    trainable = tune.with_resources(tune.with_parameters(MergeTrial, **prepare(spec)), resources)
    path = output / "tune"
    if resume:
        return tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=False)
    run_config = tune.RunConfig(
        name="tune",
        storage_path=str(output),
        failure_config=tune.FailureConfig(max_failures=spec.max_failures),
        checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False),  # a trial re-runs in seconds: no checkpoints
        verbose=verbose,
    )
    tune_config = tune.TuneConfig(
        metric=METRIC,
        mode="max",
        search_alg=_searcher(spec),
        scheduler=_scheduler(spec),
        num_samples=spec.samples,
        max_concurrent_trials=spec.max_concurrent_trials if spec.searcher.kind == "optuna" else None,
        reuse_actors=True,
    )
    return tune.Tuner(trainable, param_space=param_space(spec), tune_config=tune_config, run_config=run_config)


def _searcher(spec: TuneSpec):
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if spec.searcher.kind != "optuna":  # Tune applies max_concurrent_trials only to a Searcher: set it here
        return BasicVariantGenerator(random_state=spec.searcher.seed, max_concurrent=spec.max_concurrent_trials)
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise ConfigError("searcher.kind: optuna needs the optuna package: pip install optuna (or the collab_ray[optuna] extra)") from None
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(seed=spec.searcher.seed)


def _scheduler(spec: TuneSpec):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = spec.scheduler
    if s.kind == "fifo" or len(spec.eval_items) == 1:
        return FIFOScheduler()
    rungs = len(spec.eval_items)
    return ASHAScheduler(max_t=rungs, grace_period=min(s.grace_period, rungs), reduction_factor=s.reduction_factor)


def _trial_id(result) -> str:
    """Tune's id of a trial ('1a2b3_00007'), from its directory name (also there for trials that never reported)."""
    return re.search(r"_([0-9a-f]{5}_\d{5})_", Path(result.path).name).group(1)


def _row(index: int, result, spec: TuneSpec) -> TrialRow:
    params = Path(result.path) / "params.json"  # for a trial that never reported; absent for one never started
    config = result.config or (json.loads(params.read_text()) if params.is_file() else {})
    point = {str(k): config.get(str(k)) for k in search_keys(spec)}
    metrics = {k: v for k, v in (result.metrics or {}).items() if k == METRIC or "/" in k or k in KEPT}
    steps = int((result.metrics or {}).get("training_iteration", 0))
    if result.error is not None:
        status, error = "error", str(result.error).strip().splitlines()[-1]
    else:
        status, error = ("pending" if steps == 0 else "complete" if steps == len(spec.eval_items) else "stopped"), ""
    return TrialRow(index, _trial_id(result), status, point, steps, metrics, error)


def write_outputs(spec: TuneSpec, trials: list[TrialRow], output: Path, save_model: bool = False) -> SearchOutcome:
    """best.yaml, trials.csv, summary.json and the plots (and the best merged model) under `output`."""
    complete = [t for t in trials if t.status == "complete"]
    best = max(complete, key=lambda t: t.metrics[METRIC]) if complete else None
    best_config = merge_config(spec, best.point) if best else None
    _write_csv(trials, output / "trials.csv")
    objective_svg(trials, spec.name, output / "objective.svg")
    params_svg(trials, [str(k) for k in search_keys(spec)], spec.name, output / "params.svg")
    outcome = SearchOutcome(trials, best, best_config, output, planned_trials(spec))
    summary = {"spec": spec.name, "trials": len(trials), "planned": outcome.planned, **outcome.counts, "best": None}
    if best is not None:
        header = f"# best of {len(trials)} trials of {spec.name!r}: objective {best.metrics[METRIC]:.4f} on {best.metrics['items']} items per set\n"
        (output / "best.yaml").write_text(header + yaml.safe_dump(best_config, sort_keys=False))
        summary["best"] = {"trial": best.index, "point": best.point, "metrics": best.metrics, "config": best_config}
        if save_model:
            from collab_ray.merge.engine import merge

            merge(best_config, output / "best-model", overwrite=True, progress=False)
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return outcome


def _write_csv(trials: list[TrialRow], path: Path) -> None:
    metric_names = list(dict.fromkeys(k for t in trials for k in t.metrics))
    point_names = list(dict.fromkeys(k for t in trials for k in t.point))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial", "trial_id", "status", "steps", *point_names, *metric_names, "error"])
        for t in trials:
            w.writerow([t.index, t.trial_id, t.status, t.steps, *(t.point.get(k) for k in point_names), *(t.metrics.get(k) for k in metric_names), t.error])
