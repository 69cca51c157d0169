"""Benchmark: the multitask-hard specialists kept apart (`deploy/specialists.yaml`) against merging them.

The base and its three fine-tunes (`collab_ray.models.multitask`, recipe multitask-hard) answer the
experiment's 768 held-out test items (3 tasks × 256, raw prompts, greedy, exact match) as single
models and as every pipeline of the config: route (learned router), rank and cascade (learned
scorer), rank by log-prob, fuse, vote. Beside them: the oracle (any model right), and the merges of
`benchmarks/results/multitask-hard.md`, quoted from that file (same test items). Each pipeline's
cost is its model calls per item; each is compared with the best single model by McNemar's exact
test on the same items.

`--fit` first fits the router and the scorer on the validation split (768 other items; 5-fold
cross-validation there picks nothing but measures them, and the cascade's threshold is chosen on
out-of-fold scores) and writes them where the config names them (collab_ray/configs/routers/ and
scorers/specialists.npz). The test split is never used for fitting.

    python benchmarks/ensemble_specialists.py [--fit] [--limit N] [--recipe multitask-small --artefacts DIR]

Results: benchmarks/results/ensemble-specialists.{md,json} (and .svg: the router's share curve).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, markdown_table, write_results  # noqa: E402

from collab_ray.config import load_config  # noqa: E402
from collab_ray.eval.datasets import Dataset, load  # noqa: E402
from collab_ray.eval.metrics import accuracy, exact_match, paired_comparison  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "deploy" / "specialists.yaml"
ARTEFACTS = ROOT / "collab_ray" / "configs"
FILES = {"router": "routers/specialists.npz", "scorer_file": "scorers/specialists.npz"}
TASKS = ("add", "reverse", "sort")
MERGES_MD = RESULTS / "multitask-hard.md"
DECISION_KEYS = ("text", "routed_to", "stage", "model", "chosen", "fallback")  # per item, what the JSON keeps of a decision


def backends(config, recipe: str) -> dict:
    from collab_ray.models.backend import TransformersBackend

    return {name: TransformersBackend(m.model_copy(update={"source": f"{recipe}:{name}"})) for name, m in config.models.items()}


def fit(models: dict, dev: Dataset, artefacts: Path) -> dict:
    """Router and scorer fitted on the validation items, written under `artefacts` (their CV figures in their meta)."""
    from collab_ray.ensemble.cascade import fit_learned_cascade, simulate
    from collab_ray.ensemble.route import featurize, fit_correct_router
    from collab_ray.ensemble.scorer import collect
    from collab_ray.eval.harness import SHORT_ANSWER

    start = time.perf_counter()
    records = asyncio.run(
        collect(models, [it.prompt for it in dev.items], lambda i, t: exact_match(t, dev.items[i].answers), SHORT_ANSWER)
    )
    router = fit_correct_router(featurize([it.prompt for it in dev.items], "chars"), records.correct, records.models, "chars")
    router.meta["dataset"] = dev.name
    scorer, stage_p = fit_learned_cascade(records)
    cascade_curve = [  # out-of-fold on the validation items: one threshold for every stage
        {"threshold": round(float(t), 2), "accuracy": q.accuracy, "calls": q.calls}
        for t in np.linspace(0.05, 0.95, 19)
        for q in [simulate(stage_p, records.correct, [t] * (len(records.models) - 1))]
    ]
    scorer.meta["dataset"] = dev.name
    scorer.meta["cascade"]["cv_curve"] = cascade_curve
    for key, obj in (("router", router), ("scorer_file", scorer)):
        path = artefacts / FILES[key]
        path.parent.mkdir(parents=True, exist_ok=True)
        obj.save(path)
    return {"fit_s": round(time.perf_counter() - start, 1)}


def quoted_rows() -> list[dict]:
    """The rows of benchmarks/results/multitask-hard.md (per-task and mean test accuracy): base, fine-tunes, merges."""
    rows = []
    for line in MERGES_MD.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] != "model" and not cells[0].startswith("---"):
            rows.append({"name": cells[0], **{t: float(c.rstrip("%")) for t, c in zip((*TASKS, "mean"), cells[1:5])}})
    return rows


def merges() -> list[dict]:
    return [r for r in quoted_rows() if not r["name"].startswith(("base", "fine-tune"))]


def per_task(ids: list[str], correct: list[bool]) -> dict[str, float]:
    """Accuracy (%) per task (item ids are TASK-INDEX) and their mean."""
    acc = {t: 100 * float(np.mean([c for i, c in zip(ids, correct) if i.startswith(f"{t}-")])) for t in TASKS}
    return {**acc, "mean": sum(acc.values()) / len(acc)}


def share_svg(points: list[dict], models: list[str], path: Path) -> None:
    """Accuracy against the share of items routed to each model, one line per model (offsets on its predictions)."""
    w, h, pad = 420, 300, 40
    colours = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2"]
    x = lambda v: pad + v * (w - 2 * pad)  # noqa: E731
    y = lambda v: h - pad - v * (h - 2 * pad)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w + 120}" height="{h}" font-family="sans-serif" font-size="11">']
    parts.append(f'<text x="{pad}" y="16">route on test items: accuracy vs share of items sent to a model</text>')
    parts.append(f'<line x1="{pad}" y1="{y(0)}" x2="{x(1)}" y2="{y(0)}" stroke="black"/><line x1="{pad}" y1="{y(0)}" x2="{pad}" y2="{y(1)}" stroke="black"/>')
    for t in (0, 0.5, 1):
        parts.append(f'<text x="{x(t)}" y="{y(0) + 14}" text-anchor="middle">{t:.0%}</text><text x="{pad - 4}" y="{y(t) + 4}" text-anchor="end">{t:.0%}</text>')
    for m, name in enumerate(models):
        pts = sorted((p["shares"][m], p["accuracy"]) for p in points if p["model"] == m)
        line = " ".join(f"{x(s):.1f},{y(a):.1f}" for s, a in pts)
        parts.append(f'<polyline points="{line}" fill="none" stroke="{colours[m % 5]}" stroke-width="1.5"/>')
        parts.append(f'<text x="{w - pad + 10}" y="{40 + 14 * m}" fill="{colours[m % 5]}">{name}</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fit", action="store_true", help="fit the router and scorer on the validation split first")
    parser.add_argument("--limit", type=int, default=None, help="first N items of each split (tasks interleaved)")
    parser.add_argument("--recipe", default="multitask-hard", help="checkpoints (multitask-small: a seconds-sized smoke run)")
    parser.add_argument("--artefacts", type=Path, default=ARTEFACTS, help="where the fitted files are written and read")
    parser.add_argument("--output", default="ensemble-specialists", help="results name under benchmarks/results/")
    args = parser.parse_args(argv)

    from collab_ray.core.pipeline import Pipeline
    from collab_ray.ensemble.route import Router, featurize, share_curve
    from collab_ray.ensemble.scorer import Scorer
    from collab_ray.eval.harness import evaluate

    config = load_config(CONFIG)
    models = backends(config, args.recipe)
    dev, test = load(f"{args.recipe}:validation").head(args.limit), load(f"{args.recipe}:test").head(args.limit)
    fitted = fit(models, dev, args.artefacts) if args.fit else {}

    pipelines = {}
    for name in config.all_pipelines():
        pipe = config.all_pipelines()[name]
        params = {k: str(args.artefacts / FILES[k]) if k in FILES else v for k, v in pipe.params.items()}
        pipelines[name] = Pipeline(pipe.strategy, {role: models[m] for role, m in config.roles(name).items()}, params)
    start = time.perf_counter()
    scores = asyncio.run(evaluate(pipelines, test)).scores
    wall = time.perf_counter() - start

    ids = [it.id for it in test.items]
    n = len(ids)
    singles = list(config.models)
    best = max(singles, key=lambda s: scores[s].accuracy.value)
    oracle = [any(scores[s].correct[i] for s in singles) for i in range(n)]
    rows, data = [], {"items": n, "dataset": test.name, "ids": ids, "best_single": best, "pipelines": {}}
    for name, s in [*scores.items(), ("oracle (any model right)", None)]:
        correct = s.correct if s else oracle
        kind = "single" if name in singles else "bound" if s is None else config.all_pipelines()[name].strategy
        acc = per_task(ids, correct)
        calls = 1.0 if kind == "single" else s.calls / n if s else None  # a single model: one generation per item (batched here)
        test_ = paired_comparison(correct, scores[best].correct)
        vs = "" if name == best else f"{100 * test_.diff:+.1f} ({test_.a_only}/{test_.b_only}, p = {test_.p_value:.1e})"
        rows.append([name, kind, *(f"{acc[t]:.1f}%" for t in (*TASKS, "mean")), str(accuracy(correct)), "" if calls is None else f"{calls:.2f}", vs])
        data["pipelines"][name] = {
            "kind": kind,
            **acc,
            "calls_per_item": calls,
            "vs_best_single": {"diff": test_.diff, "a_only": test_.a_only, "b_only": test_.b_only, "p_value": test_.p_value},
            "correct": [bool(c) for c in correct],
            "decisions": [{k: v for k, v in d.items() if k in DECISION_KEYS} for d in s.decisions] if s else None,
        }
    for m in merges():
        rows.append([m["name"], "merge (quoted)", *(f"{m[t]:.1f}%" for t in (*TASKS, "mean")), "", "1.00", ""])
    data["merges_quoted_from"] = str(MERGES_MD.relative_to(ROOT))
    data["merges"] = merges()

    router = Router.load(args.artefacts / FILES["router"])
    pred = router.predict(featurize([it.prompt for it in test.items], router.features))
    correct = np.stack([np.array(scores[m].correct) for m in router.models], 1)
    curve = share_curve(pred, correct)
    share_svg(curve, router.models, RESULTS / f"{args.output}.svg")
    data.update(share_curve={"models": router.models, "points": curve}, fitted=fitted, eval_wall_s=round(wall, 1), load_1m=round(os.getloadavg()[0], 2))
    scorer = Scorer.load(args.artefacts / FILES["scorer_file"])
    data.update(router_meta=router.meta, scorer_meta=scorer.meta)

    header = ["pipeline", "kind", *TASKS, "mean", "accuracy [95% CI]", "model calls / item", "vs best single (only it / only best, McNemar p)"]
    table = markdown_table(header, rows)
    print(table)
    ensembles = {k: v for k, v in data["pipelines"].items() if v["kind"] not in ("single", "bound")}
    top = max(ensembles, key=lambda k: ensembles[k]["mean"])
    quoted_singles = ", ".join(f"{r['name']} {r['mean']:.1f}% mean" for r in quoted_rows() if r["name"].startswith(("base", "fine-tune")))
    transformers_version = sys.modules["transformers"].__version__  # loaded with the models
    route = data["pipelines"].get("route", {})
    notes = (
        f"Held-out test items: {n} ({test.name}, tasks interleaved), greedy answers (≤ 16 tokens, one line), exact match; "
        f"the router and the scorer were fitted on {dev.name} only. Best single model: {best} "
        f"({data['pipelines'][best]['mean']:.1f}% mean). Best ensemble: {top} ({ensembles[top]['mean']:.1f}% mean, "
        f"{ensembles[top]['calls_per_item']:.2f} calls per item). Targets: best ensemble ≥ 88% mean "
        f"({'met' if ensembles[top]['mean'] >= 88 else 'missed'}); route ≤ 1.2 calls per item "
        f"({route.get('calls_per_item', float('nan')):.2f}: {'met' if route.get('calls_per_item', 9) <= 1.2 else 'missed'}). "
        f"Merges: quoted from `{data['merges_quoted_from']}` (same {3 * 256} test items, merged checkpoints, one call per item). "
        "`model calls / item` counts the generate and log-likelihood calls (one prompt each) a pipeline made; a single "
        "model makes one generation per item (the harness batched them 16 to a call); fuse steps every model token by "
        "token. The merges' figures were measured on the checkpoints built where `multitask-hard.md` was made "
        f"({quoted_singles}); the checkpoints built here (same recipe and seeds, transformers {transformers_version}) "
        "give the single-model figures above, so the merges are compared with their own build's best single (48.2%).\n\n"
        f"Load average (1 min) at the end: {data['load_1m']:.2f}; evaluation wall time {wall:.0f} s. "
        f"Command: `python benchmarks/ensemble_specialists.py{' --fit' if args.fit else ''}`."
    )
    verdicts = []
    for k, v in ensembles.items():
        t = v["vs_best_single"]
        better = t["diff"] > 0 and t["p_value"] < 0.05
        verdicts.append(f"{k} {'is' if better else 'is NOT'} significantly better than {best} ({100 * t['diff']:+.1f} points, p = {t['p_value']:.1e})")
    notes += "\n\nAgainst the best single model (McNemar, p < 0.05): " + "; ".join(verdicts) + "."
    rm, sm = router.meta, scorer.meta
    notes += (
        f"\n\nCross-validation on the validation items (5 folds, fitted on 4/5, scored on the rest): router "
        f"{100 * rm['cv_accuracy']:.1f}% (shares {rm['cv_shares']}); fallback model: {rm['fallback_model']}."
    )
    if "cascade" in sm:
        cc = sm["cascade"]
        notes += (
            f" Scorer, as rank's choice: {100 * sm['cv_rank_accuracy']:.1f}%; fallback model: {sm['fallback_model']}. Cascade threshold "
            f"{cc['thresholds'][0]:.2f} on P(correct) (fewest calls within 1 point of the most accurate single threshold, out of fold): "
            f"{100 * cc['cv_accuracy']:.1f}% at {cc['cv_calls']:.2f} calls. Out-of-fold cascade curve (threshold: accuracy, calls): "
            + ", ".join(f"{c['threshold']:.2f}: {100 * c['accuracy']:.1f}%, {c['calls']:.2f}" for c in cc["cv_curve"][::3])
            + ". The cascade runs the stages in the config's order (base, add, reverse, sort), all of one cost; an early stage's "
            "confident wrong answer ends it, which the rank over all four answers avoids at 4 calls."
        )
    shares = []
    for m, name_ in enumerate(router.models):
        pts = {p["offset"]: p for p in curve if p["model"] == m}
        near = [pts[min(pts, key=lambda o: abs(o - d))] for d in (-1.0, -0.5, 0.0, 0.5, 1.0)]
        shares.append([name_, *(f"{100 * p['shares'][m]:.0f}% → {100 * p['accuracy']:.1f}%" for p in near)])
    notes += (
        "\n\nRouter share curve on the test items (`route.share_curve`; every point in the JSON, plot: "
        f"`{args.output}.svg`): a model's predicted P(right) shifted by δ, share of items it gets → accuracy.\n\n"
        + markdown_table(["model", "δ = −1", "δ = −0.5", "δ = 0 (fitted)", "δ = +0.5", "δ = +1"], shares)
    )
    write_results(args.output, "Specialists: ensembles of the multitask-hard fine-tunes against merging them", table, data, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
