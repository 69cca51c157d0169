"""`collab-ray eval`: score pipelines on a dataset; a table on stdout, JSON and an SVG plot on request.

Pipelines come from a collaboration YAML (its models loaded in-process), named with `--pipelines`:

    collab-ray eval deploy/demo.yaml --pipelines smollm2,gemma,fuse,vote --dataset arc_easy --output out/arc

or, without a YAML, from the command line: every `--model SOURCE` is a `single` pipeline, and every
`--pipeline STRATEGY` (optionally `STRATEGY:{json params}`) runs that strategy over all the models,
in the order given, e.g.

    collab-ray eval --dataset arc_easy --limit 100 --model smollm2-135m-instruct --model gemma3-270m \\
        --pipeline fuse --pipeline 'cascade:{"thresholds": [0.6]}' --output out/arc
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from collab_ray.core.errors import ConfigError

if TYPE_CHECKING:  # the harness pulls in torch: imported where used, so `collab-ray --help` stays fast
    from collab_ray.core.pipeline import Pipeline
    from collab_ray.eval.datasets import Dataset
    from collab_ray.eval.harness import PipelineScore


def pipelines_from_args(models: dict, specs: list[str]) -> dict[str, Pipeline]:
    """A `single` pipeline per model, plus one pipeline per `STRATEGY[:json]` spec over all models."""
    from collab_ray.core.pipeline import Pipeline

    pipelines = {name: Pipeline("single", {name: b}) for name, b in models.items()}
    for spec in specs:
        strategy, _, raw = spec.partition(":")
        try:
            params = json.loads(raw) if raw else None
        except json.JSONDecodeError as e:
            raise ConfigError(f"--pipeline {spec!r}: parameters are not JSON ({e})") from e
        name = strategy if strategy not in pipelines else f"{strategy}-{len(pipelines)}"
        pipelines[name] = Pipeline(strategy, dict(models), params)
    return pipelines


def pipelines_from_config(path: str, names: list[str]) -> dict[str, Pipeline]:
    """Pipelines `names` of the collaboration YAML at `path` (all of them if empty), over in-process models."""
    from collab_ray.config import load_config
    from collab_ray.models.backend import TransformersBackend

    config = load_config(path)
    available = config.all_pipelines()
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ConfigError(f"--pipelines: {', '.join(map(repr, unknown))} not in {path}; available: {', '.join(available)}")
    names = names or list(available)
    used = {m for n in names for m in config.roles(n).values()}
    backends = {m: TransformersBackend(config.models[m]) for m in config.models if m in used}
    return {n: config.build_pipeline(n, backends) for n in names}


def format_table(scores: list[PipelineScore]) -> str:
    from collab_ray.eval.harness import HEADER

    rows = [HEADER] + [s.row() for s in scores]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(HEADER))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows)


def eval_pipelines(pipelines: dict[str, Pipeline], dataset: Dataset, output: str | None = None) -> str:
    """Score the pipelines; write OUTPUT.json and OUTPUT.svg when `output` is given; return the table."""
    from collab_ray.eval.harness import evaluate
    from collab_ray.eval.plot import accuracy_svg

    scores, runs = asyncio.run(evaluate(pipelines, dataset))
    table = format_table(list(scores.values()))
    if output:
        out = Path(output)
        out.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "dataset": dataset.name,
            "items": len(dataset.items),
            "pipelines": {n: asdict(s) for n, s in scores.items()},
            "model_pass_s": {n: r.wall_s for n, r in runs.items()},
        }
        out.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
        accuracy_svg(list(scores.values()), f"{dataset.name} ({len(dataset.items)} items)", out.with_suffix(".svg"))
    return table


def run_eval(args) -> int:
    from collab_ray.eval.datasets import load
    from collab_ray.models.backend import TransformersBackend

    if bool(args.config) == bool(args.model):
        raise ConfigError("give either a collaboration YAML (CONFIG, with --pipelines) or --model sources, not both or neither")
    if not args.config and args.pipelines:
        raise ConfigError(f"--pipelines {args.pipelines!r} names pipelines of a CONFIG; without one use --pipeline STRATEGY")
    dataset = load(args.dataset).head(args.limit)
    if args.config:
        pipelines = pipelines_from_config(args.config, [n.strip() for n in (args.pipelines or "").split(",") if n.strip()])
    else:
        pipelines = pipelines_from_args({s: TransformersBackend(s) for s in args.model}, args.pipeline)
    print(eval_pipelines(pipelines, dataset, args.output))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="score pipelines on a dataset (accuracy, calls, tokens, wall time)")
    p.add_argument("config", nargs="?", default=None, help="collaboration YAML whose pipelines to score (models run in-process)")
    p.add_argument("--pipelines", default=None, help="comma-separated pipeline names of CONFIG (default: all, incl. one per model)")
    p.add_argument("--dataset", required=True, help="benchmark name (arc_easy, arc_challenge, sciq, triviaqa) or a JSONL file")
    p.add_argument("--model", action="append", default=[], help="without CONFIG: model source; each is also a 'single' pipeline")
    p.add_argument("--pipeline", action="append", default=[], help="without CONFIG: STRATEGY or STRATEGY:{json params}, over all models")
    p.add_argument("--limit", type=int, default=None, help="use only the first N items")
    p.add_argument("--output", default=None, help="write OUTPUT.json and OUTPUT.svg")
    p.set_defaults(func=run_eval)
