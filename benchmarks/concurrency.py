"""Collaboration under concurrent load: the continuous-batching engine (issue: Engine).

Three parts, all rows of a part in one run, pipelines interleaved at each concurrency level:

(engine) in-process, no Ray (runs on a GPU box too: `--device cuda`): SmolLM2-135M plain generation,
    16 concurrent requests through the engine against the anchors on the same prompts — one by one,
    transformers' static left-padded batch `model.generate` (what `@serve.batch` ran before the
    engine; serving.md: 6.96x sequential) and transformers' own continuous batching `generate_batch`.
(serve) over Ray Serve (a coordinator over deployment handles, as the ingress runs it): SmolLM2
    `target` alone, `speculative` (bf16 SmolLM2 draft), `fuse` (SmolLM2 + Gemma-3-270M, union
    vocabulary), `contrastive` (24-layer early exit as amateur) at 1, 8 and 32 concurrent requests
    x 64 tokens (`--tokens`): aggregate tokens/s, p50/p99 latency, round trips per generated token per model;
    head-of-line: a 16-token request's latency while a 2 000-token prompt is prefilled and 8 long
    generations run, against its idle latency.
(http) deploy/tiny.yaml over HTTP (tiny models: per-call overhead, not compute, dominates): 32
    concurrent `speculative` vs 32 concurrent `target`, 32 concurrent `fuse` vs one, an 8-token
    request beside a 64-prompt x n=4 completions request vs idle.

    python benchmarks/concurrency.py [--parts engine,serve,http] [--quick] [--device cpu]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

import numpy as np

from common import RESULTS, markdown_table, write_results

from collab_ray.core import SamplingParams
from collab_ray.core.pipeline import Pipeline
from collab_ray.core.strategy import Request

PROMPTS = [
    "Write a story about a lighthouse keeper and a storm at sea.",
    "Explain how a steam engine works, step by step.",
    "The history of the printing press begins",
    "Describe a walk through a busy market in the morning.",
    "List the planets of the solar system and one fact about each.",
    "A recipe for bread: first, mix the flour and",
    "Why is the sky blue? Give a careful answer.",
    "The old mill by the river had stood there for",
]


def prompt(i: int) -> str:
    return f"{PROMPTS[i % len(PROMPTS)]} ({i})"


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.1f}/{five:.1f}"


def summary(latencies: list[float], tokens: int, wall: float) -> dict:
    return {
        "tok_s": tokens / wall,
        "p50_s": float(np.percentile(latencies, 50)),
        "p99_s": float(np.percentile(latencies, 99)),
        "wall_s": wall,
        "tokens": tokens,
    }


async def timed(coro) -> tuple[float, object]:
    start = time.perf_counter()
    result = await coro
    return time.perf_counter() - start, result


async def run_level(pipe: Pipeline, n: int, params: SamplingParams) -> dict:
    """n concurrent requests of `pipe`: aggregate tokens/s and latency percentiles."""
    start = time.perf_counter()
    outs = await asyncio.gather(*(timed(pipe.run(Request(prompt=prompt(i), params=params))) for i in range(n)))
    wall = time.perf_counter() - start
    return summary([t for t, _ in outs], sum(r.usage.completion_tokens for _, r in outs), wall)


# ---- (engine) ----------------------------------------------------------------------------------
def part_engine(args) -> tuple[list, dict]:
    import torch

    from collab_ray.models.backend import TransformersBackend

    n, tokens = (4, 16) if args.quick else (16, 32)
    backend = TransformersBackend("smollm2-135m-instruct", device=args.device)
    tok, model = backend.tokenizer, backend.model
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    texts = [prompt(i) for i in range(n)]
    ids = [tok.encode(t) for t in texts]

    async def concurrent():
        return await asyncio.gather(*(backend.generate([t], params) for t in texts))

    async def sequential():
        return [await backend.generate([t], params) for t in texts]

    def static_batch():
        tok.padding_side = "left"
        batch = tok(texts, return_tensors="pt", padding=True).to(backend.device)
        with torch.inference_mode():
            out = model.generate(**batch, do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=tok.pad_token_id)
        return [row[batch["input_ids"].shape[1] :].tolist() for row in out]

    def hf_continuous():
        from transformers import GenerationConfig

        config = GenerationConfig(max_new_tokens=tokens, do_sample=False, eos_token_id=-1, pad_token_id=tok.pad_token_id)
        with torch.inference_mode():
            out = model.generate_batch(inputs=ids, generation_config=config, progress_bar=False)
        return [out[k].generated_tokens for k in sorted(out, key=lambda k: int(k.split("_")[-1]))]

    runs = {
        "engine, concurrent": lambda: [g[0].token_ids for g in asyncio.run(concurrent())],
        "engine, one by one": lambda: [g[0].token_ids for g in asyncio.run(sequential())],
        "transformers static batch (generate)": static_batch,
        "transformers continuous batching (generate_batch)": hf_continuous,
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    outputs = {}
    for _ in range(args.repeats):  # interleaved
        for name, fn in runs.items():
            start = time.perf_counter()
            try:
                outputs[name] = fn()
            except Exception as e:  # an anchor that does not run here is reported, not fatal
                outputs[name] = f"failed: {type(e).__name__}: {str(e)[:120]}"
                continue
            times[name].append(time.perf_counter() - start)
    rows, data = [], {}
    base = float(np.median(times["engine, one by one"]))
    engine = float(np.median(times["engine, concurrent"]))
    for name in runs:
        if not times[name]:
            rows.append([name, "—", "—", "—", outputs[name]])
            continue
        t = float(np.median(times[name]))
        same = outputs[name] == outputs["engine, one by one"]
        rows.append([name, f"{n * tokens / t:.1f}", f"{base / t:.2f}x", f"{t / engine:.2f}x", "identical" if same else "differ"])
        data[name] = {"median_s": t, "tok_s": n * tokens / t, "vs_one_by_one": base / t, "same_tokens": same}
    header = ["(engine) SmolLM2, " + f"{n} prompts x {tokens} tokens, {backend.device}", "tok/s", "vs one by one", "engine faster by", "greedy tokens vs one by one"]

    # decode sessions (the cache layout): 8 sessions appending their argmax, batched vs batch-1 steps
    single = TransformersBackend("smollm2-135m-instruct", device=args.device, max_batch_size=1)

    async def sessions(model, steps=8 if args.quick else 24):
        async def one(ids):
            s = await model.open_session(ids)
            lp, out = s.logprobs, []
            for _ in range(steps):
                out.append(int(np.argmax(lp)))
                lp = await model.append(s.session_id, out[-1:])
            await model.close_session(s.session_id)
            return out

        start = time.perf_counter()
        outs = await asyncio.gather(*(one(i) for i in ids[:8]))
        return (time.perf_counter() - start) / steps, outs

    per_step = {"batched": [], "batch-1": []}
    for _ in range(args.repeats):
        for key, model in (("batched", backend), ("batch-1", single)):
            t, outs = asyncio.run(sessions(model))
            per_step[key].append(t)
            data.setdefault("session_tokens", {})[key] = outs
    batched, one = (float(np.median(per_step[k])) * 1000 for k in ("batched", "batch-1"))
    same = data["session_tokens"]["batched"] == data["session_tokens"]["batch-1"]
    rows.append([f"8 decode sessions, one step of all 8 (ms): batched {batched:.0f}, batch-1 forwards {one:.0f}", "—", f"{one / batched:.2f}x", "—", "identical" if same else "differ"])
    data["sessions"] = {"batched_ms_per_step": batched, "batch1_ms_per_step": one, "same_tokens": same}
    del data["session_tokens"]
    single.shutdown()
    backend.shutdown()
    return [header, rows], data


# ---- (serve) -----------------------------------------------------------------------------------
def serve_config(args) -> dict:
    common = {"num_cpus": 0, "max_batch_size": 32}
    return {
        "models": {
            "smollm2": {"source": "smollm2-135m-instruct", **common},
            "smollm2-bf16": {"source": "smollm2-135m-instruct", "dtype": "bfloat16", **common},
            "smollm2-early": {"source": "smollm2-135m-instruct", "keep_layers": 24, **common},
            "gemma": {"source": "gemma3-270m", **common},
        },
        "pipelines": {},
        "server": {"num_cpus": 0},
    }


SERVE_PIPELINES = {
    "target": ("single", {"m": "smollm2"}, {}),
    "speculative": ("speculative", {"draft": "smollm2-bf16", "target": "smollm2"}, {"k": 4}),
    "fuse": ("fuse", {"a": "smollm2", "b": "gemma"}, {"mode": "union", "top_k": 32}),
    "contrastive": ("contrastive", {"expert": "smollm2", "amateur": "smollm2-early"}, {}),
}


def part_serve(args) -> tuple[list, dict]:
    from ray import serve

    from collab_ray.config import parse_config
    from collab_ray.serving.app import APP_NAME, build_app, init_ray
    from collab_ray.serving.handle_backend import ServeBackend

    config = parse_config(serve_config(args), "concurrency")
    init_ray(config, quiet=True)
    serve.run(build_app(config), name=APP_NAME, route_prefix=None)
    handles = {m: serve.get_deployment_handle(f"model-{m}", app_name=APP_NAME) for m in config.models}
    backends = {m: ServeBackend(h, m, call_timeout_s=1800) for m, h in handles.items()}
    pipes = {}
    for name, (strategy, roles, params) in SERVE_PIPELINES.items():
        pipes[name] = Pipeline(strategy, {r: backends[m] for r, m in roles.items()}, params)
    levels = [1, 4] if args.quick else [1, 8, 32]
    tokens = 16 if args.quick else args.tokens
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    asyncio.run(run_level(pipes["fuse"], 2, params.model_copy(update={"max_tokens": 4})))  # warm every model

    results: dict = {}
    for n in levels:
        for name, pipe in pipes.items():
            calls = {m: b.calls for m, b in backends.items()}
            r = asyncio.run(run_level(pipe, n, params))
            r["round_trips_per_token"] = {m: (b.calls - calls[m]) / r["tokens"] for m, b in backends.items() if b.calls > calls[m]}
            r["load"] = load()
            results.setdefault(name, {})[n] = r
            print(f"serve {name} x{n}: {r['tok_s']:.1f} tok/s p50 {r['p50_s']:.2f}s  load {r['load']}", flush=True)

    # head-of-line: a 2 000-token prompt being prefilled and 8 long generations in flight
    short = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    target = pipes["target"]

    async def hol():
        idle, _ = await timed(target.run(Request(prompt=prompt(0), params=short)))
        long_prompt = " ".join(PROMPTS * 60)
        ids = (await backends["smollm2"].encode(long_prompt))[:2000]
        long_text = await backends["smollm2"].decode(ids)
        busy = [asyncio.ensure_future(target.run(Request(prompt=prompt(i), params=params.model_copy(update={"max_tokens": 4 * tokens})))) for i in range(8)]
        busy.append(asyncio.ensure_future(backends["smollm2"].generate([long_text], short)))
        await asyncio.sleep(1.0)
        loaded, _ = await timed(target.run(Request(prompt=prompt(1), params=short)))
        await asyncio.gather(*busy)
        return idle, loaded

    idle, loaded = asyncio.run(hol())
    results["head_of_line"] = {"idle_s": idle, "loaded_s": loaded, "ratio": loaded / idle, "load": load()}
    print(f"head-of-line: idle {idle:.2f}s, beside the long work {loaded:.2f}s", flush=True)
    serve.shutdown()

    rows = []
    t = results["target"]
    for name in SERVE_PIPELINES:
        for n in levels:
            r = results[name][n]
            trips = ", ".join(f"{m} {v:.2f}" for m, v in r["round_trips_per_token"].items())
            vs_target = r["tok_s"] / t[n]["tok_s"]
            vs_one = r["tok_s"] / results[name][1]["tok_s"]
            rows.append([name, n, f"{r['tok_s']:.1f}", f"{r['p50_s']:.2f}", f"{r['p99_s']:.2f}", f"{vs_target:.2f}x", f"{vs_one:.2f}x", trips, r["load"]])
    header = ["(serve) pipeline", "concurrent", "tok/s", "p50 s", "p99 s", "vs target", "vs 1 concurrent", "round trips/token", "load 1/5 min"]
    return [header, rows], results


# ---- (http) ------------------------------------------------------------------------------------
def part_http(args) -> tuple[list, dict]:
    import aiohttp

    from collab_ray.config import load_config
    from collab_ray.serving.app import start, stop

    config = load_config("tiny")
    config.server.max_choices_per_request = 256  # the 64 prompts x n=4 request
    url = start(config, port=8766, quiet=True)
    n = 8 if args.quick else 32
    body = {"max_tokens": 48, "temperature": 0, "ignore_eos": True}

    def session():
        return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600), connector=aiohttp.TCPConnector(limit=0))

    async def post(client, body: dict) -> dict:
        async with client.post(f"{url}/completions", json=body) as r:
            r.raise_for_status()
            return await r.json()

    async def burst(model: str, count: int) -> dict:
        async with session() as client:

            async def one(i):
                start = time.perf_counter()
                r = await post(client, {**body, "model": model, "prompt": prompt(i)})
                return time.perf_counter() - start, r["usage"]["completion_tokens"]

            start = time.perf_counter()
            outs = await asyncio.gather(*(one(i) for i in range(count)))
            return summary([t for t, _ in outs], sum(k for _, k in outs), time.perf_counter() - start)

    async def beside_big() -> tuple[float, float]:
        async with session() as client:
            small = {"model": "target", "prompt": "The river", "max_tokens": 8, "temperature": 0, "ignore_eos": True}

            async def small_one():
                start = time.perf_counter()
                await post(client, small)
                return time.perf_counter() - start

            idle = min([await small_one() for _ in range(3)])
            big = {"model": "target", "prompt": [prompt(i) for i in range(64)], "n": 4, "max_tokens": 48, "temperature": 0.7}
            task = asyncio.ensure_future(post(client, big))
            await asyncio.sleep(0.5)
            loaded = []
            while not task.done() and len(loaded) < 3:  # probes while the big request runs: the median
                loaded.append(await small_one())
            await task
            return idle, float(np.median(loaded))

    asyncio.run(burst("fuse", 2))  # warm-up
    results: dict = {}
    for _ in range(args.repeats):  # interleaved
        for key, model, count in (("target", "target", n), ("speculative", "speculative", n), ("fuse", "fuse", n), ("fuse_1", "fuse", 1)):
            results.setdefault(key, []).append(asyncio.run(burst(model, count)))
    idle, loaded = asyncio.run(beside_big())
    stop()
    med = {k: float(np.median([r["tok_s"] for r in v])) for k, v in results.items()}
    data = {
        "tok_s": med,
        "speculative_vs_target": med["speculative"] / med["target"],
        "fuse_vs_one": med["fuse"] / med["fuse_1"],
        "beside_big": {"idle_s": idle, "loaded_s": loaded, "ratio": loaded / idle},
        "load": load(),
    }
    rows = [
        [f"{n} concurrent speculative vs {n} concurrent target", f"{med['speculative']:.0f} vs {med['target']:.0f} tok/s", f"{data['speculative_vs_target']:.2f}x", "≥ 0.5x (0.03x before)"],
        [f"{n} concurrent fuse vs one fuse request", f"{med['fuse']:.0f} vs {med['fuse_1']:.0f} tok/s", f"{data['fuse_vs_one']:.2f}x", "≥ 4x (1.4x before)"],
        ["8-token request beside 64 prompts x n=4, vs idle", f"{loaded:.2f} vs {idle:.2f} s", f"{loaded / idle:.2f}x", "≤ 3x (47x before)"],
    ]
    return [["(http) deploy/tiny.yaml", "measured", "ratio", "target"], rows], data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="engine,serve,http", help="comma-separated: engine, serve, http")
    ap.add_argument("--quick", action="store_true", help="smoke sizes")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats of the engine and http rows")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per request of the serve part")
    ap.add_argument("--device", default="cpu", help="device of the engine part (cpu, cuda)")
    ap.add_argument("--name", default="concurrency", help="results file name")
    args = ap.parse_args()
    parts = {"engine": part_engine, "serve": part_serve, "http": part_http}
    chosen = args.parts.split(",")
    unknown = sorted(set(chosen) - set(parts))
    if unknown:
        raise SystemExit(f"--parts: unknown {unknown}; choose from {sorted(parts)}")
    previous = RESULTS / f"{args.name}.json"  # parts not measured now are kept from the last run
    kept = json.loads(previous.read_text()) if previous.is_file() else {}
    data = {"load_before": load(), "quick": args.quick}
    for part in parts:
        if part in chosen:
            (header, rows), data[part] = parts[part](args)
            data[part]["table"] = markdown_table(header, rows)
            data[part]["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            print(data[part]["table"], flush=True)
        elif part in kept and "table" in kept[part]:
            data[part] = kept[part]
    tables = [f"{data[p]['table']}\n\n({p} rows measured {data[p].get('measured', 'earlier')})" for p in parts if p in data]
    data["load_after"] = load()
    notes = f"1/5-minute load average before: {data['load_before']}, after: {data['load_after']} (of this run: {', '.join(chosen)})."
    path = write_results(args.name, "Collaboration under concurrent load", "\n\n".join(tables), data, notes)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
