"""Batch jobs (`collab-ray run`): input checks, resuming, `ray job submit`, failures, autoscaling, replica deaths."""

import asyncio
import json
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from collab_ray.cli import main
from collab_ray.config import parse_config
from collab_ray.core import ConfigError
from collab_ray.core.strategy import StrategyResult
from collab_ray.jobs.rows import InputError, InputRow, OutputFile, read_input, to_request
from collab_ray.jobs.runner import run_rows
from serve_harness import ROOT


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_output(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def prompts(n: int, **fields) -> list[dict]:
    return [{"id": i, "prompt": f"The river {i} runs", **fields} for i in range(n)]


# ---- input and output files (no Ray) -----------------------------------------------------------


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"prompt": "x"}', "no 'id'"),
        ('{"id": true, "prompt": "x"}', "'id' must be a string or an integer, got True"),
        ('{"id": 0, "prompt": "again"}', "id 0 repeats line 1"),
    ],
)
def test_bad_input_lines_stop_the_job_naming_the_line(tmp_path, line, message):
    path = write_rows(tmp_path / "in.jsonl", [{"id": 0, "prompt": "a"}, "", line])
    with pytest.raises(InputError, match=message) as err:
        read_input(path)
    assert "in.jsonl:3:" in str(err.value)


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": 42}, "prompt: Input should be a valid string (got 42)"),
        ({"prompt": ""}, "prompt: String should have at least 1 character"),
        ({"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, "exactly one of 'prompt' and 'messages'"),
        ({"messages": [{"role": "wizard", "content": "y"}]}, "messages.0.role"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens: Input should be greater than or equal to 1 (got 0)"),
        ({"prompt": "x", "max_token": 5}, "max_token: Extra inputs are not permitted (got 5)"),
    ],
)
def test_bad_rows_name_the_field_and_value(row, message):
    with pytest.raises(ValueError) as err:
        to_request(InputRow(1, "r", {"id": "r", **row}), {"max_tokens": 8})
    assert message in str(err.value)


def test_rows_take_the_job_defaults_unless_they_set_their_own():
    request = to_request(InputRow(1, 7, {"id": 7, "messages": [{"role": "user", "content": "Hi"}], "temperature": 0}),
                         {"max_tokens": 8, "temperature": 0.7})  # fmt: skip
    assert request.messages == [{"role": "user", "content": "Hi"}] and request.prompt is None
    assert request.params.max_tokens == 8 and request.params.temperature == 0


def test_output_resumes_after_a_torn_line_and_can_retry_failures(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"id": 1, "text": "a", "error": null}\n{"id": "b", "error": "boom"}\n{"id": 3, "te')
    out = OutputFile(path)
    assert out.done == {1: True, "b": False}
    assert path.read_text().endswith('"boom"}\n')  # the torn line is cut off
    out.write({"id": 3, "text": "c", "error": None})
    out.close()
    assert [r["id"] for r in read_output(path)] == [1, "b", 3]
    retry = OutputFile(path, retry_failed=True)
    assert retry.done == {1: True, 3: True} and [r["id"] for r in read_output(path)] == [1, 3]
    path.write_text('{"id": 1}\nnot json\n')
    with pytest.raises(InputError, match="out.jsonl:2"):
        OutputFile(path)


class Flaky(Exception):
    pass


def test_retryable_errors_are_retried_a_bounded_number_of_times_then_recorded(tmp_path):
    calls: dict[str, int] = {}

    async def call(request):
        calls[request.prompt] = calls.get(request.prompt, 0) + 1
        if request.prompt == "always" or (request.prompt == "once" and calls["once"] == 1):
            raise Flaky("replica died")
        if request.prompt == "bad":
            raise RuntimeError("model error")
        return StrategyResult(text=request.prompt.upper(), meta={"models": {"m": {"calls": 1}}, "strategy": "single"})

    rows = [InputRow(i, p, {"id": p, "prompt": p}) for i, p in enumerate(["ok", "once", "always", "bad"], 1)]
    rows.append(InputRow(5, "empty", {"id": "empty", "prompt": ""}))
    out = OutputFile(tmp_path / "out.jsonl")
    summary = asyncio.run(
        run_rows(rows, call, out, defaults={}, concurrency=3, max_retries=2, retryable=(Flaky,), backoff_s=0)
    )
    out.close()
    got = {r["id"]: r for r in read_output(tmp_path / "out.jsonl")}
    assert got["ok"]["text"] == "OK" and got["ok"]["models"] == {"m": {"calls": 1}} and got["ok"]["error"] is None
    assert got["once"]["attempts"] == 2 and got["once"]["error"] is None
    assert got["always"]["attempts"] == 3 and "replica died" in got["always"]["error"] and calls["always"] == 3
    assert got["bad"]["attempts"] == 1 and got["bad"]["error_type"] == "RuntimeError"
    assert got["empty"]["attempts"] == 0 and "prompt" in got["empty"]["error"]
    assert (summary.succeeded, summary.failed, summary.retries) == (2, 3, 3)


# ---- on the session's Ray cluster ---------------------------------------------------------------


def ray_job(ray_cluster, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = ["ray", "job", *args[:1], "--address", ray_cluster.dashboard_url, *args[1:]]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def submit_run(ray_cluster, *run_args: str, submit_args: tuple = ()) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir <repo> SUBMIT_ARGS -- collab-ray run deploy/tiny.yaml --app collab RUN_ARGS`."""
    flags = ["--working-dir", str(ROOT), *submit_args]
    return ray_job(ray_cluster, "submit", *flags, "--", "collab-ray", "run", "deploy/tiny.yaml", "--app", "collab", *run_args)


def assert_each_id_once(path: Path, n: int) -> list[dict]:
    rows = read_output(path)
    assert sorted(r["id"] for r in rows) == list(range(n))
    return rows


def test_ray_job_submit_runs_every_row(serve_app, ray_cluster, tmp_path):
    src = write_rows(tmp_path / "in.jsonl", prompts(50))
    out = tmp_path / "out.jsonl"
    job = submit_run(ray_cluster, "--pipeline", "target", "--input", str(src), "--output", str(out),
                     "--max-tokens", "6", "--temperature", "0")  # fmt: skip
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    rows = assert_each_id_once(out, 50)
    assert all(r["error"] is None and r["usage"]["completion_tokens"] <= 6 for r in rows)
    assert rows[0]["models"]["target"]["calls"] == 1 and rows[0]["collab"]["strategy"] == "single"
    assert "50 succeeded, 0 failed" in job.stdout


def test_a_stopped_job_resumes_and_writes_each_row_once(serve_app, ray_cluster, tmp_path):
    # one long row at a time (~0.2-0.5 s each), so the stop lands mid-run
    src = write_rows(tmp_path / "in.jsonl", prompts(50, max_tokens=300, ignore_eos=True, temperature=0))
    out = tmp_path / "out.jsonl"
    args = ("--pipeline", "target", "--input", str(src), "--output", str(out))
    sid = f"collab-stop-{uuid.uuid4().hex[:8]}"
    submitted = submit_run(ray_cluster, *args, "--concurrency", "1", submit_args=("--no-wait", "--submission-id", sid))
    assert submitted.returncode == 0, submitted.stderr
    deadline = time.monotonic() + 180
    while not (out.exists() and out.read_text().count("\n") >= 10):
        assert time.monotonic() < deadline, ray_job(ray_cluster, "logs", sid).stdout[-3000:]
        time.sleep(0.2)
    assert ray_job(ray_cluster, "stop", sid).returncode == 0
    written = out.read_text().count("\n")
    assert 10 <= written < 50
    rerun = submit_run(ray_cluster, *args)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"{written} already done" in rerun.stdout
    assert all(r["error"] is None for r in assert_each_id_once(out, 50))


def test_malformed_rows_are_recorded_and_the_rest_succeed(serve_app, tmp_path, capsys):
    """Deploys the pipeline's own app (no --app), and deletes it after."""
    from ray import serve

    rows = prompts(12, max_tokens=4)
    rows[3] = {"id": 3, "prompt": 42}
    rows[5] = {"id": 5, "messages": "hello"}
    rows[8] = {"id": 8, "prompt": "x", "temperature": -1}
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"models": {"m": {"source": "tiny:llama-bpe", "num_cpus": 0}}}))
    src, out = write_rows(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    assert main(["run", str(config), "--pipeline", "m", "--input", str(src), "--output", str(out)]) == 1
    got = {r["id"]: r for r in assert_each_id_once(out, 12)}
    assert {i for i, r in got.items() if r["error"]} == {3, 5, 8}
    assert "got 42" in got[3]["error"] and "messages" in got[5]["error"] and "temperature" in got[8]["error"]
    assert "9 succeeded, 3 failed" in capsys.readouterr().out
    assert "batch-m" not in serve.status().applications
    assert main(["run", str(config), "--pipeline", "nope", "--input", str(src), "--output", str(out)]) == 2


def test_killing_a_replica_during_a_run_loses_no_rows(serve_app, tmp_path):
    import ray

    src = write_rows(tmp_path / "in.jsonl", prompts(40, max_tokens=64, ignore_eos=True))
    out = tmp_path / "out.jsonl"
    killed_at: list[int] = []

    def kill_when_started():
        while not (out.exists() and out.read_text().count("\n") >= 4):
            time.sleep(0.05)
        replica = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                       if "model-target2" in a["name"] and "REPLICA" in a["name"])  # fmt: skip
        ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=False)
        killed_at.append(out.read_text().count("\n"))

    killer = threading.Thread(target=kill_when_started, daemon=True)
    killer.start()
    args = ["--pipeline", "target2", "--input", str(src), "--output", str(out), "--concurrency", "4", "--max-retries", "3"]
    status = main(["run", "deploy/tiny.yaml", "--app", "collab", *args])
    killer.join(timeout=30)
    assert killed_at and killed_at[0] <= 20, killed_at  # the replica died with most rows still to run
    assert status == 0 and all(r["error"] is None for r in assert_each_id_once(out, 40))


def test_autoscaling_config_errors_name_the_bad_value():
    def bad(autoscaling, **model):
        with pytest.raises(ConfigError) as err:
            parse_config({"models": {"m": {"source": "tiny:llama-bpe", "autoscaling": autoscaling, **model}}}, "c.yaml")
        return str(err.value)

    assert "min_replicas 3 > max_replicas 2" in bad({"min_replicas": 3, "max_replicas": 2})
    assert "initial_replicas 4" in bad({"max_replicas": 2, "initial_replicas": 4})
    assert "models.m.autoscaling.upscale_delay_s" in bad({"upscale_delay_s": -1})
    assert "target_ongoing_requests 20.0 exceeds max_ongoing_requests 4" in bad(
        {"target_ongoing_requests": 20}, max_ongoing_requests=4
    )
    server = parse_config({"models": {"m": {"source": "x"}}, "server": {"autoscaling": {"max_replicas": 3}}})
    assert server.server.serve_scaling()["autoscaling_config"]["max_replicas"] == 3


def test_autoscaling_adds_a_replica_under_a_burst_and_removes_it_after(serve_app):
    from ray import serve

    from collab_ray.core import SamplingParams
    from collab_ray.core.strategy import Request
    from collab_ray.serving.app import build_app
    from collab_ray.serving.client import connect

    fast = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2, "upscale_delay_s": 1,
            "downscale_delay_s": 2, "look_back_period_s": 2, "metrics_interval_s": 0.5}  # fmt: skip
    config = parse_config({"models": {"m": {"source": "tiny:llama-bpe", "num_cpus": 0, "autoscaling": fast}}})
    serve.run(build_app(config), name="autoscale", route_prefix=None)
    client = connect("autoscale", timeout_s=60)
    request = Request(prompt="The river", params=SamplingParams(max_tokens=32, ignore_eos=True))

    def running() -> int:
        return serve.status().applications["autoscale"].deployments["model-m"].replica_states.get("RUNNING", 0)

    async def burst_until_two() -> None:
        deadline = time.monotonic() + 90
        while running() < 2:
            assert time.monotonic() < deadline, "did not scale up"
            await asyncio.gather(*(client.run("m", request) for _ in range(12)))

    try:
        assert running() == 1
        asyncio.run(burst_until_two())
        deadline = time.monotonic() + 90
        while running() > 1:
            assert time.monotonic() < deadline, "did not scale down"
            time.sleep(0.5)
    finally:
        serve.delete("autoscale")
