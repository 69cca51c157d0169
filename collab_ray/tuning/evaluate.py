"""Scoring a merged model in memory: exact-match accuracy of batched greedy generations, or −perplexity.

Each validation set is read once on the driver (`load_validation`); a trial scores its items in
growing slices (`score_slice`), keeps running totals (`Tally`) and reports the objective after each
slice, so ASHA can stop poor trials early on few items.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from collab_ray.core.errors import ConfigError
from collab_ray.eval.metrics import exact_match
from collab_ray.tuning.references import task_items
from collab_ray.tuning.spec import TuneSpec, Validation


@dataclass(frozen=True)
class ValidationData:
    """The items of one validation set: (prompt, accepted answers) pairs, or token chunks [n, seq_len]."""

    spec: Validation
    pairs: list[tuple[str, list[str]]] | None = None
    chunks: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.pairs) if self.pairs is not None else len(self.chunks)


def load_validation(v: Validation, tokenizer_dir: str | Path, count: int) -> ValidationData:
    """The first `count` items of validation set `v` (chunks tokenized with `tokenizer_dir`'s tokenizer)."""
    if v.metric == "neg_perplexity":
        from collab_ray.merge.fisher import token_chunks

        data = ValidationData(v, chunks=token_chunks(v.data, Path(tokenizer_dir), v.seq_len, count))
    else:
        data = ValidationData(v, pairs=_pairs(v.data)[:count])
    if len(data) < count:
        raise ConfigError(f"objective {v.name!r}: {v.data!r} has {len(data)} items, eval_items asks for {count}")
    return data


def _pairs(source: str) -> list[tuple[str, list[str]]]:
    registered = task_items(source)
    if registered is not None:
        return registered
    from collab_ray.eval.datasets import load

    dataset = load(source)
    if dataset.kind != "short":
        raise ConfigError(f"{source!r} is multiple choice; accuracy objectives need short-answer items")
    return [(item.prompt, item.answers) for item in dataset.items]


@torch.inference_mode()
def greedy(model, tokenizer, prompts: list[str], max_new_tokens: int, batch: int = 64) -> list[str]:
    """Greedy continuations of `prompts`, batched and left-padded; each stops at a newline or EOS."""
    device = model.get_input_embeddings().weight.device
    newline = tokenizer.encode("\n", add_special_tokens=False)
    stop = [tokenizer.eos_token_id] + (newline if len(newline) == 1 else [])
    tokenizer.padding_side = "left"
    texts = []
    for s in range(0, len(prompts), batch):
        enc = tokenizer(prompts[s : s + batch], return_tensors="pt", padding=True).to(device)
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop, pad_token_id=tokenizer.pad_token_id
        )
        texts += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return texts


def exact_matches(model, tokenizer, pairs: list[tuple[str, list[str]]], max_new_tokens: int) -> list[bool]:
    """Per (prompt, answers) pair: does the greedy continuation match an answer?"""
    texts = greedy(model, tokenizer, [p for p, _ in pairs], max_new_tokens)
    return [exact_match(t, answers) for t, (_, answers) in zip(texts, pairs)]


PPL_BATCH = 8  # chunks per forward pass in perplexity scoring


@torch.inference_mode()
def score_slice(model, tokenizer, data: ValidationData, lo: int, hi: int) -> tuple[float, int]:
    """(total, count) over items [lo, hi): exact matches and items, or summed NLL and predicted tokens."""
    if data.pairs is not None:
        return float(sum(exact_matches(model, tokenizer, data.pairs[lo:hi], data.spec.max_new_tokens))), hi - lo
    total, count = 0.0, 0
    for s in range(lo, hi, PPL_BATCH):  # sub-batches: [n, L, V] float32 logits of a whole slice can be GBs
        x = data.chunks[s : min(s + PPL_BATCH, hi)].to(model.get_input_embeddings().weight.device)  # [b, L]
        n = x.shape[0] * (x.shape[1] - 1)  # predicted tokens
        total += float(model(input_ids=x, labels=x).loss) * n  # the loss is the mean over them
        count += n
    return total, count


def skeleton(config: dict, device: str):
    """A randomly initialized causal LM of the architecture in `config` (a config.json), in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**config)).to(device).eval()


def load_merged(model, state: dict[str, torch.Tensor]) -> None:
    """Load a merged state dict into `model`; refuse non-finite tensors and tensors the model lacks."""
    bad = [name for name, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"the merge produced non-finite values in {len(bad)} tensors, e.g. {bad[0]!r} (weights summing to 0?)")
    result = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if model.config.get_text_config().tie_word_embeddings else set()
    if result.unexpected_keys or set(result.missing_keys) - tied:
        raise ValueError(f"merged tensors do not fit the model: unexpected {result.unexpected_keys[:3]}, missing {result.missing_keys[:3]}")


@dataclass
class Tally:
    """Running totals of every validation set over the slices scored so far."""

    totals: dict[str, list[float]] = field(default_factory=dict)  # name -> [total, count]

    def add(self, name: str, total: float, count: int) -> None:
        t = self.totals.setdefault(name, [0.0, 0])
        t[0] += total
        t[1] += count

    def metrics(self, spec: TuneSpec) -> dict[str, float]:
        """`METRIC/NAME` per set and `objective` = Σ weight · metric."""
        out, objective = {}, 0.0
        for v in spec.objective:
            total, count = self.totals[v.name]
            value = total / count if v.metric == "accuracy" else -math.exp(min(total / count, 80.0))
            out[f"{v.metric}/{v.name}"] = value
            objective += v.weight * value
        return {"objective": objective, **out}


def score_rung(model, tokenizer, sets: list[ValidationData], spec: TuneSpec, rung: int, tally: Tally) -> dict[str, float]:
    """Score every set's items of rung `rung` (items eval_items[rung−1]…eval_items[rung]) into `tally`."""
    lo = spec.eval_items[rung - 1] if rung else 0
    for data in sets:
        tally.add(data.spec.name, *score_slice(model, tokenizer, data, lo, spec.eval_items[rung]))
    return tally.metrics(spec)


def score_model(model, tokenizer, sets: list[ValidationData], spec: TuneSpec) -> dict[str, float]:
    """The full evaluation (every rung) of a model: what a trial that runs to the end reports last."""
    tally = Tally()
    for rung in range(len(spec.eval_items)):
        metrics = score_rung(model, tokenizer, sets, spec, rung, tally)
    return metrics
