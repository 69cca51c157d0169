"""Run one pipeline over a JSONL dataset on a Ray cluster: deploy (or attach to) its Serve app and
keep a bounded number of rows in flight to it.

Why a pool of requests to Serve and not Ray Data: each row is one collaboration, several models
and often many small decode steps (drafts, verifications, session appends) that the pipeline's
coordinator drives across model deployments. Those deployments already batch concurrent calls
(`@serve.batch`), hold KV-cache sessions, restart dead replicas and autoscale, and the coordinator
replays lost sessions; a Ray Data `map_batches` would have to rebuild all of that inside its
actors, or call the deployments anyway. So the job is a thin driver: `concurrency` rows in flight
through the app's ingress handle, each with a timeout and a bounded number of retries, each
written to the output as soon as it finishes (see rows.py for the formats and resuming).

Failures: a row whose model replica died, was overloaded or timed out (`ModelUnavailable`) is
retried up to `max_retries` times with backoff, then recorded as failed; any other error (a bad
prompt, a model error) is recorded at once. The job always goes on to the next row.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from collab_ray.config import load_config
from collab_ray.core.strategy import Request, StrategyResult
from collab_ray.jobs.rows import InputRow, OutputFile, RowId, error_record, read_input, result_record, to_request


class JobConfig(BaseModel):
    """A batch run of one pipeline over a JSONL dataset (`collab-ray run`)."""

    model_config = ConfigDict(extra="forbid")

    config: Path = Field(description="Collaboration YAML: models, pipelines, server.")
    pipeline: str = Field(description="Pipeline to run: a configured pipeline or a model's name.")
    input: Path = Field(description="JSONL input: {id, prompt | messages, sampling fields…} per line.")
    output: Path = Field(description="JSONL output, appended as rows finish; a rerun resumes it.")
    app: str | None = Field(
        None, description="Attach to this running Serve application (started from the same config) instead of deploying."
    )
    concurrency: int = Field(8, ge=1, description="Rows in flight at once; the model deployments batch them.")
    max_retries: int = Field(
        2, ge=0, description="Retries of a row whose replica died, was overloaded or timed out, before it is recorded failed."
    )
    timeout_s: float | None = Field(
        None, gt=0, description="Timeout of one attempt at a row (default: the config's server.request_timeout_s + 30 s)."
    )
    retry_failed: bool = Field(False, description="Run again the rows the output records as failed.")
    keep_app: bool = Field(False, description="Leave the application this job deployed running when it ends.")
    sampling: dict[str, Any] = Field(
        default_factory=dict, description="Default sampling fields (max_tokens, temperature, …) of rows that set none."
    )

    @property
    def app_name(self) -> str:
        """The Serve application the job uses: `app`, or the one it deploys."""
        return self.app or f"batch-{self.pipeline}"


@dataclass
class Summary:
    succeeded: int = 0  # rows of this run
    failed: int = 0
    skipped: int = 0  # input rows already in the output
    retries: int = 0
    seconds: float = 0.0
    output_rows: int = 0  # the whole output after the run
    output_failed: int = 0
    errors: dict[RowId, str] = field(default_factory=dict)  # this run's failures

    def __str__(self) -> str:
        rate = (self.succeeded + self.failed) / self.seconds if self.seconds else 0.0
        return (
            f"{self.succeeded} succeeded, {self.failed} failed, {self.skipped} already done, {self.retries} retries "
            f"in {self.seconds:.1f} s ({rate:.2f} rows/s); output: {self.output_rows} rows, {self.output_failed} failed"
        )


Call = Callable[[Request], Awaitable[StrategyResult]]


async def run_rows(
    rows: list[InputRow],
    call: Call,
    output: OutputFile,
    *,
    defaults: dict[str, Any],
    concurrency: int,
    max_retries: int,
    retryable: tuple[type[BaseException], ...],
    backoff_s: float = 2.0,
    progress: tqdm | None = None,
) -> Summary:
    """Send `rows` through `call` with at most `concurrency` in flight; write each as it finishes.

    A `retryable` error is retried after `backoff_s`, doubling each time (at most 30 s).
    """
    summary = Summary()
    pending = iter(rows)

    async def worker() -> None:
        for row in pending:  # shared by the workers: each row is taken once
            record = await _run_row(row, call, defaults, max_retries, retryable, backoff_s)
            output.write(record)
            summary.retries += max(record["attempts"] - 1, 0)
            if record["error"] is None:
                summary.succeeded += 1
            else:
                summary.failed += 1
                summary.errors[row.id] = record["error"]
            if progress is not None:
                progress.set_postfix(failed=summary.failed, refresh=False)
                progress.update()

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(rows)))))
    return summary


async def _run_row(row: InputRow, call: Call, defaults: dict, max_retries: int, retryable: tuple, backoff_s: float) -> dict:
    try:
        request = to_request(row, defaults)
    except ValueError as e:
        return error_record(row.id, e, attempts=0)
    attempt = 0
    while True:
        attempt += 1
        try:
            return result_record(row.id, await call(request), attempt)
        except retryable as e:
            if attempt > max_retries:
                return error_record(row.id, e, attempt)
            await asyncio.sleep(min(backoff_s * 2 ** (attempt - 1), 30.0))  # give Serve time to restart or add a replica
        except Exception as e:  # a bad prompt or a model error: this row fails, the job goes on
            return error_record(row.id, e, attempt)


def run_job(job: JobConfig) -> Summary:
    """Run the job on the Ray cluster (RAY_ADDRESS, the one a `ray job` runs in, or a local one)."""
    config = load_config(job.config).only(job.pipeline)
    rows = read_input(job.input)
    output = OutputFile(job.output, retry_failed=job.retry_failed)
    todo = [row for row in rows if row.id not in output.done]
    start = time.perf_counter()
    summary = Summary()
    if todo:
        from collab_ray.serving import client

        timeout = job.timeout_s or config.server.request_timeout_s + 30
        if job.app:
            pipeline_client = client.connect(job.app, timeout)
        else:
            print(f"deploying {job.pipeline!r} ({', '.join(config.models)}) as Serve application {job.app_name!r}", flush=True)
            pipeline_client = client.deploy(config, job.app_name, timeout)
        bar = tqdm(total=len(todo), unit="row", desc=job.pipeline, file=sys.stderr, mininterval=1 if sys.stderr.isatty() else 10)
        try:
            summary = asyncio.run(
                run_rows(
                    todo, lambda request: pipeline_client.run(job.pipeline, request), output,
                    defaults=job.sampling, concurrency=job.concurrency, max_retries=job.max_retries,
                    retryable=(client.ModelUnavailable,), progress=bar,
                )
            )  # fmt: skip
        finally:
            bar.close()
            output.close()
            if not job.app and not job.keep_app:
                client.delete(job.app_name)
    summary.seconds = time.perf_counter() - start
    summary.skipped = len(rows) - len(todo)
    summary.output_rows = len(output.done)
    summary.output_failed = sum(not ok for ok in output.done.values())
    return summary
