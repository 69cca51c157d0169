"""`collab-ray tune-merge`: argparse wiring (`register`) and the command function."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    """Add the `tune-merge` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "tune-merge",
        help="search merge coefficients with Ray Tune (best merge YAML, trials CSV, plots)",
        description="Search the merge parameters of a tune spec (tune_configs/*.yaml) with Ray Tune: each trial merges "
        "in memory from weights shared through the object store and scores the merge on the spec's validation sets. "
        "Set RAY_ADDRESS to run on an existing cluster.",
    )
    p.add_argument("spec", metavar="SPEC.yaml", help="tune spec (see tune_configs/)")
    p.add_argument("--output", default=None, help="output directory (default: runs/tune/NAME)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search in --output (finished trials are kept)")
    p.add_argument("--save-model", action="store_true", help="also write the best merge as a checkpoint (OUTPUT/best-model)")
    p.add_argument("--quiet", action="store_true", help="no Tune progress reports")
    p.set_defaults(func=run_tune_merge)


def run_tune_merge(args: argparse.Namespace) -> int:
    import collab_ray.tuning.experiment  # noqa: F401  (registers the experiment's multitask:… models and task:… data)
    from collab_ray.tuning.runner import run_search
    from collab_ray.tuning.spec import load_spec

    spec = load_spec(args.spec)
    output = Path(args.output or Path("runs") / "tune" / spec.name)
    outcome = run_search(spec, output, resume=args.resume, save_model=args.save_model, verbose=0 if args.quiet else 1)
    print(f"{len(outcome.trials)} of {outcome.planned} trials: " + ", ".join(f"{n} {s}" for s, n in outcome.counts.items()))
    if outcome.interrupted:
        print(f"interrupted: continue with --resume --output {output}")
    if outcome.best is None:
        print(f"no trial completed; see {output / 'trials.csv'}")
        return 1
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in outcome.best.metrics.items() if k == "objective" or "/" in k)
    print(f"best trial {outcome.best.index}: {metrics}")
    print(f"wrote {output}: best.yaml, trials.csv, summary.json, objective.svg, params.svg" + (", best-model/" if args.save_model else ""))
    return 0
