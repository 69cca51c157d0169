"""The ensemble strategies' fitting commands: `collab-ray route train`, `collab-ray cascade calibrate`,
`collab-ray ensemble fit`.

They run in-process models (`TransformersBackend`) over a dataset and write what a pipeline then
names in its params (a router, combiner or scorer file) or prints (cascade thresholds, fuse's
weights). They live here, with the other command-line faces, so that `collab_ray/ensemble/` reaches
models only through the `ModelBackend` protocol. Each command group registers in `register`.

Models come from `--model SOURCE` flags (one artefact, `--output`), or, for `ensemble fit`, from a
collaboration config: `collab-ray ensemble fit demo --pipelines combine,route --dataset arc_easy`
fits each named pipeline over its own models (combine: the combiner; fuse: weights and temperatures;
route: the router; rank and cascade with a learned scorer: the scorer and the cascade's threshold)
on a development part of the dataset, reports on the rest, and writes the artefact where the
pipeline's params name it (relative to the YAML, as `load_config` reads it back) or under
`--output-dir`. Every name, artefact kind and item kind is checked before any model loads.
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


def _common(p: argparse.ArgumentParser, models_required: bool = True) -> None:
    p.add_argument("--dataset", required=True, help="benchmark name (arc_easy, sciq, triviaqa, …) or a JSONL file")
    p.add_argument(
        "--model", action="append", required=models_required, default=[],
        help="SOURCE or NAME=SOURCE (NAME as in the config's pipeline), repeated, cheapest first",
    )
    p.add_argument("--limit", type=int, default=None, help="use only the first N items")


def route_train(args) -> int:
    from collab_ray.ensemble.route import parse_features, train_router
    from collab_ray.eval.datasets import load

    if len(args.model) < 2:
        raise SystemExit(f"route train needs at least 2 --model entries, got {args.model}")
    parse_features(args.features)  # an unknown option fails before any model loads
    dataset = load(args.dataset).head(args.limit)
    router = asyncio.run(
        train_router(
            _models(args.model), dataset, features=args.features, ridge=args.ridge, target=args.target,
            target_share=args.target_share if args.target_share is not None or args.target == "correct" else 0.5,
            tolerance=args.tolerance,
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
    """Fit learned ensembles on a development part of a dataset and report on the rest: for `--model` sources
    one artefact (`--output`), or for a collaboration CONFIG every pipeline `--pipelines` names."""
    from collab_ray.core.errors import ConfigError

    if bool(args.config) == bool(args.model):
        raise ConfigError("ensemble fit takes a collaboration CONFIG (with --pipelines) or --model sources (with --output), not both or neither")
    out = fit_config(args) if args.config else fit_models(args)
    print(json.dumps(out, indent=2))
    return 0


def _parts(n: int, args) -> tuple:
    """The seeded development and test indices of n items (`--dev-share`, `--seed`)."""
    from collab_ray.ensemble.combiner import split_dev_test

    return split_dev_test(n, args.dev_share, args.seed)


def fit_combine_file(records: list, names: list[str], dataset: str, path, args) -> dict:
    """A combiner fitted on the development records of `dataset`, reported on the test ones, saved at `path`."""
    import numpy as np

    from collab_ray.ensemble import combiner as cb

    dev, test = _parts(len(records), args)
    dev_records, test_records = [records[i] for i in dev], [records[i] for i in test]
    fitted = cb.fit_combiner(dev_records, names, cb.FitConfig(folds=args.folds, fallback=not args.no_fallback, seed=args.seed))
    picks = np.array([fitted.choose(r) for r in test_records])
    fitted.meta.update(dataset=dataset, dev_items=len(dev), seed=args.seed, test=cb.held_out_report(picks, test_records, fitted.meta["best_single"]))
    if fitted.fallback is not None:  # what combining would have scored on the test part, for the record
        combined = np.array([fitted.choose(r, use_fallback=False) for r in test_records])
        fitted.meta["test_without_fallback"] = cb.held_out_report(combined, test_records, fitted.meta["best_single"])
    fitted.save(path)
    return {"strategy": "combine", "models": names, "params": {"combiner": str(path)}, "fallback": fitted.fallback, "meta": fitted.meta}


def fit_fuse_params(records: list, names: list[str], dataset: str, path, args) -> dict:
    """fuse's weights and temperatures fitted on the development records, reported on the test ones (JSON at `path`, when given)."""
    from pathlib import Path

    import numpy as np

    from collab_ray.ensemble import combiner as cb

    dev, test = _parts(len(records), args)
    dev_records, test_records = [records[i] for i in dev], [records[i] for i in test]
    weights, temperatures = cb.fit_fuse(dev_records, names)
    best = max(names, key=lambda m: np.mean(cb.single_picks(dev_records, m) == [r.answer for r in dev_records]))
    report = cb.held_out_report(cb.fuse_picks(test_records, names, weights, temperatures), test_records, best)
    out = {"strategy": "fuse", "models": names, "params": {"weights": weights, "temperatures": temperatures},
           "meta": {"dataset": dataset, "dev_items": len(dev), "seed": args.seed, "test": report}}  # fmt: skip
    if path is not None:
        Path(path).write_text(json.dumps(out, indent=2) + "\n")
    return out


def fit_models(args) -> dict:
    """`--model` sources: score a multiple-choice dataset with every model (or read `--records`), fit a combiner
    or fuse's params on the development part, write `--output`."""
    from pathlib import Path

    from collab_ray.core.errors import ConfigError
    from collab_ray.ensemble import combiner as cb
    from collab_ray.eval.datasets import load

    if not args.output or args.pipelines or args.output_dir:
        raise ConfigError("with --model sources give --output (--pipelines and --output-dir go with a CONFIG)")
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
    fit = fit_fuse_params if args.method == "fuse" else fit_combine_file
    return {"output": args.output, **fit(records, names, dataset.name, args.output, args)}


# ---- config-driven fitting: `collab-ray ensemble fit CONFIG --pipelines a,b` --------------------------
FITTED = {  # strategy -> (its learned artefact, the params key naming the artefact's file; None: fuse's params live in the YAML)
    "combine": ("combiner", "combiner"),
    "fuse": ("fuse", None),
    "route": ("router", "router"),
    "rank": ("scorer", "scorer_file"),  # with scorer 'learned' only
    "cascade": ("scorer", "scorer_file"),  # with signal 'learned' only
}
KINDS_FITTED = {"combiner": "choice", "fuse": "choice", "scorer": "short"}  # the item kind each artefact is fitted on (a router: either)


def fitted_file(pipe) -> tuple[str, str | None] | None:
    """(artefact, params key of its file) that `ensemble fit` fits for a config's pipeline, or None when nothing of it is
    learned (rank and cascade: only with a learned scorer, which is when they name a `scorer_file`)."""
    what = FITTED.get(pipe.strategy)
    return what if what and (what[1] != "scorer_file" or pipe.params.get("scorer_file")) else None


def plan_fits(config_name: str, names: list[str], kind: str, output_dir: str | None) -> tuple:
    """(config, {pipeline: (artefact, {role: model}, where it is written or None)}): every check made before any model loads."""
    from pathlib import Path

    from collab_ray.config import beside_config, load_config
    from collab_ray.core.errors import ConfigError
    from collab_ray.eval.harness import KINDS

    config = load_config(config_name)
    available = config.all_pipelines()
    fittable = [n for n, p in available.items() if fitted_file(p)]
    unknown = [n for n in names if n not in available]
    if not names or unknown:
        said = (f"--pipelines: {', '.join(map(repr, unknown))} is not a pipeline of config {config_name!r}" if unknown
                else "--pipelines names the pipelines to fit")  # fmt: skip
        raise ConfigError(f"{said}; fittable pipelines: {', '.join(fittable) or 'none'}")
    plans = {}
    for n in names:
        what = fitted_file(available[n])
        if what is None:
            raise ConfigError(f"pipeline {n!r} (strategy {available[n].strategy!r}) has nothing to fit; fittable pipelines: {', '.join(fittable) or 'none'}")
        artefact, key = what
        if KINDS_FITTED.get(artefact, kind) != kind:
            raise ConfigError(f"pipeline {n!r}: its {artefact} is fitted on {KINDS[KINDS_FITTED[artefact]]} items; the dataset holds {KINDS[kind]} items")
        if output_dir:
            path = Path(output_dir) / f"{n}{'.json' if key is None else '.npz'}"
        else:
            path = None if key is None else beside_config(config_name, available[n].params[key])
        plans[n] = (artefact, config.roles(n), path)
    first: dict = {}  # file -> the first pipeline writing it; another may share it only for the same fit (rank and cascade, one scorer)
    for n, (artefact, roles, path) in plans.items():
        other = first.setdefault(path, n) if path is not None else n
        if (plans[other][0], list(plans[other][1].items())) != (artefact, list(roles.items())):  # models in order: cheapest first
            raise ConfigError(f"pipelines {other!r} and {n!r} name one file {path} for different fits; fit one at a time, or give --output-dir")
    return config, plans


async def fit_pipeline(artefact: str, backends: dict, params: dict, dataset, path, args) -> dict:
    """Fit one pipeline's artefact over its own models ({role: backend}; `params`: the pipeline's) on the development
    part; report on the rest."""
    from collab_ray.ensemble import combiner as cb

    if artefact in ("combiner", "fuse"):
        records = await cb.model_records(backends, dataset.items)
        return (fit_combine_file if artefact == "combiner" else fit_fuse_params)(records, list(backends), dataset.name, path, args)
    if artefact == "router":
        return await fit_router_file(backends, params, dataset, path, args)
    return await fit_scorer_file(backends, dataset, path, args)


async def fit_router_file(backends: dict, params: dict, dataset, path, args) -> dict:
    """A router trained on the development part (`train_router`), its route scored on the test part against the
    development part's best single model (accuracy, McNemar, model calls per item)."""
    from collab_ray.core.pipeline import Pipeline
    from collab_ray.ensemble.combiner import paired_report
    from collab_ray.ensemble.route import train_router
    from collab_ray.eval.datasets import Dataset
    from collab_ray.eval.harness import run_model, score_pipeline

    dev, test = _parts(len(dataset.items), args)
    dev_set, test_set = (Dataset(dataset.name, [dataset.items[i] for i in part]) for part in (dev, test))
    share = None if args.target == "correct" else 0.5
    router = await train_router(backends, dev_set, features=args.features, target=args.target, target_share=share, tolerance=args.tolerance)
    router.meta.update(dev_items=len(dev), seed=args.seed)
    router.save(path)
    routed = await score_pipeline("route", Pipeline("route", backends, {**params, "router": str(path)}), test_set)
    best = max(router.meta["accuracy"], key=router.meta["accuracy"].get)
    single = (await run_model(backends[best], test_set)).correct
    test_report = {**paired_report(routed.correct, single, best), "calls_per_item": routed.calls / len(test)}
    return {"strategy": "route", "models": list(backends), "params": {"router": str(path)}, "meta": {**router.meta, "test": test_report}}


async def fit_scorer_file(backends: dict, dataset, path, args) -> dict:
    """A learned answer scorer (with the cascade's stop threshold) fitted on the development part's greedy answers;
    `rank` and `cascade` with it scored on the test part against the development part's best single model."""
    import numpy as np

    from collab_ray.ensemble import scorer as sc
    from collab_ray.ensemble.cascade import fit_learned_cascade, stop_stage
    from collab_ray.ensemble.combiner import paired_report
    from collab_ray.eval.harness import SHORT_ANSWER
    from collab_ray.eval.metrics import exact_match

    items = dataset.items
    records = await sc.collect(backends, [it.prompt for it in items], lambda i, t: exact_match(t, items[i].answers), SHORT_ANSWER)
    dev, test = _parts(len(items), args)
    scorer, _ = fit_learned_cascade(records.take(dev))
    scorer.meta.update(dataset=dataset.name, dev_items=len(dev), seed=args.seed)
    scorer.save(path)
    held = records.take(test)
    rank_p = np.stack([scorer.predict(sc.item_features(held, i, "rank", scorer.features)) for i in range(len(test))])  # [T, M]
    stage_p = np.stack([scorer.predict(sc.item_features(held, i, "cascade", scorer.features)) for i in range(len(test))])  # [T, M]
    stages = np.array([stop_stage(p[:-1], scorer.meta["cascade"]["thresholds"]) for p in stage_p])  # [T]
    rows = np.arange(len(test))
    best = max(scorer.meta["accuracy"], key=scorer.meta["accuracy"].get)
    single = held.correct[:, records.models.index(best)]
    test_report = {"rank": paired_report(held.correct[rows, rank_p.argmax(1)], single, best),
                   "cascade": {**paired_report(held.correct[rows, stages], single, best), "calls_per_item": float(np.mean(stages + 1))}}  # fmt: skip
    return {"models": records.models, "params": {"scorer_file": str(path)}, "meta": {**scorer.meta, "test": test_report}}


def fit_config(args) -> dict:
    """Every pipeline `--pipelines` names of the CONFIG, fitted over its own models, each artefact written where the
    pipeline's params name it (relative to the YAML) or as OUTPUT_DIR/PIPELINE.npz|.json."""
    from pathlib import Path

    from collab_ray.core.errors import ConfigError
    from collab_ray.ensemble.route import parse_features
    from collab_ray.eval.datasets import load
    from collab_ray.eval.harness import CachedBackend
    from collab_ray.models.backend import TransformersBackend

    if args.output or args.records:
        raise ConfigError("with a CONFIG the artefacts go where its pipelines name them (or under --output-dir); --output and --records go with --model")
    parse_features(args.features)
    dataset = load(args.dataset).head(args.limit)
    _parts(len(dataset.items), args)  # a dataset too small to split fails here, before any model loads
    names = [n.strip() for n in (args.pipelines or "").split(",") if n.strip()]
    config, plans = plan_fits(args.config, names, dataset.kind, args.output_dir)
    used = {m for _, roles, _ in plans.values() for m in roles.values()}
    models = {m: CachedBackend(TransformersBackend(config.models[m], name=m)) for m in config.models if m in used}  # shared by the pipelines
    fitted, by_file = {}, {}
    for name, (artefact, roles, path) in plans.items():
        key = name if path is None else path  # a file two pipelines share is fitted once
        if key not in by_file:
            if path is not None:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            backends = {role: models[m] for role, m in roles.items()}
            fit = fit_pipeline(artefact, backends, config.pipelines[name].params, dataset, path, args)
            by_file[key] = {"artefact": artefact, "output": None if path is None else str(path), **asyncio.run(fit)}
        fitted[name] = by_file[key]
    return {"config": args.config, "dataset": dataset.name, "items": len(dataset.items), "fitted": fitted}


FEATURES_HELP = (
    "router features: minilm, hash or chars (the prompt), or KIND+confidence (e.g. chars+confidence): the first (cheapest) "
    "model answers first and its own confidence joins the prompt's features; when it is routed to, no further call"
)

TOLERANCE_HELP = (
    "with --target correct: the threshold sending the fewest queries to the last model whose cross-validated accuracy is "
    "within this of the best (e.g. 0.01; with +confidence, the fewest escalations); default 0, the likeliest right"
)


def _register_ensemble(subparsers) -> None:
    ensemble = subparsers.add_parser("ensemble", help="learned ensembles: fit a combiner, or fuse's weights and temperatures")
    ensemble_sub = ensemble.add_subparsers(dest="ensemble_command", required=True)
    fit = ensemble_sub.add_parser(
        "fit", help="score a multiple-choice set with every model, fit on a development split (cross-validated), report on the rest"
    )
    fit.add_argument(
        "config", nargs="?", default=None,
        help="collaboration YAML or packaged config name (demo, specialists): fit the pipelines --pipelines names over their own models",
    )
    _common(fit, models_required=False)
    fit.add_argument("--pipelines", default=None, help="with CONFIG: comma-separated pipelines to fit (combine, fuse, route; rank and cascade with a learned scorer)")
    fit.add_argument(
        "--output-dir", default=None,
        help="with CONFIG: write each artefact as DIR/PIPELINE.npz (fuse: .json) instead of where the pipeline's params name it (fuse's params: printed only)",
    )
    fit.add_argument("--output", default=None, help="with --model: artefact to write, a combiner (.npz) or, with --method fuse, fuse's params (.json)")
    fit.add_argument("--method", choices=["combiner", "fuse"], default="combiner", help="with --model: a learned combiner (strategy 'combine'), or fuse's weights and temperatures")
    fit.add_argument("--dev-share", type=float, default=0.5, help="share of the items fitted on; the rest only scores the fit")
    fit.add_argument("--folds", type=int, default=5, help="cross-validation folds over the development items")
    fit.add_argument("--seed", type=int, default=0, help="seed of the development/test split and of the folds")
    fit.add_argument("--no-fallback", action="store_true", help="always combine, even when not significantly better than the best single model")
    fit.add_argument("--records", default=None, help="with --model: JSONL of every model's per-choice scores, read when it exists (no model runs), else written")
    fit.add_argument("--features", default="chars", help=f"route pipelines: {FEATURES_HELP}")
    fit.add_argument("--target", choices=["score", "correct"], default="correct", help="route pipelines: what the router predicts (see route train)")
    fit.add_argument("--tolerance", type=float, default=None, help=f"route pipelines: {TOLERANCE_HELP}")
    fit.set_defaults(func=ensemble_fit)


def _register_route(subparsers) -> None:
    route = subparsers.add_parser("route", help="routers for the 'route' strategy")
    route_sub = route.add_subparsers(dest="route_command", required=True)
    train = route_sub.add_parser("train", help="run every model on a dataset, fit a router, calibrate, save")
    _common(train)
    train.add_argument("--output", required=True, help="router file to write (.npz)")
    train.add_argument("--features", default="minilm", help=FEATURES_HELP)
    train.add_argument(
        "--target", choices=["score", "correct"], default="score",
        help="predict each model's score (ridge), or whether each model will be right (logistic; routes to the likeliest)",
    )
    train.add_argument(
        "--target-share", type=float, default=None,
        help="share of queries sent to the last model (default: 0.5 with --target score; none with correct: the likeliest right)",
    )
    train.add_argument("--tolerance", type=float, default=None, help=TOLERANCE_HELP)
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
