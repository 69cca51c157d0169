"""Starts Ray and the tiny collaboration app once per test session, and hands out backends over it."""

from __future__ import annotations

from pathlib import Path

import yaml

from collab_ray.config import ModelDeployment, parse_config
from ray_cluster import free_port

ROOT = Path(__file__).resolve().parents[1]
API_KEY_ENV = "COLLAB_TEST_API_KEY"
API_KEY = "test-key-123"


class ServeHarness:
    def __init__(self, config, url: str):
        self.config = config
        self.url = url  # http://127.0.0.1:PORT/v1
        self._backends: dict = {}

    @classmethod
    def start(cls, ray_address: str) -> "ServeHarness":
        import ray

        from collab_ray.serving.app import start

        data = yaml.safe_load((ROOT / "deploy" / "tiny.yaml").read_text())
        data["server"] = {**data.get("server", {}), "api_key_env": API_KEY_ENV, "call_timeout_s": 60}
        config = parse_config(data, "deploy/tiny.yaml")
        # the cluster was started before the key was set: hand it to this job's replicas
        ray.init(address=ray_address, log_to_driver=False, runtime_env={"env_vars": {API_KEY_ENV: API_KEY}})
        url = start(config, port=free_port(), host="127.0.0.1", quiet=True)
        return cls(config, url)

    def handle(self, model: str):
        from ray import serve

        return serve.get_deployment_handle(f"model-{model}", app_name="collab")

    def backend(self, source: str):
        """A ServeBackend for `source`: a model of the tiny app, or a deployment started for it."""
        from ray import serve

        from collab_ray.serving.app import model_deployment
        from collab_ray.serving.handle_backend import ServeBackend

        if source not in self._backends:
            names = [n for n, m in self.config.models.items() if m.source == source and m.replicas == 1]
            if names:
                handle = self.handle(names[0])
            else:
                name = "extra-" + "".join(c if c.isalnum() else "-" for c in source)
                model = ModelDeployment(source=source, num_cpus=0)
                handle = serve.run(model_deployment(name, model).bind(model.model_dump()), name=name, route_prefix=None)
            self._backends[source] = ServeBackend(handle, source, call_timeout_s=60)
        return self._backends[source]

    def stop(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()  # the cluster itself is the `ray_cluster` fixture's
