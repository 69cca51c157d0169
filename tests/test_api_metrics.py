"""`/metrics` in Prometheus format: it parses, its counters move by the right amounts after known
requests, and dropped streams give their decode sessions back."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from serve_harness import API_KEY

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def base(serve_app):
    return serve_app.url.removesuffix("/v1")


def scrape(base) -> dict:
    """{(sample name, sorted labels): value} of the current /metrics."""
    r = requests.get(base + "/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(metrics: dict, name: str, **labels) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_parse_and_counters_move_by_known_requests(base):
    before = scrape(base)
    body = {"model": "target", "prompt": "The river", "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    answers = [requests.post(base + "/v1/completions", json=body, headers=HEADERS, timeout=60).json() for _ in range(2)]
    prompt_tokens = answers[0]["usage"]["prompt_tokens"]
    assert requests.post(base + "/v1/completions", json={**body, "stop": "x" * 300}, headers=HEADERS, timeout=60).status_code == 400
    stream = {"model": "target", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    with requests.post(base + "/v1/chat/completions", json=stream, headers=HEADERS, stream=True, timeout=60) as r:
        assert b"[DONE]" in r.content
    after = scrape(base)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("collab_requests_total", pipeline="target", endpoint="completions", status="200") == 2
    assert delta("collab_requests_total", pipeline="target", endpoint="completions", status="400") == 1
    assert delta("collab_requests_total", pipeline="target", endpoint="chat", status="200") == 1
    assert delta("collab_generation_tokens_total", pipeline="target") == 2 * 3 + 4
    assert delta("collab_prompt_tokens_total", pipeline="target") >= 2 * prompt_tokens + 1
    assert delta("collab_model_calls_total", pipeline="target", model="target") >= 3
    assert delta("collab_e2e_request_latency_seconds_count", pipeline="target", endpoint="completions") == 2
    assert delta("collab_e2e_request_latency_seconds_sum", pipeline="target", endpoint="completions") > 0
    assert delta("collab_time_to_first_token_seconds_count", pipeline="target") == 1
    assert value(after, "collab_requests_in_flight") == 0
    assert value(after, "collab_kv_capacity_tokens", model="target") > 0  # the engine's gauges, per model
    assert value(after, "collab_sessions_open", model="target") >= 0


def test_metrics_and_health_need_no_key_and_names_are_prometheus_style(base):
    text = requests.get(base + "/metrics", timeout=30).text
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"collab_requests", "collab_e2e_request_latency_seconds", "collab_time_to_first_token_seconds"} <= names
    assert all(n.startswith("collab_") for n in names if not n.startswith(("python_", "process_")))


def test_dropped_streams_give_their_sessions_back(base):
    gauge = ("collab_sessions_open", (("model", "target"),))
    before = scrape(base)
    assert gauge in before, "the model deployment publishes no engine stats()"
    body = {"model": "target", "prompt": "The river", "max_tokens": 400, "ignore_eos": True, "stream": True}
    responses = []
    for _ in range(12):
        r = requests.post(base + "/v1/completions", json=body, headers=HEADERS, stream=True, timeout=60)
        next(r.iter_lines())  # the stream has started: a session is open
        responses.append(r)
    for r in responses:
        r.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if scrape(base).get(gauge) == before[gauge]:
            break
        time.sleep(0.5)
    after = scrape(base)
    assert after.get(gauge) == before[gauge]
    assert requests.get(base + "/health", timeout=30).status_code == 200
    labels = {"pipeline": "target", "endpoint": "completions"}
    dropped, done = (
        value(after, "collab_requests_total", status=s, **labels) - value(before, "collab_requests_total", status=s, **labels)
        for s in ("499", "200")
    )
    assert dropped >= 1 and dropped + done == 12  # a stream the client left is logged and counted as 499


def test_one_access_line_per_request_with_its_request_id(base, ray_cluster):
    """The coordinator writes one access line (id, status, latency) and Serve's own line for it is gone."""
    r = requests.post(base + "/v1/completions", json={"model": "target", "prompt": "x", "max_tokens": 1}, headers=HEADERS, timeout=60)
    rid = r.headers["x-request-id"]
    assert r.status_code == 200 and rid
    deadline, access, serve_lines = time.monotonic() + 15, [], []
    while time.monotonic() < deadline and not access:
        lines = [
            line
            for f in Path(ray_cluster.temp_dir).rglob("*")
            if f.is_file() and f.suffix in (".log", ".err", ".out")
            for line in f.read_text(errors="replace").splitlines()
            if rid in line
        ]
        access = [line for line in lines if "collab_ray.access" in line]
        serve_lines = [line for line in lines if "ingress" in line and "POST /v1/completions" in line and "collab_ray.access" not in line]
        time.sleep(0.5)
    assert len(access) == 1 and "POST /v1/completions 200" in access[0] and "ms" in access[0], access
    assert not serve_lines, serve_lines
