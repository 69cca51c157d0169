"""The ensemble strategies' fitting commands: `collab-ray route train`, `collab-ray cascade calibrate`,
`collab-ray ensemble fit`.

They run in-process models named by source (`TransformersBackend`) over a dataset and write what a
pipeline then names in its params (a router file) or prints (cascade thresholds). They live here,
with the other command-line faces, so that `collab_ray/ensemble/` reaches models only through the
`ModelBackend` protocol. Each command group registers in `register`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import asdict


def _models(specs: list[str]) -> dict:
    """`--model` entries, `SOURCE` or `NAME=SOURCE` (NAME: the model's name in the collaboration config)."""
    from collab_ray.models.backend import TransformersBackend

    models = {}
    for spec in specs:
        name, _, source = spec.rpartition("=")
        models[name or source] = TransformersBackend(source)
    return models


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help="benchmark name (arc_easy, sciq, triviaqa, …) or a JSONL file")
    p.add_argument("--model", action="append", required=True, help="SOURCE or NAME=SOURCE (NAME as in the config's pipeline), repeated, cheapest first")
    p.add_argument("--limit", type=int, default=None, help="use only the first N items")


def route_train(args) -> int:
    from collab_ray.ensemble.route import train_router
    from collab_ray.eval.datasets import load

    if len(args.model) < 2:
        raise SystemExit(f"route train needs at least 2 --model entries, got {args.model}")
    dataset = load(args.dataset).head(args.limit)
    router = asyncio.run(
        train_router(
            _models(args.model), dataset, features=args.features, ridge=args.ridge, target=args.target,
            target_share=args.target_share if args.target_share is not None or args.target == "correct" else 0.5,
        )
    )
    router.save(args.output)
    print(json.dumps({"output": args.output, "threshold": router.threshold, **router.meta}, indent=2))
    return 0


def cascade_calibrate(args) -> int:
    from collab_ray.ensemble.cascade import calibrate_cascade
    from collab_ray.eval.datasets import load

    if (args.target_accuracy is None) == (args.target_share is None):
        raise SystemExit("cascade calibrate needs exactly one of --target-accuracy and --target-share")
    dataset = load(args.dataset).head(args.limit)
    point = asyncio.run(
        calibrate_cascade(
            _models(args.model), dataset, target_accuracy=args.target_accuracy, target_share=args.target_share
        )
    )
    print(json.dumps({"models": args.model, "dataset": dataset.name, "items": len(dataset.items), **asdict(point)}, indent=2))
    return 0


def ensemble_fit(args) -> int:
    """Score a multiple-choice dataset with every model (or read the scores from `--records`), split it into a
    development and a test part, fit on development (cross-validated), report on test, write the artefact."""
    from pathlib import Path

    import numpy as np

    from collab_ray.core.errors import ConfigError
    from collab_ray.ensemble import combiner as cb
    from collab_ray.eval.datasets import load

    dataset = load(args.dataset).head(args.limit)
    if dataset.kind != "choice":
        raise ConfigError(f"ensemble fit needs a multiple-choice dataset; {args.dataset!r} holds short-answer items")
    if args.records and Path(args.records).is_file():
        records = cb.records_from_jsonl(args.records)
        ids = [it.id for it in dataset.items]
        if [r.id for r in records] != ids:
            raise ConfigError(f"--records {args.records!r} holds other items than {dataset.name!r} ({len(records)} records, {len(ids)} items)")
        names = list(records[0].scores)
    else:
        models = _models(args.model)
        names = list(models)
        records = asyncio.run(cb.model_records(models, dataset.items, progress=lambda i, n: print(f"scored {i}/{n} items", flush=True)))
        if args.records:
            cb.records_to_jsonl(records, args.records)
    dev, test = cb.split_dev_test(len(records), args.dev_share, args.seed)
    dev_records, test_records = [records[i] for i in dev], [records[i] for i in test]
    where = {"dataset": dataset.name, "dev_items": len(dev), "seed": args.seed}
    if args.method == "fuse":
        weights, temperatures = cb.fit_fuse(dev_records, names)
        best = max(names, key=lambda m: np.mean(cb.single_picks(dev_records, m) == [r.answer for r in dev_records]))
        report = cb.held_out_report(cb.fuse_picks(test_records, names, weights, temperatures), test_records, best)
        out = {"strategy": "fuse", "models": names, "params": {"weights": weights, "temperatures": temperatures}, "meta": {**where, "test": report}}
        Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
    else:
        config = cb.FitConfig(folds=args.folds, fallback=not args.no_fallback, seed=args.seed)
        fitted = cb.fit_combiner(dev_records, names, config)
        picks = np.array([fitted.choose(r) for r in test_records])
        fitted.meta.update(where, test=cb.held_out_report(picks, test_records, fitted.meta["best_single"]))
        if fitted.fallback is not None:  # what combining would have scored on the test part, for the record
            combined = np.array([fitted.choose(r, use_fallback=False) for r in test_records])
            fitted.meta["test_without_fallback"] = cb.held_out_report(combined, test_records, fitted.meta["best_single"])
        fitted.save(args.output)
        out = {"strategy": "combine", "models": names, "params": {"combiner": args.output}, "fallback": fitted.fallback, "meta": fitted.meta}
    print(json.dumps({"output": args.output, **out}, indent=2))
    return 0


def _register_ensemble(subparsers) -> None:
    ensemble = subparsers.add_parser("ensemble", help="learned ensembles: fit a combiner, or fuse's weights and temperatures")
    ensemble_sub = ensemble.add_subparsers(dest="ensemble_command", required=True)
    fit = ensemble_sub.add_parser(
        "fit", help="score a multiple-choice set with every model, fit on a development split (cross-validated), report on the rest"
    )
    _common(fit)
    fit.add_argument("--output", required=True, help="artefact to write: a combiner (.npz) or, with --method fuse, fuse's params (.json)")
    fit.add_argument("--method", choices=["combiner", "fuse"], default="combiner", help="a learned combiner (strategy 'combine'), or fuse's weights and temperatures")
    fit.add_argument("--dev-share", type=float, default=0.5, help="share of the items fitted on; the rest only scores the fit")
    fit.add_argument("--folds", type=int, default=5, help="cross-validation folds over the development items")
    fit.add_argument("--seed", type=int, default=0, help="seed of the development/test split and of the folds")
    fit.add_argument("--no-fallback", action="store_true", help="always combine, even when not significantly better than the best single model")
    fit.add_argument("--records", default=None, help="JSONL of every model's per-choice scores: read when it exists (no model runs), else written")
    fit.set_defaults(func=ensemble_fit)


def _register_route(subparsers) -> None:
    route = subparsers.add_parser("route", help="routers for the 'route' strategy")
    route_sub = route.add_subparsers(dest="route_command", required=True)
    train = route_sub.add_parser("train", help="run every model on a dataset, fit a router, calibrate, save")
    _common(train)
    train.add_argument("--output", required=True, help="router file to write (.npz)")
    train.add_argument("--features", choices=["minilm", "hash", "chars"], default="minilm", help="query features")
    train.add_argument(
        "--target", choices=["score", "correct"], default="score",
        help="predict each model's score (ridge), or whether each model will be right (logistic; routes to the likeliest)",
    )
    train.add_argument(
        "--target-share", type=float, default=None,
        help="share of queries sent to the last model (default: 0.5 with --target score; none with correct: the likeliest right)",
    )
    train.add_argument("--ridge", type=float, default=1.0, help="regularization: ridge of the score predictors, C = 1/ridge of the correct ones")
    train.set_defaults(func=route_train)


def _register_cascade(subparsers) -> None:
    cascade = subparsers.add_parser("cascade", help="thresholds for the 'cascade' strategy")
    cascade_sub = cascade.add_subparsers(dest="cascade_command", required=True)
    cal = cascade_sub.add_parser("calibrate", help="choose stage thresholds on dev data")
    _common(cal)
    cal.add_argument("--target-accuracy", type=float, default=None, help="cheapest thresholds reaching this accuracy")
    cal.add_argument("--target-share", type=float, default=None, help="most accurate with at most this share at the last stage")
    cal.set_defaults(func=cascade_calibrate)


def register(subparsers) -> None:
    """Every command group of this module (each in its own `_register_*`; LAZY in collab_ray/cli.py names them)."""
    _register_route(subparsers)
    _register_cascade(subparsers)
    _register_ensemble(subparsers)
