"""The merge-search YAML (`tune_configs/*.yaml`) as pydantic models; errors name the YAML path and value.

    name: multitask
    merge_method: task_arithmetic
    base_model: multitask:base
    models:
      - {name: add, model: multitask:add}
      - {name: reverse, model: multitask:reverse}
    parameters: {normalize: false}                  # fixed merge parameters
    search:
      weight: {low: 0.2, high: 1.2, per_model: true, layer_groups: 2}
      lambda: {low: 0.5, high: 1.0}
    searcher: {kind: random, seed: 0}               # random | grid | optuna
    scheduler: {kind: asha, reduction_factor: 2}    # asha | fifo
    eval_items: [16, 32, 64]                        # growing evaluation subsets (ASHA rungs)
    objective:
      - {name: add, data: task:add, metric: accuracy, max_new_tokens: 6}
      - {name: text, data: val.txt, metric: neg_perplexity, weight: 0.1}
    num_samples: 32
    max_concurrent_trials: 2
    resources: {cpu: 1, gpu: 0}

Model references are whatever `collab-ray merge` reads (directories, `tiny:NAME`, Hub ids,
`model+lora`), or names registered in `collab_ray.tuning.references` (the multi-task experiment's
`multitask:NAME`, built on first use); `references.resolve_models` turns those into directories.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from collab_ray.core.files import read_yaml, validate
from collab_ray.merge.methods import get_method

Scalar = Union[bool, int, float, str]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputModel(_Strict):
    """One model merged into the base (or averaged, for methods without a base)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$", description="Short name: used in search keys (weight.NAME), tables and plots.")
    model: str = Field(description="A merge model reference (directory, tiny:NAME, Hub id, model+lora) or a registered one (multitask:NAME).")
    parameters: dict[str, Any] | None = Field(None, description="Fixed merge parameters of this model (mergekit syntax).")


class SearchParam(_Strict):
    """The range of one searched merge parameter."""

    low: float | None = Field(None, description="Lower end of a numeric range.")
    high: float | None = Field(None, description="Upper end of a numeric range.")
    log: bool = Field(False, description="Sample the range on a log scale (needs low > 0).")
    values: list[Scalar] | None = Field(None, description="Explicit choices instead of a range (e.g. [true, false]).")
    per_model: bool = Field(False, description="One value per input model (parameters such as weight or density).")
    layer_groups: int = Field(
        1, ge=1, le=16, description="Values across depth: G > 1 searches G values written as a mergekit gradient list "
        "(value g at relative depth g/(G-1), interpolated between; tensors outside the layers take the first)."
    )

    @model_validator(mode="after")
    def _range_or_values(self) -> SearchParam:
        if (self.values is None) == (self.low is None or self.high is None):
            raise ValueError("give either low and high, or values")
        if self.values is not None and not self.values:
            raise ValueError("values is empty")
        if self.low is not None and self.high is not None and self.low >= self.high:
            raise ValueError(f"low {self.low} must be below high {self.high}")
        if self.log and (self.low is None or self.low <= 0):
            raise ValueError("log: true needs low > 0")
        return self


class Searcher(_Strict):
    """How search points are chosen."""

    kind: Literal["random", "grid", "optuna"] = Field(
        "random", description="random sampling, grid (every combination, num_samples times), or optuna (TPE; pip install optuna)."
    )
    seed: int = Field(0, description="Seed of the random / optuna searcher.")
    grid_points: int = Field(3, ge=2, description="grid: points per numeric range (evenly spaced, ends included).")


class Scheduler(_Strict):
    """Early stopping of poor trials on the growing evaluation subsets."""

    kind: Literal["asha", "fifo"] = Field("asha", description="asha (stop poor trials at each subset) or fifo (run all to the end).")
    reduction_factor: float = Field(2, gt=1, description="ASHA: keep the top 1/reduction_factor at each rung.")
    grace_period: int = Field(1, ge=1, description="ASHA: subsets every trial evaluates before it can be stopped.")


class Validation(_Strict):
    """One validation set of the objective."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$", description="Name in reports (metric columns are METRIC/NAME).")
    data: str = Field(
        description="accuracy: task:NAME (built-in experiment), an eval dataset name or a short-answer JSONL file; "
        "neg_perplexity: a text file."
    )
    metric: Literal["accuracy", "neg_perplexity"] = Field(
        "accuracy", description="accuracy: exact match of greedy generations; neg_perplexity: −perplexity of the text."
    )
    weight: float = Field(1.0, description="Weight of this set in the objective (Σ weight · metric).")
    max_new_tokens: int = Field(16, ge=1, description="accuracy: tokens generated per item (generation stops at a newline).")
    seq_len: int = Field(128, ge=2, description="neg_perplexity: tokens per evaluated chunk (an 'item' is one chunk).")


class Resources(_Strict):
    """Resources Ray reserves for each trial."""

    cpu: float = Field(1, gt=0, description="CPUs per trial; torch uses this many threads (at least 1).")
    gpu: float = Field(0, ge=0, description="GPUs per trial; with gpu > 0 the merge and evaluation run on CUDA.")


class TuneSpec(_Strict):
    """A merge-coefficient search: what is merged, what is searched, how trials are scheduled and scored."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Experiment name (Tune's run name).")
    merge_method: str = Field(description="A merge method of collab_ray.merge (linear, task_arithmetic, ties, dare_ties, slerp, …).")
    base_model: str | None = Field(None, description="Base model (task vectors are taken against it; config/tokenizer donor).")
    models: list[InputModel] = Field(min_length=1, description="The models merged (besides the base).")
    parameters: dict[str, Any] = Field(default_factory=dict, description="Fixed global merge parameters (mergekit syntax).")
    dtype: str | None = Field(None, description="Merge dtype (mergekit `dtype`), e.g. float32.")
    search: dict[str, SearchParam] = Field(min_length=1, description="Searched merge parameters by name, with their ranges.")
    searcher: Searcher = Field(default_factory=Searcher, description="How points are chosen.")
    scheduler: Scheduler = Field(default_factory=Scheduler, description="Early stopping over the evaluation subsets.")
    eval_items: list[int] = Field(
        [64], min_length=1, description="Growing numbers of items per validation set; a trial reports after each "
        "(ASHA's rungs); the last is the full evaluation."
    )
    objective: list[Validation] = Field(min_length=1, description="Validation sets; objective = Σ weight · metric, maximized.")
    num_samples: int | None = Field(None, ge=1, description="Trials (default 16); grid: repetitions of the whole grid (default 1).")
    max_concurrent_trials: int = Field(2, ge=1, description="Trials running at once.")
    resources: Resources = Field(default_factory=Resources, description="Resources per trial.")
    max_failures: int = Field(0, ge=0, description="Retries of a failing trial; after them it is recorded as failed.")
    inputs: Literal["object_store", "disk"] = Field(
        "object_store", description="object_store: input weights are put once into Ray's object store and read zero-copy "
        "by every trial; disk: each trial re-reads the checkpoints (for comparison)."
    )

    @property
    def samples(self) -> int:
        """num_samples, or its default: one pass over a grid, 16 random or optuna points."""
        return self.num_samples or (1 if self.searcher.kind == "grid" else 16)

    @field_validator("eval_items")
    @classmethod
    def _growing(cls, v: list[int]) -> list[int]:
        if v[0] < 1 or any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError(f"eval_items must be positive and strictly increasing, got {v}")
        return v

    @model_validator(mode="after")
    def _check(self) -> TuneSpec:
        method = get_method(self.merge_method)
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"models: names must be unique, got {names}")
        for name, p in self.search.items():
            param = method.param(name)
            if param is None:
                known = ", ".join(q.name for q in method.params)
                raise ValueError(f"search.{name}: not a parameter of merge_method {self.merge_method!r} (known: {known})")
            if p.per_model and param.scope == "shared":
                raise ValueError(f"search.{name}: per_model needs a per-model parameter; {name!r} is global")
            if name in self.parameters:
                raise ValueError(f"search.{name}: also fixed in parameters; remove one")
        if len({v.name for v in self.objective}) != len(self.objective):
            raise ValueError("objective: validation set names must be unique")
        return self


def load_spec(source: str | Path | dict) -> TuneSpec:
    """A TuneSpec from a YAML file or a mapping; errors name the file, the YAML path and the bad value."""
    if isinstance(source, dict):
        return validate(TuneSpec, source, "tune spec")
    path = Path(source)
    return validate(TuneSpec, read_yaml(path, "tune spec"), str(path))

