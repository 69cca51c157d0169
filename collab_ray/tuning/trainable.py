"""The Tune trainable: merge a search point in memory, then score it on growing evaluation subsets.

An actor builds the model skeleton once (`setup`) and keeps it between trials (`reuse_actors`:
`reset_config` only swaps the point). The first step merges the point from the input weights the
actor mapped from the object store and loads the result into the skeleton; step k scores the
items of rung k and reports the running objective (ASHA compares trials on it).
"""

from __future__ import annotations

import time

import ray
import torch
from ray import tune

from collab_ray.merge.engine import merge_to_state_dict
from collab_ray.merge.io import ModelFiles
from collab_ray.tuning.evaluate import Tally, ValidationData, load_merged, score_rung, skeleton
from collab_ray.tuning.shared import SharedModelFiles
from collab_ray.tuning.space import merge_config
from collab_ray.tuning.spec import TuneSpec


class MergeTrial(tune.Trainable):
    """One search point per trial: merge once, then report after each evaluation subset."""

    def setup(self, config, *, spec: TuneSpec, inputs: dict, tokenizer, sets: list[ValidationData], model_config: dict):
        torch.set_num_threads(max(1, int(spec.resources.cpu)))
        self.spec, self.tokenizer, self.sets = spec, tokenizer, sets
        self.files = {w.ref: SharedModelFiles(w) for w in ray.get(list(inputs.values()))}  # zero-copy arrays
        self.device = "cuda" if spec.resources.gpu > 0 else "cpu"
        self.model = skeleton(model_config, self.device)
        self.reset_config(config)

    def reset_config(self, new_config) -> bool:
        self.point, self.tally, self.merge_s, self.eval_s = dict(new_config), Tally(), 0.0, 0.0
        return True

    def step(self) -> dict:
        if self.iteration == 0:
            start = time.perf_counter()
            open_model = self.files.__getitem__ if self.files else ModelFiles  # no files: re-read from disk
            config = merge_config(self.spec, self.point)
            load_merged(self.model, merge_to_state_dict(config, device=self.device, open_model=open_model))
            self.merge_s = time.perf_counter() - start
        start = time.perf_counter()
        metrics = score_rung(self.model, self.tokenizer, self.sets, self.spec, self.iteration, self.tally)
        self.eval_s += time.perf_counter() - start
        last = self.iteration + 1 == len(self.spec.eval_items)
        timings = {"merge_s": self.merge_s, "eval_s": self.eval_s, "finished_at": time.time()}
        return {**metrics, "items": self.spec.eval_items[self.iteration], **timings, "done": last}
