"""Merging: one model from many in parameter space, configured with mergekit's YAML schema.

`merge(config, out_dir)` streams a merge to sharded safetensors (or, with `extract_lora=RANK`, its
difference to the base as a LoRA adapter); `merge_to_state_dict(config)` returns it in memory;
`METHODS` is the registry of per-tensor methods (every method of mergekit 0.1.5, plus Fisher).
Configs may be multi-stage (`stages`), rebuild vocabularies (`vocab`), and name models by
directory, Hub id or `model+lora` (`sources`). `uniform_soup` and `greedy_soup` make model soups.
Imports neither Ray nor (until a merge needs it) transformers.
"""

from collab_ray.merge.config import MergeConfig, load_config
from collab_ray.merge.engine import merge, merge_to_state_dict
from collab_ray.merge.methods import METHODS, MergeMethod, get_method
from collab_ray.merge.soup import greedy_soup, perplexity_scorer, uniform_soup

__all__ = [
    "METHODS",
    "MergeConfig",
    "MergeMethod",
    "get_method",
    "greedy_soup",
    "load_config",
    "merge",
    "merge_to_state_dict",
    "perplexity_scorer",
    "uniform_soup",
]
