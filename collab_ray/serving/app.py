"""Builders: a collaboration config -> a Ray Serve application (one deployment per model + the ingress).

    serve run deploy/serve_config.yaml                      # import path collab_ray.serving.app:app_builder
    collab-ray serve deploy/tiny.yaml --port 8000           # the same, started from the CLI
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle

from collab_ray.config import CollabConfig, ModelDeployment, load_config, parse_config
from collab_ray.core.strategy import Request, StrategyResult
from collab_ray.serving.coordinator import Coordinator
from collab_ray.serving.handle_backend import ServeBackend
from collab_ray.serving.model_server import ModelServer
from collab_ray.serving.openai_api import create_app

APP_NAME = "collab"
# a session's calls go to one replica (its KV cache is there); see handle_backend for replay
SESSION_ROUTER = "collab_ray.serving.router:SessionAffinityRouter"


class IngressServer:
    """The coordinator replica: builds backends over the model handles and serves the OpenAI API."""

    def __init__(self, config: dict, models: dict[str, DeploymentHandle]):
        self.config = CollabConfig.model_validate(config)
        timeout = self.config.server.call_timeout_s
        backends = {
            name: ServeBackend(h, name, call_timeout_s=timeout, shards=self.config.models[name].session_shards)
            for name, h in models.items()
        }
        self.coordinator = Coordinator(self.config, backends)
        env = self.config.server.api_key_env
        self.api_key = os.environ.get(env) if env else None
        if env and not self.api_key:
            raise RuntimeError(f"server.api_key_env names {env!r}, but that environment variable is not set")

    def __serve_build_asgi_app__(self):
        return create_app(self.coordinator, self.api_key)

    async def run_pipeline(self, pipeline: str, request: Request) -> StrategyResult:
        """One request of pipeline `pipeline`, through a deployment handle (batch jobs: serving/client.py)."""
        self.config.server.check_max_tokens(request.params.max_tokens)
        (result,) = await self.coordinator.run(pipeline, request)
        return result


def model_deployment(name: str, model: ModelDeployment):
    """`serve.deployment` options of one model from its config."""
    actor = {"num_cpus": model.num_cpus, "num_gpus": model.num_gpus}
    if model.accelerator_type:
        actor["accelerator_type"] = model.accelerator_type
    return serve.deployment(ModelServer).options(
        name=f"model-{name}",
        ray_actor_options=actor,
        max_ongoing_requests=model.max_ongoing_requests,
        request_router_config=RequestRouterConfig(request_router_class=SESSION_ROUTER),
        logging_config={"enable_access_log": False},  # one line per model call drowns the ingress's access log
        health_check_period_s=10,
        health_check_timeout_s=60,
        **model.serve_scaling(),
    )


def build_app(config: CollabConfig | str | Path | dict):
    """The Serve application of a collaboration config (path, mapping or parsed)."""
    if isinstance(config, (str, Path)):
        config = load_config(config)
    elif isinstance(config, dict):
        config = parse_config(config)
    models = {name: model_deployment(name, m).bind(m.model_dump(), name) for name, m in config.models.items()}
    ingress = serve.deployment(serve.ingress()(IngressServer)).options(
        name="ingress",
        ray_actor_options={"num_cpus": config.server.num_cpus},
        max_ongoing_requests=config.server.max_ongoing_requests,
        **config.server.serve_scaling(),
    )
    return ingress.bind(config.model_dump(), models)


def app_builder(args: dict):
    """Entry point of `serve run` / `serve deploy` configs: `args: {config: path-or-mapping}`."""
    if "config" not in args:
        raise ValueError(f"application args need 'config' (a collaboration YAML path or mapping), got {sorted(args)}")
    return build_app(args["config"])


def init_ray(config: CollabConfig, quiet: bool = False) -> None:
    """Connect to the Ray cluster (RAY_ADDRESS, or the one a `ray job` runs in), or start a local one.

    A local Ray is sized in logical CPUs so every replica of `config` fits on a small machine;
    `quiet` keeps the replicas' logs out of this process's output.
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=not quiet)
    else:
        deployments = [*config.models.values(), config.server]
        need = sum(d.num_cpus * d.most_replicas for d in deployments)
        cpus = max(os.cpu_count() or 1, int(need) + 1)
        ray.init(num_cpus=cpus, log_to_driver=not quiet)


def start(config: CollabConfig, port: int | None = None, host: str | None = None, quiet: bool = False) -> str:
    """Connect to (or start) Ray, start Serve's HTTP proxy and run the app; returns the base URL."""
    init_ray(config, quiet)
    host = host or config.server.host
    port = port or config.server.port
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}/v1"


def stop(shutdown_ray: bool = False) -> None:
    """Shut the Serve application and its deployments down (and this process's Ray, if asked);
    nothing when Ray is not running (serve.shutdown() would start one just to stop it)."""
    import ray

    if ray.is_initialized():
        serve.shutdown()
        if shutdown_ray:
            ray.shutdown()


def healthy_deployments() -> list[str]:
    """Deployments of the app that are healthy now (none while Serve's controller is starting)."""
    try:
        app = serve.status().applications.get(APP_NAME)
    except Exception:  # the controller is still starting
        return []
    return [name for name, dep in (app.deployments.items() if app else ()) if str(dep.status).endswith("HEALTHY")]


def serve_forever(config_path: str, port: int | None = None, host: str | None = None) -> None:
    config = load_config(config_path)
    url = start(config, port, host)
    pipelines = ", ".join(config.all_pipelines())
    print(f"collab_ray serving {pipelines} at {url} (Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        stop()
