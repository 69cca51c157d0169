"""Merge-coefficient search with Ray Tune (`collab-ray tune-merge`): the only package that imports Ray Tune.

`load_spec` reads a search spec (tune_configs/*.yaml), `merge_config` maps a search point to a
mergekit config (pure), `run_search` runs the search and writes its outputs. Ray is imported only
when a search runs; `experiment` builds the multi-task merge experiment's checkpoints.
"""

from collab_ray.tuning.runner import SearchOutcome, run_search
from collab_ray.tuning.space import merge_config, search_keys
from collab_ray.tuning.spec import TuneSpec, load_spec

__all__ = ["SearchOutcome", "TuneSpec", "load_spec", "merge_config", "run_search", "search_keys"]
