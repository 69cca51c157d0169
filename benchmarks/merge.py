"""Benchmark: `collab-ray merge` vs `mergekit-yaml` on SmolLM2-135M-sized checkpoints (linear, ties, slerp,
sce, della, nuslerp, karcher).

The packaged SmolLM2-135M-Instruct GGUF is dequantized to float32 safetensors (the base); three
fine-tune-like variants add seeded noise (1% of each tensor's std). Both tools run as fresh
subprocesses, one after the other, on the same files; we record wall time and peak RSS of each
(ru_maxrss of the child) and check that the outputs agree. Targets: time ≤ 1.0× mergekit, peak RSS
≤ 1.5× one model. Work files go to a temp dir; results to benchmarks/results/merge.{md,json}.

    python benchmarks/merge.py [--work-dir DIR] [--repeats N] [--methods sce,della,…]

With --methods, only those rows are re-measured; the other rows of merge.json are kept (each row
records the 1-minute load average after it). DELLA samples at random: its outputs differ between
the tools by design (the `max abs diff` column does not apply).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

RESULTS = Path(__file__).parent / "results"
CONFIGS = {
    "linear": {
        "merge_method": "linear",
        "models": [{"model": f"ft{i}", "parameters": {"weight": w}} for i, w in enumerate((0.5, 0.3, 0.2))],
        "dtype": "float32",
    },
    "ties": {
        "merge_method": "ties",
        "base_model": "base",
        "models": [{"model": f"ft{i}", "parameters": {"weight": w, "density": 0.5}} for i, w in enumerate((0.5, 0.3, 0.2))],
        "parameters": {"normalize": True},
        "dtype": "float32",
    },
    "slerp": {
        "merge_method": "slerp",
        "base_model": "base",
        "slices": [{"sources": [{"model": "base", "layer_range": [0, 30]}, {"model": "ft0", "layer_range": [0, 30]}]}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}, {"value": 0.5}]},
        "dtype": "float32",
    },
    "sce": {
        "merge_method": "sce",
        "base_model": "base",
        "models": [{"model": f"ft{i}"} for i in range(3)],
        "parameters": {"select_topk": 0.5},
        "dtype": "float32",
    },
    "della": {
        "merge_method": "della",
        "base_model": "base",
        "models": [{"model": f"ft{i}", "parameters": {"weight": w, "density": 0.5, "epsilon": 0.1}} for i, w in enumerate((0.5, 0.3, 0.2))],
        "dtype": "float32",
    },
    "nuslerp": {
        "merge_method": "nuslerp",
        "base_model": "base",
        "models": [{"model": f"ft{i}", "parameters": {"weight": w}} for i, w in enumerate((0.6, 0.4))],
        "dtype": "float32",
    },
    "karcher": {
        "merge_method": "karcher",
        "models": [{"model": f"ft{i}"} for i in range(3)],
        "dtype": "float32",
    },
}
# Runs a command and prints its wall time, CPU time (user + system) and peak RSS (bytes) as JSON.
# (The wrapper is a bare interpreter, so the child's ru_maxrss, which starts at the RSS of the
# forking process, is the child's own peak.)
MEASURE = (
    "import json, resource, subprocess, sys, time\n"
    "t = time.perf_counter(); rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode\n"
    "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "print(json.dumps({'rc': rc, 'seconds': time.perf_counter() - t, 'cpu_seconds': u.ru_utime + u.ru_stime,"
    " 'peak_rss': u.ru_maxrss * 1024}))"
)


def make_checkpoints(work: Path) -> int:
    """base (dequantized SmolLM2-135M) and ft0..ft2 in `work`; returns one checkpoint's size in bytes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from collab_ray.models.packaged import gguf_path

    gguf = gguf_path("smollm2-135m-instruct")
    base = work / "base"
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # stored once, as the embedding
    if hasattr(model.config, "quantization_config"):  # dequantized: a plain float32 checkpoint now
        del model.config.quantization_config
    base.mkdir()
    model.config.architectures = [type(model).__name__]  # GGUF configs lack it; mergekit needs it
    model.config.save_pretrained(base)
    save_file(state, str(base / "model.safetensors"), metadata={"format": "pt"})
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(base)
    del model
    for i in range(3):
        g = torch.Generator().manual_seed(i)
        noisy = {k: v + 0.01 * v.float().std() * torch.randn(v.shape, generator=g) for k, v in state.items()}
        shutil.copytree(base, work / f"ft{i}", ignore=shutil.ignore_patterns("*.safetensors"))
        save_file(noisy, str(work / f"ft{i}" / "model.safetensors"), metadata={"format": "pt"})
    return (base / "model.safetensors").stat().st_size


def measure(cmd: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {result['rc']}")
    return result


def compare(a: Path, b: Path) -> dict:
    """Largest |difference| between two outputs, and how many entries differ by more than 1e-6."""
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert sorted(x) == sorted(y)
    diffs = [(x[k].double() - y[k].double()).abs() for k in x]
    return {"max_abs_diff": max(d.max().item() for d in diffs), "entries_differing": sum(int((d > 1e-6).sum()) for d in diffs)}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    import mergekit.merge  # noqa: F401
    from importlib.metadata import version

    import psutil

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mergekit": version("mergekit"),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),  # the box may be shared: other work slows both tools
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", help="where checkpoints go (default: a temp dir, removed afterwards)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per tool and method (the best time is kept)")
    parser.add_argument("--methods", default=",".join(CONFIGS), help="comma-separated rows to measure (default: all); others are kept from merge.json")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in CONFIGS]
    if unknown:
        parser.error(f"unknown --methods {unknown}; choose from {list(CONFIGS)}")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="collab-ray-bench-merge-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        model_bytes = make_checkpoints(work) if not (work / "ft2" / "model.safetensors").is_file() else (work / "base" / "model.safetensors").stat().st_size
        rows = []
        for name, config in CONFIGS.items():
            if name not in methods:
                continue
            config = json.loads(json.dumps(config).replace('"base"', f'"{work / "base"}"'))
            for i in range(3):
                config = json.loads(json.dumps(config).replace(f'"ft{i}"', f'"{work / f"ft{i}"}"'))
            (work / f"{name}.yaml").write_text(yaml.safe_dump(config))
            out = {"collab-ray": work / f"ours-{name}", "mergekit": work / f"mk-{name}"}
            tools = {
                "collab-ray": [sys.executable, "-m", "collab_ray.merge.cli", "merge", str(work / f"{name}.yaml"), str(out["collab-ray"]), "--no-progress"],
                "mergekit": ["mergekit-yaml", str(work / f"{name}.yaml"), str(out["mergekit"]), "--quiet", "--no-write-model-card"],
            }
            runs = {tool: [] for tool in tools}
            for _ in range(args.repeats):
                for tool, cmd in tools.items():
                    shutil.rmtree(out[tool], ignore_errors=True)
                    runs[tool].append(measure(cmd))
            best = {tool: min(r, key=lambda x: x["seconds"]) for tool, r in runs.items()}
            row = {
                "method": name,
                **{f"{tool}_seconds": round(b["seconds"], 2) for tool, b in best.items()},
                **{f"{tool}_cpu_seconds": round(b["cpu_seconds"], 2) for tool, b in best.items()},
                **{f"{tool}_peak_rss_mb": round(b["peak_rss"] / 1e6) for tool, b in best.items()},
                "time_ratio": round(best["collab-ray"]["seconds"] / best["mergekit"]["seconds"], 2),
                "cpu_time_ratio": round(best["collab-ray"]["cpu_seconds"] / best["mergekit"]["cpu_seconds"], 2),
                "rss_over_model": round(best["collab-ray"]["peak_rss"] / model_bytes, 2),
                "mergekit_rss_over_model": round(best["mergekit"]["peak_rss"] / model_bytes, 2),
                **compare(out["collab-ray"], out["mergekit"]),
                "load_average_1m": round(os.getloadavg()[0], 2),
                "repeats": args.repeats,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        report(_with_kept_rows(rows), model_bytes, machine(), args.repeats)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


def _with_kept_rows(rows: list[dict]) -> list[dict]:
    """`rows` plus the rows of merge.json not measured now (with the load they were measured under), in CONFIGS order."""
    measured = {r["method"]: r for r in rows}
    previous = RESULTS / "merge.json"
    if previous.is_file():
        old = json.loads(previous.read_text())
        for r in old["rows"]:
            if r["method"] not in measured:
                r.setdefault("load_average_1m", old["machine"].get("load_average_1m_at_end"))
                r.setdefault("repeats", 2)
                measured[r["method"]] = r
    return [measured[m] for m in CONFIGS if m in measured]


def report(rows: list[dict], model_bytes: int, info: dict, repeats: int) -> None:
    header = (
        "| method | collab-ray wall s | mergekit wall s | wall ratio (≤ 1.0) | collab-ray CPU s | mergekit CPU s | CPU ratio "
        "| collab-ray peak RSS MB | mergekit peak RSS MB | ours / model (≤ 1.5) | mergekit / model | max abs diff | entries differing "
        "| load (1 min) | runs |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['method']} | {r['collab-ray_seconds']} | {r['mergekit_seconds']} | {r['time_ratio']} | {r['collab-ray_cpu_seconds']} "
        f"| {r['mergekit_cpu_seconds']} | {r['cpu_time_ratio']} | {r['collab-ray_peak_rss_mb']} "
        f"| {r['mergekit_peak_rss_mb']} | {r['rss_over_model']} | {r['mergekit_rss_over_model']} | {r['max_abs_diff']:.1e} | {r['entries_differing']} "
        f"| {r.get('load_average_1m', '—')} | best of {r.get('repeats', repeats)} |"
        for r in rows
    ]
    text = (
        "# Merge benchmark: collab-ray merge vs mergekit-yaml\n\n"
        f"Checkpoints: SmolLM2-135M-Instruct dequantized to float32 ({model_bytes / 1e6:.0f} MB each), base + 3 noisy "
        "variants. Wall time and peak RSS of each tool as a fresh subprocess (interpreter start-up and imports "
        f"included; best of {repeats}), same run, same files; peak RSS is absolute (the interpreter with torch is ~0.3 GB of it). "
        "`max abs diff` / `entries differing` (> 1e-6) compare the two outputs: TIES differs only where several task-vector "
        "entries have exactly the same magnitude at the top-k threshold (the dequantized 4-bit base makes such ties); "
        "mergekit breaks those ties in argsort order, collab-ray by index. DELLA samples at random (each tool its own "
        "draws), so its outputs differ by design; its equality is tested by properties (keep rate per row, rescaling, seed). "
        "Karcher takes arccos of dot products of unit vectors that nearly coincide (norm weights of noisy copies): in float32 "
        "that angle is resolved to ~3e-4 only, so both tools round differently there (equal to 1e-6 on the tiny test checkpoints).\n\n"
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['ram_gb']} GB RAM; Python {info['python']}, "
        f"torch {info['torch']}, mergekit {info['mergekit']}; 1-minute load average {info['load_average_1m_at_end']} at the end "
        "(other processes shared the cores: both tools ran interleaved, and CPU time — user + system of the child — is less "
        "sensitive to that sharing than wall time; the `load` column is the load average after each row, rows measured in "
        "earlier runs keep theirs). "
        f"Command: `python benchmarks/merge.py --repeats {repeats}` (`--methods` for a subset of the rows).\n\n"
        + header
        + "\n".join(lines)
        + "\n"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "merge.md").write_text(text)
    (RESULTS / "merge.json").write_text(json.dumps({"machine": info, "model_bytes": model_bytes, "rows": rows}, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
