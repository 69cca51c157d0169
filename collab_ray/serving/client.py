"""`PipelineClient`: run pipelines of a deployed collaboration app from inside the cluster (batch jobs).

Calls go to the app's ingress deployment through a `DeploymentHandle`: no HTTP and no API key,
the Serve deployments batch concurrent calls as they do for the HTTP API. Every call has a
timeout; a dead, restarting or overloaded replica and a timeout all come back as
`ModelUnavailable`, the one error worth retrying.
"""

from __future__ import annotations

import asyncio

import ray
from ray import serve
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle

from collab_ray.config import CollabConfig
from collab_ray.core.errors import ConfigError
from collab_ray.core.strategy import Request, StrategyResult
from collab_ray.serving.handle_backend import UNAVAILABLE, ModelUnavailable

__all__ = ["ModelUnavailable", "PipelineClient", "connect", "delete", "deploy"]


class PipelineClient:
    def __init__(self, handle: DeploymentHandle, app_name: str, timeout_s: float):
        self.handle = handle
        self.app_name = app_name
        self.timeout_s = timeout_s

    async def run(self, pipeline: str, request: Request) -> StrategyResult:
        """One request; ModelUnavailable when no replica answered within `timeout_s`."""
        response = self.handle.run_pipeline.remote(pipeline, request)
        try:
            return await asyncio.wait_for(response, self.timeout_s)
        except TimeoutError:  # ours, or the coordinator's server.request_timeout_s
            response.cancel()
            raise ModelUnavailable(f"app {self.app_name!r}: pipeline {pipeline!r} timed out (client timeout {self.timeout_s} s)") from None
        except UNAVAILABLE as e:
            raise ModelUnavailable(f"app {self.app_name!r} unavailable: {type(e).__name__}: {e}") from e


def connect(app_name: str, timeout_s: float) -> PipelineClient:
    """A client of the running Serve application `app_name` (e.g. started by `collab-ray serve`).

    Connects to Ray first when needed: RAY_ADDRESS (set inside a `ray job`) or the local cluster.
    """
    if not ray.is_initialized():
        ray.init(log_to_driver=False)
    try:
        handle = serve.get_app_handle(app_name)
    except RayServeException:
        running = sorted(serve.status().applications)
        raise ConfigError(f"no running Serve application {app_name!r}; running: {', '.join(running) or 'none'}") from None
    return PipelineClient(handle, app_name, timeout_s)


def deploy(config: CollabConfig, app_name: str, timeout_s: float) -> PipelineClient:
    """Run the app of `config` as `app_name` (no HTTP route; an update in place if it runs already)."""
    from collab_ray.serving.app import build_app, init_ray  # the model servers: not needed by `connect`

    init_ray(config, quiet=True)
    serve.start(http_options={"host": config.server.host, "port": config.server.port})  # no-op when Serve runs
    handle = serve.run(build_app(config), name=app_name, route_prefix=None)
    return PipelineClient(handle, app_name, timeout_s)


def delete(app_name: str) -> None:
    serve.delete(app_name)
