"""The local cache of built artifacts (tiny checkpoints, dequantized GGUF models)."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def cache_root() -> Path:
    """$COLLAB_RAY_CACHE, or ~/.cache/collab_ray."""
    return Path(os.environ.get("COLLAB_RAY_CACHE", Path.home() / ".cache" / "collab_ray"))


@contextmanager
def building(out_dir: Path) -> Iterator[Path]:
    """Yield a temp dir beside `out_dir`, renamed to it on success, so `out_dir` is complete or absent.

    When another process finished the same build first, its result is kept.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        yield tmp
        try:
            tmp.rename(out_dir)
        except OSError:
            if not (out_dir / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
