"""A multi-task merge experiment that runs on a CPU in minutes.

The checkpoints and tasks are `collab_ray.models.multitask` (a small character-level llama trained
on a mixture of add / reverse / sort, and a fine-tune per task; recipe `multitask-hard` makes each
fine-tune learn a new skill). This module is the experiment on them: it registers the checkpoints
(`multitask:base`, `multitask-hard:add`, …) and the validation items (`task:NAME`, what a search
scores on) with the tuner, and reports test accuracies of the standard merges and searched ones.

    python -m collab_ray.tuning.experiment build
    collab-ray tune-merge tune_configs/multitask.yaml --output runs/multitask
    python -m collab_ray.tuning.experiment report --tuned runs/multitask/best.yaml
"""

from __future__ import annotations

import argparse
from pathlib import Path

from collab_ray.models.multitask import (
    RECIPES,
    TASKS,
    checkpoint,
    one_thread,
    resolve_model,
    task_items,
)
from collab_ray.tuning.references import register_models, register_tasks

# ------------------------------------------------------------------------------------ report


def baselines(recipe: str = "multitask") -> dict[str, dict]:
    """Merge configs of the comparison rows: the base, each fine-tune, and the standard merges (weight 1 each)."""
    base, fts = str(checkpoint(recipe, "base")), [str(checkpoint(recipe, t)) for t in TASKS]

    def linear(models: list[str]) -> dict:
        return {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models]}

    def task_merge(method: str, density: float = 1.0, lam: float = 1.0) -> dict:
        models = [{"model": ft, "parameters": {"weight": 1.0, "density": density}} for ft in fts]
        return {"merge_method": method, "base_model": base, "models": models, "parameters": {"lambda": lam}}

    return {
        "base": linear([base]),
        **{f"fine-tune {t}": linear([ft]) for t, ft in zip(TASKS, fts)},
        "uniform average (linear)": linear(fts),
        "task arithmetic λ=1": task_merge("task_arithmetic"),
        "task arithmetic λ=0.3": task_merge("task_arithmetic", lam=0.3),
        "TIES (density 0.5)": task_merge("ties", density=0.5),
        "DARE-TIES (density 0.5)": task_merge("dare_ties", density=0.5),
    }


def test_results(configs: dict[str, dict], recipe: str = "multitask") -> dict[str, dict[str, list[bool]]]:
    """Per config and task: exact match of each test item (every config merged in memory)."""
    from transformers import AutoTokenizer

    from collab_ray.merge.engine import merge_to_state_dict
    from collab_ray.merge.io import ModelFiles
    from collab_ray.tuning.evaluate import exact_matches, load_merged, skeleton

    base = checkpoint(recipe, "base")
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = skeleton(ModelFiles(str(base)).config, "cpu")
    tests = {t: [(p, [a]) for p, a in task_items(t, "test")] for t in TASKS}
    results = {}
    with one_thread():
        for name, config in configs.items():
            load_merged(model, merge_to_state_dict(config))
            results[name] = {t: exact_matches(model, tokenizer, pairs, max_new_tokens=10) for t, pairs in tests.items()}
    return results


def report_table(results: dict[str, dict[str, list[bool]]]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): per-task accuracy, mean, and the share of each fine-tune's own-task accuracy kept
    (the worst task's, for merges)."""
    acc = {name: {t: sum(r) / len(r) for t, r in tasks.items()} for name, tasks in results.items()}
    own = {t: acc[f"fine-tune {t}"][t] for t in TASKS}
    header = ["model", *TASKS, "mean", "kept (worst task)"]
    rows = []
    for name, a in acc.items():
        merged = not name.startswith(("base", "fine-tune"))
        kept = min((a[t] / own[t] for t in TASKS if own[t]), default=None) if merged else None
        cells = [f"{100 * a[t]:.1f}%" for t in TASKS] + [f"{100 * sum(a.values()) / len(a):.1f}%"]
        rows.append([name, *cells, "" if kept is None else f"{100 * kept:.0f}%"])
    return header, rows


def _validation_pairs(task: str) -> list[tuple[str, list[str]]]:
    return [(prompt, [answer]) for prompt, answer in task_items(task, "validation")]


# The experiment is an application of the tuner: it registers its checkpoints and tasks with it.
for _recipe in RECIPES:
    register_models(_recipe, resolve_model)
register_tasks("task", _validation_pairs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("build", "report"), help="build the checkpoints, or report test accuracies")
    parser.add_argument("--recipe", choices=tuple(RECIPES), default="multitask")
    parser.add_argument("--tuned", action="append", default=[], metavar="BEST.yaml", help="report: a searched merge config too")
    args = parser.parse_args(argv)
    if args.command == "build":
        for name in ("base", *TASKS):
            print(f"{args.recipe}:{name}: {checkpoint(args.recipe, name)}")
        return 0
    import yaml

    configs = baselines(args.recipe) | {f"searched ({path})": yaml.safe_load(Path(path).read_text()) for path in args.tuned}
    header, rows = report_table(test_results(configs, args.recipe))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
