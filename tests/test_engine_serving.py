"""The engine behind Ray Serve: dropped streams free their sessions, session operations of concurrent
requests are coalesced (round trips per token fall as concurrency rises), a full KV budget is a
clear 503 over HTTP and the server keeps serving."""

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from conftest import run
from serve_harness import API_KEY

from collab_ray.core import SamplingParams
from collab_ray.core.pipeline import Pipeline
from collab_ray.core.strategy import Request

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def sessions_open(serve_app, model: str) -> int:
    return serve_app.handle(model).stats.remote().result(timeout_s=30)["sessions_open"]


def wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_dropped_streams_free_their_sessions(serve_app):
    before = {m: sessions_open(serve_app, m) for m in ("target", "draft")}
    body = {"model": "speculative", "prompt": "The river", "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}
    streams = []
    for _ in range(12):
        r = requests.post(f"{serve_app.url}/completions", json=body, headers=HEADERS, stream=True, timeout=60)
        assert r.status_code == 200
        next(r.iter_lines())  # the stream has started: its sessions are open
        streams.append(r)
    assert sessions_open(serve_app, "target") > before["target"]
    for r in streams:
        r.close()
    assert wait_for(lambda: all(sessions_open(serve_app, m) == before[m] for m in before)), {
        m: sessions_open(serve_app, m) for m in before
    }


def test_round_trips_per_token_fall_as_concurrency_rises(serve_app):
    from collab_ray.serving.handle_backend import ServeBackend

    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)

    def calls_per_token(n):
        models = {"draft": ServeBackend(serve_app.handle("draft"), "draft"), "target": ServeBackend(serve_app.handle("target"), "target")}
        pipe = Pipeline("speculative", models, {"k": 4})
        run(models["target"].info()), run(models["draft"].info())  # cached: not part of the count
        start = {m: b.calls for m, b in models.items()}

        async def many():
            return await asyncio.gather(*(pipe.run(Request(prompt=f"The river {i}", params=params)) for i in range(n)))

        results = run(many())
        tokens = sum(r.usage.completion_tokens for r in results)
        return {m: (b.calls - start[m]) / tokens for m, b in models.items()}

    one, many = calls_per_token(1), calls_per_token(16)
    for m in ("draft", "target"):
        assert many[m] < 0.5 * one[m], (m, one, many)


@pytest.fixture(scope="module")
def tight_app(serve_app):
    """A second app whose model has a 256-token KV budget and a short queue timeout."""
    from ray import serve

    from collab_ray.config import parse_config
    from collab_ray.serving.app import build_app

    data = {
        "models": {"tight": {"source": "tiny:llama-bpe", "num_cpus": 0, "kv_budget_tokens": 256, "queue_timeout_s": 0.2}},
        "pipelines": {},
        "server": {"num_cpus": 0},
    }
    serve.run(build_app(parse_config(data, "tight")), name="tight", route_prefix="/tight")
    base = serve_app.url.rsplit("/v1", 1)[0] + "/tight/v1"
    yield base
    serve.delete("tight")


def test_full_kv_budget_is_a_clear_503_and_the_server_keeps_serving(tight_app):
    long = {"model": "tight", "prompt": "The river", "max_tokens": 240, "temperature": 0, "ignore_eos": True}

    metrics = tight_app.rsplit("/v1", 1)[0] + "/metrics"

    def kv_in_use() -> float:  # the engine gauge, published by its loop every step
        lines = requests.get(metrics, timeout=30).text.splitlines()
        return sum(float(line.split()[-1]) for line in lines if line.startswith('collab_kv_tokens{model="tight"}'))

    with ThreadPoolExecutor(2) as pool:
        holder = pool.submit(requests.post, f"{tight_app}/completions", json=long, timeout=120)
        deadline = time.monotonic() + 60
        while kv_in_use() == 0 and not holder.done() and time.monotonic() < deadline:
            pass  # polled without a pause: the first request holds the budget for well under a second
        second = requests.post(f"{tight_app}/completions", json=long, timeout=120)
        first = holder.result()
    assert first.status_code == 200, first.text
    assert second.status_code == 503, second.text
    error = second.json()["error"]
    assert "'tight'" in error["message"] and "capacity" in error["message"]
    ok = requests.post(f"{tight_app}/completions", json={**long, "max_tokens": 4}, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4


class _CountingHandle:
    """A stand-in for a DeploymentHandle: records the calls, answers each prompt with its text."""

    def __init__(self):
        self.calls: list[str] = []
        self.started = asyncio.Event()

    def __getattr__(self, method):
        handle = self

        class _Method:
            def remote(self, *args):
                handle.calls.append(method)
                return handle._answer(method, *args)

        return _Method()

    async def _answer(self, method, *args):
        self.started.set()
        await asyncio.sleep(0.05)
        if method == "generate_batch":
            return [[f"{p}/{sp.seed}" for p in prompts] for prompts, sp in args[0]]
        prompts, sp = args
        return [f"{p}/{sp.seed}" for p in prompts]


def test_generate_calls_of_one_request_travel_together_and_no_others():
    from collab_ray.serving.handle_backend import REQUEST_SCOPE, ServeBackend

    handle = _CountingHandle()
    backend = ServeBackend(handle, "m")

    async def request(tag: str, fan_out: int, scoped: bool = True):
        if scoped:
            REQUEST_SCOPE.set(tag)
        return await asyncio.gather(*(backend.generate([f"{tag}{i}"], SamplingParams(seed=i)) for i in range(fan_out)))

    async def main():
        return await asyncio.gather(request("a", 8), request("b", 3), request("c", 4, scoped=False))

    a, b, c = run(main())
    assert a == [[f"a{i}/{i}"] for i in range(8)] and b == [[f"b{i}/{i}"] for i in range(3)]
    assert c == [[f"c{i}/{i}"] for i in range(4)]
    assert sorted(handle.calls) == ["generate"] * 4 + ["generate_batch"] * 2  # one per request; unscoped calls alone


def test_a_cancelled_request_cancels_its_generate_batch():
    from collab_ray.serving.handle_backend import REQUEST_SCOPE, ServeBackend

    handle = _CountingHandle()
    backend = ServeBackend(handle, "m")

    async def main():
        REQUEST_SCOPE.set("gone")
        task = asyncio.ensure_future(asyncio.gather(*(backend.generate([str(i)], SamplingParams()) for i in range(4))))
        await handle.started.wait()
        batch = [t for t in asyncio.all_tasks() if "_call" in repr(t.get_coro())]
        task.cancel()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return batch

    (batch,) = run(main())
    assert batch.cancelled(), batch
