"""Search points and merge configs: the keys a spec searches, its Tune search space, and the pure map
from a point to a mergekit-style merge config (a YAML anyone can re-run with `collab-ray merge`).

A point is a flat mapping of keys to values: `PARAM` (global), `PARAM.MODEL` (per model), with a
`.gN` suffix per layer group (`weight.add.g0`, `lambda.g1`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from collab_ray.core.errors import ConfigError
from collab_ray.tuning.spec import SearchParam, TuneSpec


@dataclass(frozen=True)
class Key:
    """One searched value: parameter, model (None: global) and layer group (None: not grouped)."""

    param: str
    model: str | None
    group: int | None

    def __str__(self) -> str:
        parts = [self.param] + ([self.model] if self.model else []) + ([f"g{self.group}"] if self.group is not None else [])
        return ".".join(parts)


def search_keys(spec: TuneSpec) -> list[Key]:
    """Every searched value of the spec, in a stable order."""
    keys = []
    for param, p in spec.search.items():
        models = [m.name for m in spec.models] if p.per_model else [None]
        groups = list(range(p.layer_groups)) if p.layer_groups > 1 else [None]
        keys += [Key(param, model, group) for model in models for group in groups]
    return keys


def merge_config(spec: TuneSpec, point: Mapping[str, Any]) -> dict:
    """The mergekit merge config (a plain dict, YAML-ready) of search point `point`. Pure.

    Searched values override the spec's fixed parameters; grouped values become gradient lists.
    """
    missing = [str(k) for k in search_keys(spec) if str(k) not in point]
    if missing:
        raise ConfigError(f"search point lacks {', '.join(missing)} (has {', '.join(map(str, point))})")
    models = []
    for m in spec.models:
        params = dict(m.parameters or {})
        params.update({name: _value(point, name, m.name, p) for name, p in spec.search.items() if p.per_model})
        models.append({"model": m.model, "parameters": params} if params else {"model": m.model})
    parameters = dict(spec.parameters)
    parameters.update({name: _value(point, name, None, p) for name, p in spec.search.items() if not p.per_model})
    config: dict[str, Any] = {"merge_method": spec.merge_method, "models": models}
    if spec.base_model:
        config["base_model"] = spec.base_model
    if parameters:
        config["parameters"] = parameters
    if spec.dtype:
        config["dtype"] = spec.dtype
    return config


def _value(point: Mapping[str, Any], param: str, model: str | None, p: SearchParam) -> Any:
    """The point's value of one parameter: a scalar, or the gradient list of its layer groups."""
    if p.layer_groups == 1:
        return _plain(point[str(Key(param, model, None))])
    return [_plain(point[str(Key(param, model, g))]) for g in range(p.layer_groups)]


def _plain(value: Any) -> Any:
    """numpy scalars (as Tune samples them) to Python ones, so the config dumps as plain YAML."""
    return value.item() if isinstance(value, np.generic) else value


def grid_values(p: SearchParam, points: int) -> list:
    """The grid of one parameter: its values, or `points` evenly spaced over [low, high] (geometric if log)."""
    if p.values is not None:
        return list(p.values)
    grid = np.geomspace(p.low, p.high, points) if p.log else np.linspace(p.low, p.high, points)
    return [round(float(v), 6) for v in grid]


def planned_trials(spec: TuneSpec) -> int:
    """Trials the search makes when it runs to the end: num_samples, times the grid's size for a grid."""
    if spec.searcher.kind != "grid":
        return spec.samples
    return spec.samples * int(np.prod([len(grid_values(spec.search[k.param], spec.searcher.grid_points)) for k in search_keys(spec)]))


def param_space(spec: TuneSpec) -> dict[str, Any]:
    """The Tune search space: one domain per key (grid_search for the grid searcher)."""
    from ray import tune

    space = {}
    for key in search_keys(spec):
        p = spec.search[key.param]
        if spec.searcher.kind == "grid":
            space[str(key)] = tune.grid_search(grid_values(p, spec.searcher.grid_points))
        elif p.values is not None:
            space[str(key)] = tune.choice(list(p.values))
        else:
            space[str(key)] = (tune.loguniform if p.log else tune.uniform)(p.low, p.high)
    return space
