"""The multi-task experiment's checkpoints and tasks: a small character-level llama trained on a
mixture of three synthetic tasks, then fine-tuned separately on each (with 30% of each batch
replayed from the mixture, as fine-tuning recipes do to limit forgetting):

    add      A347+8=     -> 355
    reverse  Rkrtmq=     -> qmtrk
    sort     S80531=     -> 01358

In recipe `multitask-hard` the base sees only easy forms of the tasks (A34+8=, Rkrt=, S805=), so
each fine-tune learns its task's full form (longer inputs) from it: task vectors that carry a new
skill, where in `multitask` they mostly sharpen one the base has. Held-out items are full-form.

Checkpoints are model sources like `tiny:…` (`collab_ray.models.loader` resolves `multitask:base`,
`multitask-hard:add`, …): built deterministically on first use into $COLLAB_RAY_CACHE/multitask (a
few minutes on 2 cores; `multitask-small:…` is a seconds-sized recipe for tests). Validation and
test items are held out of every training batch. They live here, beside the tiny models, so that
what serves or ensembles them needs no tuner: the merge experiment (`collab_ray.tuning.experiment`),
the eval datasets and `deploy/specialists.yaml` all use them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import string
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from collab_ray.core.errors import ConfigError
from collab_ray.models.cache import building, cache_root
from collab_ray.models.tiny import new_llama

BUILD_VERSION = 2  # bump when the recipe code changes: cached checkpoints are rebuilt
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]
HELD_OUT = 256  # items per task in each of the validation and test splits
SPLIT_SEEDS = {"validation": 1, "test": 2}


def _add(r: random.Random, easy: bool = False) -> tuple[str, str]:
    a, b = r.randrange(100 if easy else 1000), r.randrange(10)
    return f"A{a}+{b}=", str(a + b)


def _reverse(r: random.Random, easy: bool = False) -> tuple[str, str]:
    s = "".join(r.choice(string.ascii_lowercase) for _ in range(r.randint(3, 5) if easy else r.randint(4, 8)))
    return f"R{s}=", s[::-1]


def _sort(r: random.Random, easy: bool = False) -> tuple[str, str]:
    s = "".join(r.choice(string.digits) for _ in range(r.randint(3, 4) if easy else r.randint(4, 7)))
    return f"S{s}=", "".join(sorted(s))


TASKS: dict[str, Callable[[random.Random, bool], tuple[str, str]]] = {"add": _add, "reverse": _reverse, "sort": _sort}
ALPHABET = string.digits + string.ascii_lowercase + "+=\nARS"


@dataclass(frozen=True)
class Recipe:
    """Model size and training schedule of the experiment's checkpoints."""

    hidden: int
    layers: int
    heads: int
    base_steps: int  # Adam steps on the mixture of all tasks
    finetune_steps: int  # Adam steps on one task, from the base
    base_lr: float
    finetune_lr: float
    replay: float = 0.3  # share of each fine-tuning batch drawn from the whole mixture (limits forgetting)
    easy_base: bool = False  # the mixture (base training, replay) holds easy forms only; fine-tunes learn the full ones
    batch: int = 64
    seed: int = 0


RECIPES = {
    "multitask": Recipe(
        hidden=128, layers=4, heads=4, base_steps=1000, finetune_steps=400, base_lr=3e-3, finetune_lr=1e-3, replay=0.3
    ),
    "multitask-hard": Recipe(
        hidden=128, layers=4, heads=4, base_steps=1000, finetune_steps=400, base_lr=3e-3, finetune_lr=1e-3, replay=0.3,
        easy_base=True,
    ),
    "multitask-small": Recipe(hidden=32, layers=2, heads=2, base_steps=60, finetune_steps=20, base_lr=3e-3, finetune_lr=1e-3, batch=32),
}


# ------------------------------------------------------------------------------------- items


def task_items(task: str, split: str) -> list[tuple[str, str]]:
    """The held-out (prompt, answer) items of `task` in split 'validation' or 'test' (distinct prompts)."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; available: {', '.join(TASKS)}")
    if split not in SPLIT_SEEDS:
        raise ConfigError(f"unknown split {split!r}; one of {', '.join(SPLIT_SEEDS)}")
    return _held_out(task)[split]


@functools.cache
def _held_out(task: str) -> dict[str, list[tuple[str, str]]]:
    """Both held-out splits of `task`, disjoint (validation first, then test)."""
    r, seen, splits = random.Random(f"held-out:{task}"), set(), {}
    for split in SPLIT_SEEDS:
        items = []
        while len(items) < HELD_OUT:
            prompt, answer = TASKS[task](r)
            if prompt not in seen:
                seen.add(prompt)
                items.append((prompt, answer))
        splits[split] = items
    return splits


def training_batch(
    r: random.Random, size: int, focus: str | None = None, replay: float = 0.0, easy_mixture: bool = False
) -> list[tuple[str, str]]:
    """`size` training items, never a held-out prompt: of task `focus`, except a `replay` share drawn from
    the whole mixture (every task alike; all of them without a focus), in easy forms if `easy_mixture`."""
    out = []
    while len(out) < size:
        focused = bool(focus) and r.random() >= replay
        task = focus if focused else r.choice(list(TASKS))
        item = TASKS[task](r, easy_mixture and not focused)
        if item[0] not in _held_prompts(task):
            out.append(item)
    return out


@functools.cache
def _held_prompts(task: str) -> frozenset[str]:
    return frozenset(p for items in _held_out(task).values() for p, _ in items)


# ------------------------------------------------------------------------------- checkpoints


def resolve_model(ref: str) -> str:
    """`multitask:NAME` / `multitask-small:NAME` -> its checkpoint directory (built on first use); other refs unchanged."""
    recipe, _, name = ref.partition(":")
    if recipe not in RECIPES:
        return ref
    if name not in ("base", *TASKS):
        raise ConfigError(f"model {ref!r}: {recipe} has base, {', '.join(TASKS)}")
    return str(checkpoint(recipe, name))


def checkpoint(recipe: str, name: str) -> Path:
    """Directory of checkpoint `name` ('base' or a task) of `recipe`, built (once, atomically) if missing."""
    spec = RECIPES[recipe]
    digest = hashlib.sha256(json.dumps([BUILD_VERSION, asdict(spec), ALPHABET, HELD_OUT]).encode()).hexdigest()[:12]
    root = cache_root() / "multitask" / f"{recipe}-{digest}"
    if not (root / "base" / "config.json").is_file():
        with building(root / "base") as tmp, one_thread():
            tokenizer = _tokenizer()
            model = new_llama(
                tokenizer, seed=spec.seed, hidden=spec.hidden, layers=spec.layers, heads=spec.heads, kv_heads=spec.heads,
                max_positions=64,
            )
            _train(model, tokenizer, None, spec.base_steps, spec.base_lr, spec)
            _save(model, tokenizer, tmp)
    if name != "base" and not (root / name / "config.json").is_file():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        with building(root / name) as tmp, one_thread():
            tokenizer = AutoTokenizer.from_pretrained(root / "base")
            model = AutoModelForCausalLM.from_pretrained(root / "base")
            _train(model, tokenizer, name, spec.finetune_steps, spec.finetune_lr, spec)
            _save(model, tokenizer, tmp)
    return root / name


@contextmanager
def one_thread() -> Iterator[None]:
    """Train on one thread: these models gain nothing from more (on a busy machine they lose a lot),
    and the checkpoints then do not depend on the machine's core count."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _tokenizer():
    """A character-level tokenizer over ALPHABET (no BOS is added: prompts start with their task letter)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIAL + list(ALPHABET))}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")  # every character a token
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


def _train(model, tokenizer, focus: str | None, steps: int, lr: float, spec: Recipe) -> None:
    """`steps` AdamW steps (linearly decaying lr) of next-token loss on the answers of training items:
    the mixture (`focus` None), or task `focus` with `spec.replay` of the mixture."""
    import torch

    r = random.Random(f"{spec.seed}:{focus}")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps)
    model.train()
    for _ in range(steps):
        loss = model(**_encode(tokenizer, training_batch(r, spec.batch, focus, spec.replay, spec.easy_base))).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
    model.eval()


def _encode(tokenizer, items: list[tuple[str, str]]) -> dict:
    """Right-padded `prompt answer\\n` rows; the loss covers the answer and its newline only."""
    import torch

    rows = [(tokenizer.encode(p, add_special_tokens=False), tokenizer.encode(a + "\n", add_special_tokens=False)) for p, a in items]
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, a) in enumerate(rows):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        labels[i, len(p) : len(p) + len(a)] = torch.tensor(a)
        mask[i, : len(p) + len(a)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _save(model, tokenizer, out: Path) -> None:
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
