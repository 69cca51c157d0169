"""Batch jobs: `collab-ray run CONFIG --pipeline P --input in.jsonl --output out.jsonl`.

`rows` reads and validates the JSONL input and keeps the resumable JSONL output; `runner` sends
the rows to the pipeline's Serve application with a bounded number in flight; `cli` is the
command. Submit it to a cluster with `ray job submit --working-dir . -- collab-ray run …`.
"""
