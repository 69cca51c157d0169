"""Input weights held in memory, so trials merge without re-reading checkpoints.

The driver reads every input model once (`read_weights`) and puts it into Ray's object store; a
trial's `ray.get` maps the numpy arrays zero-copy from the node's shared memory, and
`SharedModelFiles` serves them to the merge engine as if they were safetensors files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from collab_ray.merge.io import ModelFiles, TensorInfo


@dataclass(frozen=True)
class Weights:
    """One checkpoint in memory: each tensor's raw bytes (uint8 arrays, any dtype), dtype and shape."""

    ref: str  # the model reference merge configs use
    path: str  # its directory on the driver's node
    config: dict  # config.json
    arrays: dict[str, np.ndarray]
    meta: dict[str, tuple[torch.dtype, tuple[int, ...]]]


def read_weights(ref: str) -> Weights:
    """Every tensor of checkpoint `ref` (directory or tiny:NAME), read once."""
    files = ModelFiles(ref)
    arrays, meta = {}, {}
    for name, info in files.tensors.items():
        arrays[name] = files.load(name).contiguous().reshape(-1).view(torch.uint8).numpy()
        meta[name] = (info.dtype, info.shape)
    return Weights(ref, str(files.path), files.config, arrays, meta)


class SharedModelFiles(ModelFiles):
    """`ModelFiles` over in-memory `Weights` (for `merge_to_state_dict(..., open_model=...)`)."""

    def __init__(self, weights: Weights):  # no disk access: everything comes from `weights`
        self.ref, self.path, self.config = weights.ref, Path(weights.path), weights.config
        self.tensors = {name: TensorInfo(self.path, dtype, shape) for name, (dtype, shape) in weights.meta.items()}
        self._weights = weights

    def load(self, name: str) -> torch.Tensor:
        """Tensor `name`, copied out of the (read-only, shared) array: merge kernels write into their inputs."""
        dtype, shape = self._weights.meta[name]
        return torch.from_numpy(self._weights.arrays[name].copy()).view(dtype).reshape(shape)
