"""Turn a MergeConfig into per-tensor jobs, checking every name, shape and parameter before any merging.

Layers are recognised by name (`<prefix>.layers.<i>.<rest>`, also `.h.`, `.blocks.`, `.layer.`),
so any decoder architecture works without a per-architecture table. Output layers are numbered
consecutively across slices; the parameter position t of a gradient list is i/(n−1) for the i-th
of the n layers of a slice (1 for a single layer) and 0 for tensors outside the layers, as in
mergekit. Tensors outside the layers whose name contains 'embed', 'wte' or 'wpe' come from the
sources of the first slice, the others (final norm, lm_head) from those of the last slice.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from collab_ray.core.errors import ConfigError
from collab_ray.merge.config import InputSlice, MergeConfig, OutputSlice, Parameters, resolve, tokenizer_settings
from collab_ray.merge.io import ModelFiles, OutputTensor
from collab_ray.merge.methods import MergeMethod, get_method
from collab_ray.merge.vocab import Vocabulary, build_vocabulary, resolve_chat_template

LAYER_RE = re.compile(r"^(?P<prefix>.*?\.(?:layers|h|blocks|layer))\.(?P<index>\d+)\.(?P<rest>.+)$")
PRE_MARKERS = ("embed", "wte", "wpe")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass(frozen=True)
class Input:
    model: ModelFiles
    name: str  # the tensor's name in that model


@dataclass(frozen=True)
class TensorJob:
    """How to make one output tensor."""

    out: OutputTensor
    inputs: tuple[Input, ...]  # config order
    base_index: int | None  # the input passed as `base` (methods that require one), else None
    kwargs: dict[str, Any]  # resolved kernel parameters; per-input ones align with the non-base inputs
    align_rows: bool = False  # vocabulary rows differ (no tokenizer to go by): crop/pad each input to the base's rows
    vocab: bool = False  # rows are tokens: rebuild each input on the output vocabulary first (plan.vocabulary)
    vocab_base: str | None = None  # the base model of this tensor's slice, for the vocabulary's defaults


@dataclass
class MergePlan:
    method: MergeMethod
    jobs: list[TensorJob]
    donor: ModelFiles  # config and tokenizer source: the base model, else the first model
    models: list[ModelFiles]  # every distinct input model
    config_updates: dict[str, Any] = field(default_factory=dict)
    setup: dict[str, Any] = field(default_factory=dict)  # method settings read once (e.g. Fisher data)
    cast: torch.dtype | None = None  # `dtype`: inputs are cast to it before merging
    vocabulary: Vocabulary | None = None  # output vocabulary (tokenizer_source / tokenizer), else None
    chat_template: str | None = None  # resolved `chat_template`
    base: ModelFiles | None = None  # the global base_model


def build_plan(config: MergeConfig, open_model: Callable[[str], ModelFiles] = ModelFiles) -> MergePlan:
    """The jobs of `config`; `open_model` maps a model reference to its tensors (default: read from disk)."""
    method = get_method(config.merge_method)
    files: dict[str, ModelFiles] = {}

    def model(ref: str) -> ModelFiles:
        if ref not in files:
            files[ref] = open_model(ref)
        return files[ref]

    slices = _normalized_slices(config, model)
    donor = model(config.base_model or slices[0][0].sources[0].model)
    referenced = [model(ref) for ref in dict.fromkeys(s.model for out_slice, _ in slices for s in out_slice.sources)]
    vocabulary = _vocabulary(config, referenced, model)
    planner = _Planner(config, method, model, vocabulary)
    for i, (out_slice, base) in enumerate(slices):
        planner.check_inputs(out_slice, base, f"slices[{i}]" if config.slices else "models")
    pre, post = _outside_layers(donor)
    first, last = slices[0], slices[-1]
    for name in pre:
        planner.add(name, [(s, name) for s in first[0].sources], first, t=0.0)
    layers = 0
    for out_slice, base in slices:
        n = out_slice.sources[0].layer_range[1] - out_slice.sources[0].layer_range[0]
        for offset in range(n):
            t = offset / (n - 1) if n > 1 else 1.0
            lead = out_slice.sources[0]
            for prefix, rest in _layer_tensors(model(lead.model), lead.layer_range[0] + offset, lead.model):
                names = [(s, f"{prefix}.{s.layer_range[0] + offset}.{rest}") for s in out_slice.sources]
                planner.add(f"{prefix}.{layers}.{rest}", names, (out_slice, base), t=t)
            layers += 1
    for name in post:
        planner.add(name, [(s, name) for s in last[0].sources], last, t=0.0)

    updates: dict[str, Any] = {}
    if config.slices:
        key = next((k for k in LAYER_COUNT_KEYS if k in donor.config), None)
        if key:
            updates[key] = layers
    if config.out_dtype or config.dtype:
        updates["dtype"] = config.out_dtype or config.dtype
        if "torch_dtype" in donor.config:
            updates["torch_dtype"] = updates["dtype"]
    if vocabulary is not None:
        updates["vocab_size"] = vocabulary.size
    setup = {p.name: resolve(p, [config.parameters], "", 0.0, f"merge_method {method.name!r}") for p in method.setup}
    return MergePlan(
        method=method,
        jobs=planner.jobs,
        donor=donor,
        models=list(files.values()),
        config_updates=updates,
        setup=setup,
        cast=getattr(torch, config.dtype) if config.dtype else None,
        vocabulary=vocabulary,
        base=model(config.base_model) if config.base_model else None,
        chat_template=resolve_chat_template(config.chat_template, referenced) if config.chat_template else None,
    )


def _vocabulary(config: MergeConfig, referenced: list[ModelFiles], model) -> Vocabulary | None:
    """The output vocabulary the config asks for (None: inputs keep their rows). `tokenizer_source: base`
    over models without tokenizer files keeps the older row crop/pad to the base (with a warning)."""
    settings = tokenizer_settings(config)
    if settings is None:
        return None
    source, tokens, pad = settings
    base = model(config.base_model) if config.base_model else None
    source_model = None
    if source not in ("base", "union"):
        source_model = model(source.removeprefix("model:"))
    elif source == "base" and not tokens and not _has_tokenizer(base or referenced[0]):
        return None
    for token, cfg in tokens.items():
        ref = cfg.source if isinstance(cfg.source, str) else getattr(cfg.source, "model", None)
        if ref is not None and model(ref).ref not in {m.ref for m in referenced}:
            raise ConfigError(f"tokenizer.tokens[{token!r}]: source model {ref!r} is not one of the merged models")
    return build_vocabulary(source, referenced, base, tokens, pad, source_model)


def _has_tokenizer(files: ModelFiles) -> bool:
    return any((files.path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def _normalized_slices(config: MergeConfig, model) -> list[tuple[OutputSlice, str | None]]:
    """Every config as (output slice, its base model); `models:` becomes one slice of whole models."""
    if config.slices:
        return [(s, s.base_model or config.base_model) for s in config.slices]
    sources = [InputSlice(model=m.model, layer_range=(0, _num_layers(model(m.model))), parameters=m.parameters) for m in config.models]
    if config.base_model and all(m.model != config.base_model for m in config.models):
        sources.append(InputSlice(model=config.base_model, layer_range=(0, _num_layers(model(config.base_model)))))
    return [(OutputSlice(sources=sources), config.base_model)]


def _num_layers(files: ModelFiles) -> int:
    indices = {int(m["index"]) for name in files.tensors if (m := LAYER_RE.match(name))}
    if not indices:
        raise ConfigError(f"model {files.ref!r}: found no layer tensors (names like 'model.layers.0.…')")
    return max(indices) + 1


def _outside_layers(donor: ModelFiles) -> tuple[list[str], list[str]]:
    outside = [n for n in donor.tensors if not LAYER_RE.match(n)]
    pre = [n for n in outside if any(m in n.lower() for m in PRE_MARKERS)]
    return pre, [n for n in outside if n not in pre]


def _layer_tensors(files: ModelFiles, index: int, ref: str) -> list[tuple[str, str]]:
    found = [(m["prefix"], m["rest"]) for n in files.tensors if (m := LAYER_RE.match(n)) and int(m["index"]) == index]
    if not found:
        raise ConfigError(f"model {ref!r} has no layer {index} (it has {_num_layers(files)} layers)")
    return found


def _is_vocab(inputs: list[Input]) -> bool:
    """Rows are tokens: every input's first dimension is its model's vocab_size and the rest agree."""
    shapes = [i.model.tensors[i.name].shape for i in inputs]
    return all(len(s) >= 1 and s[0] == i.model.config.get("vocab_size", -1) for i, s in zip(inputs, shapes)) and len({s[1:] for s in shapes}) == 1


def _rest(inputs: list[Input]) -> tuple[int, ...]:
    return inputs[0].model.tensors[inputs[0].name].shape[1:]


def _count(lo: int, hi: int | None) -> str:
    return f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else f"at most {hi}"


class _Planner:
    """Resolves parameters and checks shapes for each output tensor."""

    def __init__(self, config: MergeConfig, method: MergeMethod, model, vocabulary: Vocabulary | None = None):
        self.config, self.method, self.model, self.vocabulary = config, method, model, vocabulary
        self.jobs: list[TensorJob] = []

    def check_inputs(self, out_slice: OutputSlice, base: str | None, where: str) -> None:
        refs = [s.model for s in out_slice.sources]
        if self.method.base == "required" and base is None:
            raise ConfigError(f"merge_method {self.method.name!r} needs a base_model ({where})")
        if self.method.base != "ignored" and base is not None and base not in refs:
            raise ConfigError(f"{where}: base_model {base!r} is not among the sources {refs}")
        n, lo, hi = len(refs), self.method.min_inputs, self.method.max_inputs
        if n < lo or (hi is not None and n > hi):
            raise ConfigError(f"{where}: merge_method {self.method.name!r} takes {_count(lo, hi)} models (base included), got {n}: {refs}")
        others = n - (self.method.base != "ignored" and base in refs)
        lo, hi = self.method.min_non_base, self.method.max_non_base
        if others < lo or (hi is not None and others > hi):
            raise ConfigError(f"{where}: merge_method {self.method.name!r} takes {_count(lo, hi)} models besides the base, got {others}: {refs}")

    def add(self, out_name: str, named: list[tuple[InputSlice, str]], slice_and_base, t: float) -> None:
        out_slice, base = slice_and_base
        inputs = []
        for source, name in named:
            files = self.model(source.model)
            if name not in files.tensors:
                holders = [s.model for s, n in named if n in self.model(s.model).tensors]
                raise ConfigError(f"tensor {name!r} is missing from model {source.model!r} (present in {holders})")
            inputs.append(Input(files, name))
        base_index = next((i for i, (s, _) in enumerate(named) if s.model == base), None) if self.method.base != "ignored" else None
        vocab = self.vocabulary is not None and not LAYER_RE.match(out_name) and _is_vocab(inputs)
        shape, align = self._shape(out_name, inputs, named, base, base_index) if not vocab else ((self.vocabulary.size, *_rest(inputs)), False)
        dtypes = [i.model.tensors[i.name].dtype for i in inputs]
        promoted = dtypes[0]
        for d in dtypes[1:]:
            promoted = torch.promote_types(promoted, d)
        out_dtype = self.config.out_dtype or self.config.dtype
        dtype = getattr(torch, out_dtype) if out_dtype and promoted.is_floating_point else promoted
        self.jobs.append(
            TensorJob(
                OutputTensor(out_name, shape, dtype),
                tuple(inputs),
                base_index,
                self._kwargs(out_name, named, out_slice, base_index, t),
                align,
                vocab,
                base if vocab else None,
            )
        )

    def _shape(self, out_name, inputs, named, base, base_index) -> tuple[tuple[int, ...], bool]:
        shapes = [i.model.tensors[i.name].shape for i in inputs]
        if all(s == shapes[0] for s in shapes):
            return shapes[0], False
        listing = ", ".join(f"{s.model!r} {list(shape)}" for (s, _), shape in zip(named, shapes))
        vocab = all(
            len(shape) >= 1 and shape[1:] == shapes[0][1:] and shape[0] == i.model.config.get("vocab_size", -1)
            for i, shape in zip(inputs, shapes)
        )
        if not vocab:
            raise ConfigError(f"tensor {out_name!r}: shapes differ across models: {listing}")
        if self.config.tokenizer_source != "base" or base is None or base not in [s.model for s, _ in named] or self.vocabulary:
            raise ConfigError(
                f"tensor {out_name!r}: vocabulary sizes differ across models: {listing}; set 'tokenizer_source' "
                "(base, union or a model) to rebuild every model's rows on one vocabulary"
            )
        index = base_index if base_index is not None else [s.model for s, _ in named].index(base)
        return shapes[index], True

    def _kwargs(self, out_name, named, out_slice: OutputSlice, base_index, t) -> dict[str, Any]:
        shared_scopes: list[Parameters | None] = [out_slice.parameters, self.config.parameters]
        kwargs: dict[str, Any] = {}
        for p in self.method.params:
            if p.scope == "shared":
                kwargs[p.kwarg] = resolve(p, shared_scopes, out_name, t, f"tensor {out_name!r}")
                continue
            values = []
            for i, (source, name) in enumerate(named):
                if i == base_index:
                    continue
                own = [s.parameters for s, _ in named if s.model == source.model]
                values.append(resolve(p, own + shared_scopes, name, t, f"model {source.model!r}, tensor {name!r}"))
            kwargs[p.kwarg] = values
        return kwargs
