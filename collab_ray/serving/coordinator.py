"""`Coordinator`: runs any configured pipeline over model backends (a plain class, no Ray).

In the Serve app its backends are `ServeBackend`s over deployment handles; in tests and batch
jobs they can be in-process backends. Calls to different models inside a strategy go out
concurrently; `n` completions of one request run concurrently too.
"""

from __future__ import annotations

import asyncio

from collab_ray.config import CollabConfig
from collab_ray.core.backend import ModelBackend
from collab_ray.core.errors import CollabError
from collab_ray.core.pipeline import Pipeline
from collab_ray.core.strategy import Emit, Request, StrategyResult


class PipelineNotFound(CollabError, LookupError):
    def __init__(self, name: str, available: list[str]):
        super().__init__(f"pipeline {name!r} not found; available: {', '.join(available)}")
        self.name = name


class Coordinator:
    def __init__(self, config: CollabConfig, backends: dict[str, ModelBackend]):
        self.config = config
        self.backends = backends
        self.pipelines = {name: config.build_pipeline(name, backends) for name in config.all_pipelines()}

    def pipeline(self, name: str) -> Pipeline:
        if name not in self.pipelines:
            raise PipelineNotFound(name, sorted(self.pipelines))
        return self.pipelines[name]

    async def run(
        self, name: str, request: Request, n: int = 1, emit: list[Emit] | None = None
    ) -> list[StrategyResult]:
        """`n` results of pipeline `name`; a seeded request gives completion i the seed + i."""
        pipeline = self.pipeline(name)
        requests = [request]
        if n > 1:
            seeds = [None if request.params.seed is None else request.params.seed + i for i in range(n)]
            requests = [Request(request.prompt, request.messages, request.params.model_copy(update={"seed": s})) for s in seeds]
        emits = emit or [None] * n
        runs = (pipeline.run(r, e) for r, e in zip(requests, emits))
        return list(await asyncio.wait_for(asyncio.gather(*runs), self.config.server.request_timeout_s))
