"""`collab-ray run CONFIG --pipeline P --input in.jsonl --output out.jsonl`: the batch job.

Exit status: 0 when every row of the output succeeded, 1 when some failed (the summary says how
many), 2 on a bad config, input or argument.
"""

from __future__ import annotations



def run(args) -> int:
    from collab_ray.jobs.runner import JobConfig, run_job

    sampling = {k: v for k, v in (("max_tokens", args.max_tokens), ("temperature", args.temperature)) if v is not None}
    job = JobConfig(
        config=args.config, pipeline=args.pipeline, input=args.input, output=args.output, app=args.app,
        concurrency=args.concurrency, max_retries=args.max_retries, timeout_s=args.timeout,
        retry_failed=args.retry_failed, keep_app=args.keep_app, sampling=sampling,
    )  # fmt: skip
    summary = run_job(job)
    print(f"collab-ray run {job.pipeline}: {summary}; {job.output.resolve()}", flush=True)
    for row_id, error in list(summary.errors.items())[:5]:
        print(f"  failed: id {row_id!r}: {error}", flush=True)
    return 1 if summary.output_failed else 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "run",
        help="run a pipeline over a JSONL dataset on the Ray cluster (resumable)",
        description="Run a pipeline of a collaboration config over a JSONL dataset, on the Ray cluster. "
        "Rerunning with the same output skips the rows already there. Exit status 1 when rows failed.",
    )
    p.add_argument("config", help="collaboration YAML (models, pipelines, server)")
    p.add_argument("--pipeline", required=True, help="pipeline to run (or a model's name)")
    p.add_argument("--input", required=True, help="JSONL: {id, prompt | messages, sampling fields} per line")
    p.add_argument("--output", required=True, help="JSONL written row by row; on a cluster, an absolute or shared path")
    p.add_argument("--app", default=None, help="attach to this running Serve app instead of deploying the config")
    p.add_argument("--concurrency", type=int, default=8, help="rows in flight at once (default 8)")
    p.add_argument("--max-retries", type=int, default=2, help="retries of a row on replica death or timeout (default 2)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per attempt (default: server.request_timeout_s + 30)")
    p.add_argument("--max-tokens", type=int, default=None, help="max_tokens of rows that set none")
    p.add_argument("--temperature", type=float, default=None, help="temperature of rows that set none")
    p.add_argument("--retry-failed", action="store_true", help="run again the rows the output records as failed")
    p.add_argument("--keep-app", action="store_true", help="leave the app this job deployed running")
    p.set_defaults(func=run)
