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
        backends = {name: ServeBackend(h, name, call_timeout_s=timeout) for name, h in models.items()}
        self.coordinator = Coordinator(self.config, backends)
        env = self.config.server.api_key_env
        self.api_key = os.environ.get(env) if env else None
        if env and not self.api_key:
            raise RuntimeError(f"server.api_key_env names {env!r}, but that environment variable is not set")

    def __serve_build_asgi_app__(self):
        return create_app(self.coordinator, self.api_key)


def model_deployment(name: str, model: ModelDeployment):
    """`serve.deployment` options of one model from its config."""
    actor = {"num_cpus": model.num_cpus, "num_gpus": model.num_gpus}
    if model.accelerator_type:
        actor["accelerator_type"] = model.accelerator_type
    options = dict(
        name=f"model-{name}",
        ray_actor_options=actor,
        max_ongoing_requests=model.max_ongoing_requests,
        request_router_config=RequestRouterConfig(request_router_class=SESSION_ROUTER),
        health_check_period_s=10,
        health_check_timeout_s=60,
    )
    if model.autoscaling:
        a = model.autoscaling
        options["autoscaling_config"] = {
            "min_replicas": a.min_replicas,
            "max_replicas": a.max_replicas,
            "initial_replicas": max(a.min_replicas, 1),
            "target_ongoing_requests": a.target_ongoing_requests,
            "upscale_delay_s": a.upscale_delay_s,
            "downscale_delay_s": a.downscale_delay_s,
        }
    else:
        options["num_replicas"] = model.replicas
    return serve.deployment(ModelServer).options(**options)


def build_app(config: CollabConfig | str | Path | dict):
    """The Serve application of a collaboration config (path, mapping or parsed)."""
    if isinstance(config, (str, Path)):
        config = load_config(config)
    elif isinstance(config, dict):
        config = parse_config(config)
    models = {name: model_deployment(name, m).bind(m.model_dump()) for name, m in config.models.items()}
    ingress = serve.deployment(serve.ingress()(IngressServer)).options(
        name="ingress",
        num_replicas=config.server.replicas,
        ray_actor_options={"num_cpus": config.server.num_cpus},
        max_ongoing_requests=1024,
    )
    return ingress.bind(config.model_dump(), models)


def app_builder(args: dict):
    """Entry point of `serve run` / `serve deploy` configs: `args: {config: path-or-mapping}`."""
    if "config" not in args:
        raise ValueError(f"application args need 'config' (a collaboration YAML path or mapping), got {sorted(args)}")
    return build_app(args["config"])


def start(config: CollabConfig, port: int | None = None, host: str | None = None, quiet: bool = False) -> str:
    """Connect to (or start) Ray, start Serve's HTTP proxy and run the app; returns the base URL.

    `quiet` keeps the replicas' logs out of this process's output.
    """
    import ray

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=not quiet)
        else:  # a local Ray sized in logical CPUs so every replica fits on a small machine
            need = sum(m.num_cpus * (m.autoscaling.max_replicas if m.autoscaling else m.replicas) for m in config.models.values())
            cpus = max(os.cpu_count() or 1, int(need + config.server.num_cpus * config.server.replicas) + 1)
            ray.init(num_cpus=cpus, log_to_driver=not quiet)
    host = host or config.server.host
    port = port or config.server.port
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}/v1"


def stop() -> None:
    """Shut the Serve application and its deployments down."""
    serve.shutdown()


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
