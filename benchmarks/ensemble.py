"""Ensemble quality report: SmolLM2-135M-Instruct + Gemma-3-270M on ARC-Easy, SciQ and TriviaQA.

For each dataset: each single model, the oracle (either right), fuse, vote, rank, a cascade
(SmolLM2 first; accuracy vs share of calls to Gemma, as a curve) and a router, with paired
comparisons (McNemar) against the best single model on the same items. Cascade thresholds and
routers are fitted by 2-fold cross-fitting (fit on even items, test on odd ones and vice versa).

Multiple-choice sets are scored by log-likelihood (acc_norm); every strategy answers through its
`choose` rule over the models' choice distributions. TriviaQA is answered by greedy generation
(exact match); fuse and vote run end to end there, on the first `--gen-items` items.

Full-size run (hours on 2 CPU cores):
    python benchmarks/ensemble.py --arc 570 --sciq 1000 --triviaqa 300 --gen-items 300
Re-render the markdown from the saved JSON: `python benchmarks/ensemble.py --render`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, markdown_table, write_results  # noqa: E402

from collab_ray.core.pipeline import Pipeline  # noqa: E402
from collab_ray.ensemble.cascade import CascadePoint, calibrate, curve  # noqa: E402
from collab_ray.ensemble.route import train_router  # noqa: E402
from collab_ray.eval.datasets import Dataset, load  # noqa: E402
from collab_ray.eval.harness import HEADER, CachedBackend, PipelineScore, run_model, score_pipeline  # noqa: E402
from collab_ray.eval.metrics import Accuracy, accuracy, paired_comparison  # noqa: E402
from collab_ray.models.backend import TransformersBackend  # noqa: E402

SMALL, LARGE = "smollm2", "gemma"


def subset(dataset: Dataset, index: list[int]) -> Dataset:
    return Dataset(dataset.name, [dataset.items[i] for i in index])


def merged(name: str, parts: list[tuple[list[int], PipelineScore]], n: int) -> PipelineScore:
    """Cross-fitted halves -> one score over all items, in item order."""
    correct, decisions = [False] * n, [{}] * n
    for index, s in parts:
        for k, i in enumerate(index):
            correct[i], decisions[i] = s.correct[k], s.decisions[k]
    return PipelineScore(
        name, correct, accuracy(correct), sum(s.calls for _, s in parts), sum(s.tokens for _, s in parts), sum(s.wall_s for _, s in parts), decisions
    )


def oracle(scores: dict[str, PipelineScore]) -> PipelineScore:
    a, b = scores[SMALL].correct, scores[LARGE].correct
    correct = [x or y for x, y in zip(a, b)]
    s = scores[SMALL], scores[LARGE]
    return PipelineScore("oracle (either right)", correct, accuracy(correct), s[0].calls + s[1].calls, s[0].tokens + s[1].tokens, 0.0)


async def bench(models: dict, dataset: Dataset, gen_items: int, vote_samples: int, workdir: Path, log) -> dict:
    n = len(dataset.items)
    short = dataset.kind == "short"
    runs = {}
    for name, b in models.items():
        runs[name] = await run_model(b, dataset)
        log(f"{dataset.name}: {name} pass {runs[name].wall_s:.0f}s, acc {runs[name].correct.mean():.3f}")
    scores: dict[str, PipelineScore] = {}
    for name, b in models.items():
        scores[name] = await score_pipeline(name, Pipeline("single", {name: b}), dataset)
    scores["oracle"] = oracle(scores)
    both = dict(models)
    scores["rank"] = await score_pipeline("rank (judges: both, mean log-prob)", Pipeline("rank", both), dataset)
    if not short:
        scores["fuse"] = await score_pipeline("fuse (equal weights)", Pipeline("fuse", both), dataset)
        scores["vote"] = await score_pipeline("vote (ties: most confident)", Pipeline("vote", both), dataset)
    log(f"{dataset.name}: singles, rank{'' if short else ', fuse, vote'} done")

    # cross-fitted cascade (target: the larger model's accuracy) and router (target: half the calls to it)
    conf = np.stack([runs[m].confidence for m in models], 1)
    correct = np.stack([runs[m].correct for m in models], 1)
    halves = [list(range(0, n, 2)), list(range(1, n, 2))]
    cascade_parts, route_parts, fuse_parts, fitted = [], [], [], []
    for k, test in enumerate(halves):
        fit = halves[1 - k]
        if not short:  # weighted fusion: the large model's weight picked on the other half
            fuse_w = {float(w): Pipeline("fuse", both, {"weights": [1 - w, w]}) for w in np.linspace(0, 1, 11).round(2)}
            dev = {w: (await score_pipeline("fuse", f, subset(dataset, fit))).accuracy.value for w, f in fuse_w.items()}
            w = max(dev, key=dev.get)
            fuse_parts.append((test, await score_pipeline("fuse", fuse_w[w], subset(dataset, test))))
            fitted.append({"fuse_large_weight": w, "fuse_dev_accuracy": dev[w]})
        point = calibrate(conf[fit], correct[fit], target_accuracy=float(correct[fit, 1].mean()))
        cascade = Pipeline("cascade", both, {"thresholds": point.thresholds})
        cascade_parts.append((test, await score_pipeline("cascade", cascade, subset(dataset, test))))
        router = await train_router(both, subset(dataset, fit), features="minilm", target_share=0.5)
        router.save(workdir / f"{dataset.name}-router-{k}.npz")
        route = Pipeline("route", both, {"router": str(workdir / f"{dataset.name}-router-{k}.npz")})
        route_parts.append((test, await score_pipeline("route", route, subset(dataset, test))))
        fitted.append({"cascade_thresholds": point.thresholds, "cascade_dev_accuracy": point.accuracy, "router_threshold": router.threshold})
    if fuse_parts:
        weights = "/".join(f"{f['fuse_large_weight']:.1f}" for f in fitted if "fuse_large_weight" in f)
        scores["fuse-fit"] = merged(f"fuse (weights fit per half; {LARGE} weight {weights})", fuse_parts, n)
    scores["cascade"] = merged("cascade (fit: large model's accuracy)", cascade_parts, n)
    scores["route"] = merged("route (MiniLM ridge, fit: 50% to large)", route_parts, n)
    for key, label in (("cascade", "cascade"), ("route", "route")):
        share = np.mean([d.get("stage", 0) == 1 if key == "cascade" else d.get("routed_to") == LARGE for d in scores[key].decisions])
        scores[key].name = f"{scores[key].name}; {100 * share:.0f}% to {LARGE}"
    log(f"{dataset.name}: cascade, route done")

    gen = None
    if short and gen_items:
        gen_set = Dataset(dataset.name, dataset.items[:gen_items])
        gen = {}
        for name, b in models.items():
            gen[name] = await score_pipeline(name, Pipeline("single", {name: b}), gen_set)
        gen["fuse"] = await score_pipeline("fuse (union vocab, equal weights)", Pipeline("fuse", both), gen_set)
        log(f"{dataset.name}: fuse on {gen_items} items done ({gen['fuse'].wall_s:.0f}s)")
        if vote_samples:
            vote = Pipeline("vote", both, {"samples": vote_samples, "temperature": 0.7})
            gen["vote"] = await score_pipeline(f"vote ({vote_samples} samples/model, T=0.7)", vote, gen_set)
            log(f"{dataset.name}: vote on {gen_items} items done ({gen['vote'].wall_s:.0f}s)")

    best = max((SMALL, LARGE), key=lambda m: scores[m].accuracy.value)
    curve_points = curve(conf, correct)
    return {
        "items": n,
        "model_pass_s": {m: r.wall_s for m, r in runs.items()},
        "scores": scores,
        "gen_scores": gen,
        "best_single": best,
        "fitted": fitted,
        "curve": curve_points,
    }


def paired_rows(scores: dict[str, PipelineScore], best: str) -> list[list]:
    rows = []
    for key, s in scores.items():
        if key in (SMALL, LARGE, "oracle") or key == best:
            continue
        p = paired_comparison(s.correct, scores[best].correct)
        rows.append([s.name, f"{100 * p.diff:+.1f}", p.a_only, p.b_only, f"{p.p_value:.3f}"])
    return rows


def section(name: str, r: dict) -> str:
    scores, best = r["scores"], r["best_single"]
    parts = [f"## {name} ({r['items']} items)", "", markdown_table(HEADER, [s.row() for s in scores.values()]), ""]
    parts += [f"Paired vs best single ({scores[best].name}), McNemar exact test:", ""]
    parts += [markdown_table(["pipeline", "Δ accuracy (points)", "only it right", "only best right", "p"], paired_rows(scores, best)), ""]
    large_acc = scores[LARGE].accuracy.value
    pts = r["curve"]
    parts += [f"Cascade curve (in-sample, thresholds at confidence quantiles; {LARGE} alone: {100 * large_acc:.1f}%):", ""]
    rows = [[f"{p.thresholds[0]:.3f}", f"{100 * p.last_share:.0f}%", f"{100 * p.accuracy:.1f}%"] for p in pts[::2]]
    parts += [markdown_table(["threshold", f"share of calls to {LARGE}", "accuracy"], rows), ""]
    cheapest = [p for p in pts if p.accuracy >= large_acc]
    if cheapest:
        c = min(cheapest, key=lambda p: p.last_share)
        parts += [f"Cheapest in-sample point at ≥ {LARGE}'s accuracy: {100 * c.last_share:.0f}% of calls to {LARGE} ({100 * c.accuracy:.1f}%).", ""]
    if r["gen_scores"]:
        g = r["gen_scores"]
        n = len(next(iter(g.values())).correct)
        parts += [f"Generation pipelines on the first {n} items:", "", markdown_table(HEADER, [s.row() for s in g.values()]), ""]
        gbest = max((SMALL, LARGE), key=lambda m: g[m].accuracy.value)
        parts += [markdown_table(["pipeline", "Δ accuracy (points) vs " + g[gbest].name, "only it right", "only best right", "p"], paired_rows(g, gbest)), ""]
    return "\n".join(parts)


def to_json(r: dict) -> dict:
    out = {k: v for k, v in r.items() if k not in ("scores", "gen_scores", "curve")}
    out["scores"] = {k: {**asdict(s), "decisions": None} for k, s in r["scores"].items()}
    out["gen_scores"] = {k: {**asdict(s), "decisions": None} for k, s in (r["gen_scores"] or {}).items()}
    out["curve"] = [asdict(p) for p in r["curve"]]
    return out


def from_json(r: dict) -> dict:
    """The inverse of `to_json` (per-item decisions are not kept)."""

    def score(d: dict) -> PipelineScore:
        return PipelineScore(**{**d, "accuracy": Accuracy(**d["accuracy"]), "decisions": []})

    return {
        **r,
        "scores": {k: score(v) for k, v in r["scores"].items()},
        "gen_scores": {k: score(v) for k, v in r["gen_scores"].items()} or None,
        "curve": [CascadePoint(**p) for p in r["curve"]],
    }


def targets(name: str, r: dict) -> list[str]:
    """The issue's targets on one dataset: an ensemble ≥ best single + 2 points; a cascade at the
    larger model's accuracy with ≤ 60% of its calls."""
    scores, best = r["scores"], r["best_single"]
    ensembles = {k: s for k, s in scores.items() if k not in (SMALL, LARGE, "oracle")}
    if r["gen_scores"]:
        g = r["gen_scores"]
        gbest = max((SMALL, LARGE), key=lambda m: g[m].accuracy.value)
        ensembles |= {k: s for k, s in g.items() if k not in (SMALL, LARGE)}
        baseline = {k: (g[gbest] if k in g and k not in scores else scores[best]) for k in ensembles}
    else:
        baseline = {k: scores[best] for k in ensembles}
    key = max(ensembles, key=lambda k: ensembles[k].accuracy.value - baseline[k].accuracy.value)
    gain = 100 * (ensembles[key].accuracy.value - baseline[key].accuracy.value)
    gap = 100 * abs(scores[SMALL].accuracy.value - scores[LARGE].accuracy.value)
    head = 100 * (scores["oracle"].accuracy.value - scores[best].accuracy.value)
    large = scores[LARGE].accuracy.value
    share = min(p.last_share for p in r["curve"] if p.accuracy >= large)
    return [
        f"- {name}: best ensemble vs best single: {ensembles[key].name} {gain:+.1f} points "
        f"({'meets' if gain >= 2 else 'misses'} the +2 target); the single models are {gap:.1f} points apart and the "
        f"oracle is {head:+.1f} points over the best single.",
        f"- {name}: the cascade reaches {LARGE}'s accuracy with {100 * share:.0f}% of its calls in-sample "
        f"({'meets' if share <= 0.6 else 'misses'} the ≤ 60% target).",
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arc", type=int, default=570, help="ARC-Easy items (all: 570)")
    ap.add_argument("--sciq", type=int, default=1000, help="SciQ items (all: 1000)")
    ap.add_argument("--triviaqa", type=int, default=300, help="TriviaQA items for singles, rank, cascade, route")
    ap.add_argument("--gen-items", type=int, default=300, help="TriviaQA items for fuse and vote (token-by-token, slow)")
    ap.add_argument("--vote-samples", type=int, default=3, help="samples per model for vote on TriviaQA (0: skip)")
    ap.add_argument("--batch", type=int, default=4, help="most sequences per forward pass of the large model (262k-wide logits)")
    ap.add_argument("--batch-small", type=int, default=16, help="most sequences per forward pass of the small model")
    ap.add_argument("--small", default="smollm2-135m-instruct", help="the cheaper model (cascade stage 1)")
    ap.add_argument("--large", default="gemma3-270m", help="the dearer model")
    ap.add_argument("--render", action="store_true", help="only re-render ensemble.md from the saved ensemble.json")
    args = ap.parse_args(argv)
    start = time.time()
    if args.render:
        saved = json.loads((RESULTS / "ensemble.json").read_text())
        results = {k: from_json(r) for k, r in saved["results"].items()}
        report(results, argparse.Namespace(**saved["args"]), saved.get("argv"), saved["wall_s"])
        return 0

    def log(msg: str) -> None:
        print(f"[{time.time() - start:6.0f}s] {msg}", flush=True)

    models = {
        SMALL: CachedBackend(TransformersBackend(args.small, max_batch_size=args.batch_small)),
        LARGE: CachedBackend(TransformersBackend(args.large, max_batch_size=args.batch)),
    }
    log("models loaded")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, count in (("arc_easy", args.arc), ("triviaqa", args.triviaqa), ("sciq", args.sciq)):
            if count:
                results[name] = asyncio.run(bench(models, load(name).head(count), args.gen_items, args.vote_samples, Path(tmp), log))
                report(results, args, argv if argv is not None else sys.argv[1:], time.time() - start)  # a cut-off run keeps what it finished
    log("written benchmarks/results/ensemble.md")
    return 0


def report(results: dict, args, argv: list[str], wall_s: float) -> None:
    counts = {k: r["items"] for k, r in results.items()}
    table = "\n\n".join(section(k, r) for k, r in results.items())
    table += "\n\n## Targets\n\n" + "\n".join(line for k, r in results.items() for line in targets(k, r))
    notes = (
        f"Item counts used: {counts}; TriviaQA generation pipelines (fuse, vote) on the first {args.gen_items} items. "
        f"Command: `python benchmarks/ensemble.py {' '.join(argv)}`; "
        f"total wall time {wall_s:.0f}s on a machine shared with other jobs (wall times are inflated by that load).\n\n"
        "Method: 0-shot `Question: …\\nAnswer:` prompts for both models (plain completion, no chat template). Multiple choice: "
        "acc_norm (log-likelihood per byte); a model's choice distribution is the softmax of its acc_norm scores. fuse = "
        "weighted average of those distributions (the sequence-level form of token fusion); vote = each model's pick, ties to the "
        "more confident model; rank = candidates are the models' picks, scored by mean token log-prob under both models; cascade = "
        "SmolLM2 first, stop when its top choice probability passes the threshold; route = ridge regression on MiniLM embeddings "
        "predicting each model's probability of the right answer, send to Gemma when its predicted gain passes the threshold. "
        "TriviaQA: greedy, 16 tokens, stop at newline, exact match against the aliases; cascade confidence = mean token log-prob; "
        "router target = exact match. Model calls and tokens count what each pipeline asks for; pipelines share cached model results, "
        "so their wall times after the first model pass are small (the model passes are timed in the JSON as model_pass_s)."
    )
    title = f"Ensemble quality: {args.small} ({SMALL}) + {args.large} ({LARGE})"
    data = {"args": vars(args), "argv": argv, "wall_s": wall_s, "results": {k: to_json(r) for k, r in results.items()}}
    write_results("ensemble", title, table, data, notes)


if __name__ == "__main__":
    raise SystemExit(main())
