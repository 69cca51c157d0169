"""`collab-ray eval`: score pipelines on a dataset; a table on stdout, JSON and an SVG plot on request.

Pipelines come from a collaboration YAML (its models loaded in-process), named with `--pipelines`
(without it: every pipeline of the YAML that can answer the dataset's kind of item, the others
named on stderr with the reason):

    collab-ray eval deploy/demo.yaml --pipelines smollm2,gemma,fuse,vote --dataset arc_easy --output out/arc

or, without a YAML, from the command line: every `--model SOURCE` is a `single` pipeline, and every
`--pipeline STRATEGY` (optionally `STRATEGY:{json params}`) runs that strategy over all the models,
in the order given, e.g.

    collab-ray eval --dataset arc_easy --limit 100 --model smollm2-135m-instruct --model gemma3-270m \\
        --pipeline fuse --pipeline 'cascade:{"thresholds": [0.6]}' --output out/arc

Every input is checked before any model loads: the dataset's rows, `--limit`, the pipelines'
strategies, parameters and models, and whether each pipeline can answer the dataset's kind of item.
The table compares every pipeline with the best single model (McNemar's exact test on the same
items). `--output OUT` writes OUT.json (per-pipeline scores, per-item records, paired tests) after
every model pass and pipeline pass, so a run that fails or is interrupted keeps what it computed
(`"complete": false`), and OUT.svg at the end; OUT is kept as given (`run.v2` -> `run.v2.json`).
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from collab_ray.core.errors import ConfigError

if TYPE_CHECKING:  # the harness pulls in torch: imported where used, so `collab-ray --help` stays fast
    from collab_ray.core.pipeline import Pipeline
    from collab_ray.core.strategy import Strategy
    from collab_ray.eval.datasets import Dataset
    from collab_ray.eval.harness import Evaluation
    from collab_ray.models.config import ModelConfig


@dataclass
class Plan:
    """The pipelines to score, checked, before any model is loaded."""

    pipelines: dict[str, tuple[Strategy, dict[str, str]]]  # name -> (strategy, {role or model name: model name})
    models: dict[str, ModelConfig | str]  # model name -> what to load (a config's model, or a source)
    skipped: dict[str, str] = field(default_factory=dict)  # pipeline -> why it cannot answer the items


def _strategy(name: str, params: dict | None, models: list[str] | dict[str, str], where: str) -> Strategy:
    """A strategy with its parameters validated and its model assignment checked (no model needed)."""
    from pydantic import ValidationError

    from collab_ray.core.strategy import get_strategy

    cls = get_strategy(name)
    cls.check_models(models, where)
    try:
        return cls(params)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}, got {err['input']!r}" for err in e.errors())
        raise ConfigError(f"{where}: {problems}") from e


def _answerable(plan: Plan, kind: str, named: bool) -> Plan:
    """The plan cut down to the pipelines that can answer `kind` items: an error naming those that cannot
    when the user named them (`named`), else they are skipped with the reason."""
    from collab_ray.eval.harness import KINDS, cannot_answer

    unable = {n: r for n, (s, _) in plan.pipelines.items() if (r := cannot_answer(s, kind))}
    able = [n for n in plan.pipelines if n not in unable]
    if unable and (named or not able):
        can = f"; pipelines that can: {', '.join(able)}" if able else ""
        raise ConfigError("; ".join(f"pipeline {n!r}: {r}" for n, r in unable.items()) + f" (the dataset holds {KINDS[kind]} items{can})")
    pipelines = {n: plan.pipelines[n] for n in able}
    used = {m for _, roles in pipelines.values() for m in roles.values()}
    return Plan(pipelines, {m: c for m, c in plan.models.items() if m in used}, unable)


def plan_from_args(sources: list[str], specs: list[str], kind: str) -> Plan:
    """A `single` pipeline per model source, plus one pipeline per `STRATEGY[:json]` spec over all of them."""
    pipelines = {s: (_strategy("single", None, [s], f"--model {s}"), {s: s}) for s in sources}
    for spec in specs:
        strategy, _, raw = spec.partition(":")
        try:
            params = json.loads(raw) if raw else None
        except json.JSONDecodeError as e:
            raise ConfigError(f"--pipeline {spec!r}: parameters are not JSON ({e})") from e
        name = strategy if strategy not in pipelines else f"{strategy}-{len(pipelines)}"
        pipelines[name] = (_strategy(strategy, params, list(sources), f"--pipeline {spec}"), {s: s for s in sources})
    return _answerable(Plan(pipelines, {s: s for s in sources}), kind, named=True)


def plan_from_config(path: str, names: list[str], kind: str) -> Plan:
    """Pipelines `names` of the collaboration YAML at `path` (without names: every one that can answer `kind` items)."""
    from collab_ray.config import load_config

    config = load_config(path)
    available = config.all_pipelines()
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ConfigError(f"--pipelines: {', '.join(map(repr, unknown))} not in {path}; available: {', '.join(available)}")
    pipelines = {
        n: (_strategy(available[n].strategy, available[n].params, available[n].models, f"{path}: pipelines.{n}"), config.roles(n))
        for n in names or available
    }
    return _answerable(Plan(pipelines, dict(config.models)), kind, named=bool(names))


def load_pipelines(plan: Plan) -> dict[str, Pipeline]:
    """The plan's pipelines over in-process models (each model loaded once, named as the plan names it)."""
    from collab_ray.core.pipeline import Pipeline
    from collab_ray.models.backend import TransformersBackend

    backends = {m: TransformersBackend(c, name=m) for m, c in plan.models.items()}
    return {n: Pipeline(s, {role: backends[m] for role, m in roles.items()}) for n, (s, roles) in plan.pipelines.items()}


def format_table(done: Evaluation) -> str:
    """One row per pipeline, with its difference to the best single model and McNemar's p."""
    from collab_ray.eval.harness import HEADER

    best, paired = done.best_single(), done.paired()
    rows = [[*HEADER, f"vs best single {best} [McNemar p]"]]
    rows += [[*s.row(), f"{100 * paired[n].diff:+.1f} [p={paired[n].p_value:.2g}]"] for n, s in done.scores.items()]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def output_paths(output: str) -> tuple[Path, Path]:
    """(OUTPUT.json, OUTPUT.svg), the name kept as given (a trailing .json is not doubled); the folder is made now."""
    base = output.removesuffix(".json")
    if base.endswith(("/", "\\")) or Path(base).is_dir():
        raise ConfigError(f"--output {output!r} names a folder; give a file name stem, e.g. {output.rstrip('/')}/run")
    json_path, svg_path = Path(base + ".json"), Path(base + ".svg")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    return json_path, svg_path


def _plain(value):
    """numpy / torch values in strategies' decision meta, as JSON values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} {value!r} is not JSON serializable")


def write_json(done: Evaluation, path: Path, complete: bool) -> None:
    """The evaluation as JSON, replaced atomically (a crash mid-write leaves the previous file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(done.as_dict(complete), indent=2, default=_plain) + "\n")
    tmp.replace(path)


def eval_pipelines(pipelines: dict[str, Pipeline], dataset: Dataset, output: str | None = None) -> str:
    """Score the pipelines; write OUTPUT.json (after every pass) and OUTPUT.svg when `output` is given; return the table."""
    from collab_ray.eval.harness import evaluate
    from collab_ray.eval.plot import accuracy_svg

    paths = output_paths(output) if output else None
    save = (lambda done: write_json(done, paths[0], complete=False)) if paths else None
    try:
        done = asyncio.run(evaluate(pipelines, dataset, on_update=save))
    except BaseException:  # a failure or Ctrl-C: say where the passes already done are
        if paths and paths[0].is_file():
            print(f"collab-ray eval: stopped; the passes done so far are in {paths[0]} (complete: false)", file=sys.stderr)
        raise
    if paths:
        write_json(done, paths[0], complete=True)
        accuracy_svg(list(done.scores.values()), f"{dataset.name} ({len(dataset.items)} items)", paths[1])
    return format_table(done)


def run_eval(args) -> int:
    from collab_ray.eval.datasets import load

    if bool(args.config) == bool(args.model):
        raise ConfigError("give either a collaboration YAML (CONFIG, with --pipelines) or --model sources, not both or neither")
    if not args.config and args.pipelines:
        raise ConfigError(f"--pipelines {args.pipelines!r} names pipelines of a CONFIG; without one use --pipeline STRATEGY")
    if args.output:
        output_paths(args.output)
    dataset = load(args.dataset).head(args.limit)
    if args.config:
        names = [n.strip() for n in (args.pipelines or "").split(",") if n.strip()]
        plan = plan_from_config(args.config, names, dataset.kind)
    else:
        plan = plan_from_args(args.model, args.pipeline, dataset.kind)
    for name, why in plan.skipped.items():
        print(f"collab-ray eval: skipping pipeline {name!r}: {why}", file=sys.stderr)
    print(eval_pipelines(load_pipelines(plan), dataset, args.output))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="score pipelines on a dataset (accuracy, calls, tokens, wall time)")
    p.add_argument("config", nargs="?", default=None, help="collaboration YAML whose pipelines to score (models run in-process)")
    p.add_argument("--pipelines", default=None, help="comma-separated pipeline names of CONFIG (default: every one, incl. one per model, that can answer the dataset's items)")
    p.add_argument("--dataset", required=True, help="a JSONL file, a benchmark name (arc_easy, arc_challenge, sciq, triviaqa) or the multi-task experiment's held-out items (e.g. multitask-hard:test, multitask-hard:validation:add)")
    p.add_argument("--model", action="append", default=[], help="without CONFIG: model source; each is also a 'single' pipeline")
    p.add_argument("--pipeline", action="append", default=[], help="without CONFIG: STRATEGY or STRATEGY:{json params}, over all models")
    p.add_argument("--limit", type=int, default=None, help="use only the first N items (N >= 1)")
    p.add_argument("--output", default=None, help="write OUTPUT.json (after every pass) and OUTPUT.svg")
    p.set_defaults(func=run_eval)
