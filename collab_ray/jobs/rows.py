"""Batch-job rows: the JSONL input (checked before any work starts) and the resumable JSONL output.

Input, one JSON object per line (blank lines are skipped):

    {"id": 1, "prompt": "The river"}
    {"id": "q2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 64, "temperature": 0}

`id` is a string or an integer, unique in the file; then exactly one of `prompt` (a completion)
and `messages` (a chat, OpenAI format). Every other field is a sampling parameter (`max_tokens`,
`temperature`, `top_p`, `top_k`, `stop`, `seed`, `ignore_eos`, `logprobs`) over the job's
defaults. A line that is not a JSON object with a usable, unique id stops the job before it
starts, naming the line; a row with a bad prompt or sampling field is recorded as failed.

Output, one JSON object per finished row, in the order rows finish:

    {"id": 1, "text": "…", "finish_reason": "length", "usage": {"prompt_tokens": 3, "completion_tokens": 16,
     "total_tokens": 19}, "models": {"target": {"calls": 1, "prompt_tokens": 3, "completion_tokens": 16,
     "latency_s": 0.2}}, "collab": {"strategy": "single", …}, "attempts": 1, "error": null}
    {"id": 2, "error": "max_tokens: Input should be greater than or equal to 1 (got 0)",
     "error_type": "ValidationError", "attempts": 0}

`models` holds each model's calls, tokens and latency for the row, `collab` the strategy's own
metadata. Each row is appended and flushed as it finishes. On a rerun the ids already in the
output are skipped (a last line torn by a kill is cut off first), so every input row ends up in
the output exactly once.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from collab_ray.core.errors import CollabError
from collab_ray.core.files import describe_errors
from collab_ray.core.sampling import SamplingParams
from collab_ray.core.strategy import Request, StrategyResult

RowId = str | int


class InputError(CollabError, ValueError):
    """The input or output file cannot be used; names the file and line."""


@dataclass
class InputRow:
    line: int  # 1-based line number in the input file
    id: RowId
    data: dict[str, Any]  # the whole JSON object, id included


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool", "developer"] = Field(description="Who speaks.")
    content: str = Field(description="What is said.")


class Prompt(BaseModel):
    """What a row asks: exactly one of a completion prompt and chat messages."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(None, min_length=1, description="Completion prompt.")
    messages: list[Message] | None = Field(None, min_length=1, description="Chat messages, OpenAI format.")

    @model_validator(mode="after")
    def _one(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("a row needs exactly one of 'prompt' and 'messages'")
        return self


def read_input(path: str | Path) -> list[InputRow]:
    """Every row of a JSONL file; InputError naming the line on a bad line or a repeated id."""
    rows: list[InputRow] = []
    first_seen: dict[RowId, int] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = _parse_line(line, n, path)
                if row.id in first_seen:
                    raise InputError(f"{path}:{n}: id {row.id!r} repeats line {first_seen[row.id]} (ids must be unique)")
                first_seen[row.id] = n
                rows.append(row)
    except OSError as e:
        raise InputError(f"cannot read input {str(path)!r}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text: {e}") from None
    return rows


def _parse_line(line: str, n: int, path: str | Path) -> InputRow:
    where = f"{path}:{n}"
    try:
        data = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(data).__name__}")
    if "id" not in data:
        raise InputError(f"{where}: the row has no 'id'")
    row_id = data["id"]
    if isinstance(row_id, bool) or not isinstance(row_id, (str, int)):
        raise InputError(f"{where}: 'id' must be a string or an integer, got {row_id!r}")
    return InputRow(n, row_id, data)


def to_request(row: InputRow, defaults: dict[str, Any]) -> Request:
    """The pipeline request of a row; ValueError naming the bad field and value."""
    fields = {k: v for k, v in row.data.items() if k != "id"}
    text = {k: fields.pop(k) for k in ("prompt", "messages") if k in fields}
    try:
        prompt = Prompt.model_validate(text)
        params = SamplingParams.model_validate({**defaults, **fields})
    except ValidationError as e:
        raise ValueError(describe_errors(e)) from None
    messages = [m.model_dump() for m in prompt.messages] if prompt.messages else None
    return Request(prompt=prompt.prompt, messages=messages, params=params)


def result_record(row_id: RowId, result: StrategyResult, attempts: int) -> dict:
    """The output row of a finished request."""
    collab = dict(result.meta)
    models = collab.pop("models", {})
    usage = {"prompt_tokens": result.usage.prompt_tokens, "completion_tokens": result.usage.completion_tokens,
             "total_tokens": result.usage.total_tokens}  # fmt: skip
    record = {"id": row_id, "text": result.text, "finish_reason": result.finish_reason, "usage": usage,
              "models": models, "collab": collab, "attempts": attempts, "error": None}  # fmt: skip
    if result.logprobs is not None:
        record["logprobs"] = result.logprobs
    return record


def error_record(row_id: RowId, error: BaseException, attempts: int) -> dict:
    """The output row of a failed request."""
    return {"id": row_id, "error": str(error) or repr(error), "error_type": type(error).__name__, "attempts": attempts}


class OutputFile:
    """The job's JSONL output: `done` (id -> succeeded) of the rows already there, then appends.

    Opening it cuts off a last line torn by a kill; with `retry_failed` it also drops the rows
    recorded as failed, so they run again.
    """

    def __init__(self, path: str | Path, retry_failed: bool = False):
        self.path = Path(path)
        self.done: dict[RowId, bool] = {}
        self._file = None
        if self.path.exists():
            self._load(retry_failed)

    def _load(self, retry_failed: bool) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1  # complete lines end here; anything after was torn by a kill
        records = []
        for n, line in enumerate(data[:end].splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                self.done[record["id"]] = record.get("error") is None
            except (ValueError, KeyError, TypeError):
                raise InputError(
                    f"{self.path}:{n}: not a row written by collab-ray run ({line[:60]!r}); fix or move the file"
                ) from None
            records.append(record)
        if end < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(end)
        if retry_failed and not all(self.done.values()):
            kept = [r for r in records if r.get("error") is None]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(_line(r) for r in kept), encoding="utf-8")
            os.replace(tmp, self.path)
            self.done = {r["id"]: True for r in kept}

    def write(self, record: dict) -> None:
        """Append one row and flush it to the OS, so a killed job keeps every finished row."""
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(_line(record))
        self._file.flush()
        self.done[record["id"]] = record.get("error") is None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)) + "\n"
