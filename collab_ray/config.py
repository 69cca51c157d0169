"""The collaboration YAML: models (each a deployment) and pipelines (a strategy over models).

    models:
      draft:  {source: tiny:llama-bpe-small, num_cpus: 0}
      target: {source: smollm2-135m-instruct, num_gpus: 1, autoscaling: {min_replicas: 1, max_replicas: 4}}
    pipelines:
      spec: {strategy: speculative, models: {draft: draft, target: target}, params: {k: 4}}
    server: {port: 8000, api_key_env: COLLAB_API_KEY}

Every model is also a pipeline of strategy `single` under its own name. Errors name the YAML path
and the bad value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from collab_ray import configs
from collab_ray.core.backend import ModelBackend
from collab_ray.core.errors import ConfigError
from collab_ray.core.files import describe_errors, read_yaml, validate
from collab_ray.core.pipeline import Pipeline
from collab_ray.core.strategy import get_strategy
from collab_ray.models.config import ModelConfig


class Autoscaling(BaseModel):
    """Ray Serve autoscaling of one deployment on its ongoing requests.

    The defaults suit LLM replicas, which are slow to start (loading weights) and costly to keep
    idle: scale up after 30 s of load, down after 5 min of quiet, and average the load over 30 s.
    """

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=0, description="Fewest replicas kept running (0 scales to zero when idle).")
    max_replicas: int = Field(1, ge=1, description="Most replicas started under load.")
    initial_replicas: int | None = Field(
        None, ge=0, description="Replicas started at deploy time (default: min_replicas, at least 1)."
    )
    target_ongoing_requests: float = Field(
        8, gt=0, description="Ongoing requests per replica the autoscaler aims for (must not exceed max_ongoing_requests)."
    )
    upscale_delay_s: float = Field(30.0, ge=0, description="Load must stay high this long before adding a replica.")
    downscale_delay_s: float = Field(300.0, ge=0, description="Load must stay low this long before removing a replica.")
    look_back_period_s: float = Field(30.0, gt=0, description="Window over which ongoing requests are averaged.")
    metrics_interval_s: float = Field(10.0, gt=0, description="How often handles and replicas report their load.")

    @model_validator(mode="after")
    def _bounds(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        initial = self.initial_replicas
        if initial is not None and not self.min_replicas <= initial <= self.max_replicas:
            bounds = f"[min_replicas {self.min_replicas}, max_replicas {self.max_replicas}]"
            raise ValueError(f"initial_replicas {initial} outside {bounds}")
        return self

    def serve_options(self) -> dict:
        """The `autoscaling_config` of `serve.deployment`."""
        initial = self.initial_replicas if self.initial_replicas is not None else max(self.min_replicas, 1)
        return {**self.model_dump(), "initial_replicas": initial}


class _Scaled(BaseModel):
    """Replica count, autoscaling and per-replica concurrency of a deployment."""

    model_config = ConfigDict(extra="forbid")

    replicas: int = Field(1, ge=1, description="Fixed number of replicas (ignored when `autoscaling` is set).")
    autoscaling: Autoscaling | None = Field(None, description="Autoscale replicas on ongoing requests.")
    max_ongoing_requests: int = Field(
        256, ge=1, description="Concurrent calls per replica; sized for many decode sessions (each call is short)."
    )

    @model_validator(mode="after")
    def _target_within_limit(self):
        a = self.autoscaling
        if a is not None and a.target_ongoing_requests > self.max_ongoing_requests:
            raise ValueError(
                f"autoscaling.target_ongoing_requests {a.target_ongoing_requests} exceeds max_ongoing_requests "
                f"{self.max_ongoing_requests}: a replica never sees that load, so it would never scale up"
            )
        return self

    @property
    def most_replicas(self) -> int:
        """Replicas this deployment may run at most."""
        return self.autoscaling.max_replicas if self.autoscaling else self.replicas

    def serve_scaling(self) -> dict:
        """`serve.deployment` options: a fixed `num_replicas` or an `autoscaling_config`."""
        if self.autoscaling:
            return {"autoscaling_config": self.autoscaling.serve_options()}
        return {"num_replicas": self.replicas}


class ModelDeployment(ModelConfig, _Scaled):
    """A model and the Ray Serve deployment that hosts it."""

    num_gpus: float = Field(0, ge=0, description="GPUs per replica; with device `cuda` a model spans all of them.")
    num_cpus: float = Field(1, ge=0, description="CPUs reserved per replica (0 lets several share a small machine).")
    accelerator_type: str | None = Field(None, description="Ray accelerator type the replica must run on, e.g. H100.")

    @property
    def session_shards(self) -> int:
        """Routing keys the coordinator spreads this model's sessions over (one per replica when
        there is one replica; four per replica otherwise, so rendezvous hashing spreads them evenly)."""
        most = self.autoscaling.max_replicas if self.autoscaling else self.replicas
        return 1 if most == 1 else 4 * most


class PipelineConfig(BaseModel):
    """A strategy over models: `models` is a list, or a mapping of the strategy's roles to model names."""

    model_config = ConfigDict(extra="forbid")

    strategy: str = Field(description="Registered strategy name (single, speculative, fuse, vote, …).")
    models: list[str] | dict[str, str] = Field(description="Model names, or {role: model name}.")
    params: dict[str, Any] = Field(default_factory=dict, description="The strategy's own parameters.")
    description: str | None = Field(
        None, max_length=500, description="What the pipeline does, in a line for people (the demo prints it under the name)."
    )


class ServerConfig(_Scaled):
    """The coordinator/ingress deployment and its OpenAI-compatible HTTP API.

    `replicas`/`autoscaling` scale the coordinator; it mostly waits on models, so an autoscaling
    target of tens of ongoing requests per replica (e.g. 64) suits it better than a model's.
    """

    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="HTTP host; 0.0.0.0 to serve beyond this machine.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the OpenAI-compatible API.")
    api_key_env: str | None = Field(
        None, description="Environment variable holding the API key; when set, requests need `Authorization: Bearer`."
    )
    call_timeout_s: float = Field(120.0, gt=0, description="Timeout of every call from the coordinator to a model.")
    request_timeout_s: float = Field(600.0, gt=0, description="Timeout of one whole pipeline request.")
    max_tokens_limit: int = Field(4096, ge=1, description="Largest `max_tokens` a request may ask for.")
    num_cpus: float = Field(0, ge=0, description="CPUs reserved per coordinator replica (it mostly waits on models).")
    max_ongoing_requests: int = Field(
        1024, ge=1, description="Concurrent pipeline requests per coordinator replica (each mostly waits on models)."
    )
    max_body_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Largest HTTP request body in bytes; a larger one gets a 413."
    )
    max_prompt_tokens: int = Field(
        32768, ge=1, description="Most prompt tokens (under any model of the pipeline) a request may send; checked before any model work."
    )
    max_choices_per_request: int = Field(
        64, ge=1, description="Most completions one request may ask for: prompts × n."
    )
    max_concurrent_requests_per_key: int = Field(
        256, ge=1, description="Concurrent HTTP API requests per API key (per coordinator replica); more get a 429."
    )
    access_log: bool = Field(True, description="Write one access line per HTTP request (request id, status, latency).")

    def check_max_tokens(self, max_tokens: int) -> None:
        """ValueError when a request asks for more than `max_tokens_limit` new tokens."""
        if max_tokens > self.max_tokens_limit:
            raise ValueError(f"max_tokens {max_tokens} exceeds this server's limit of {self.max_tokens_limit}")


class CollabConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: dict[str, ModelDeployment] = Field(description="Models by name; each becomes a Serve deployment.")
    pipelines: dict[str, PipelineConfig] = Field(default_factory=dict, description="Pipelines by name.")
    server: ServerConfig = Field(default_factory=ServerConfig, description="HTTP API settings.")

    @model_validator(mode="after")
    def _check(self):
        if not self.models:
            raise ValueError("at least one model is needed")
        for name, pipe in self.pipelines.items():
            where = f"pipelines.{name}"
            if name in self.models:
                raise ConfigError(f"{where}: name {name!r} is already a model (each model is a pipeline of its own)")
            try:
                cls = get_strategy(pipe.strategy)
            except ConfigError as e:
                raise ConfigError(f"{where}.strategy: {e}") from None
            cls.check_models(pipe.models, where=f"{where}.models")
            names = pipe.models.values() if isinstance(pipe.models, dict) else pipe.models
            for model in names:
                if model not in self.models:
                    raise ConfigError(f"{where}.models: model {model!r} is not defined under models")
            try:
                cls.Params.model_validate(pipe.params)
            except ValidationError as e:
                raise ConfigError(f"{where}.params: {describe_errors(e)}") from None
        return self

    def all_pipelines(self) -> dict[str, PipelineConfig]:
        """The configured pipelines plus a `single` pipeline per model."""
        singles = {name: PipelineConfig(strategy="single", models=[name], description=f"{m.source} alone")
                   for name, m in self.models.items()}  # fmt: skip
        return {**singles, **self.pipelines}

    def roles(self, pipeline: str) -> dict[str, str]:
        """{role or model name: model name} of a pipeline."""
        models = self.all_pipelines()[pipeline].models
        return dict(models) if isinstance(models, dict) else {m: m for m in models}

    def build_pipeline(self, name: str, backends: dict[str, ModelBackend]) -> Pipeline:
        """Pipeline `name` over `backends` ({model name: backend}, e.g. Serve handles or in-process models)."""
        pipe = self.all_pipelines()[name]
        return Pipeline(pipe.strategy, {role: backends[m] for role, m in self.roles(name).items()}, pipe.params)

    def only(self, pipeline: str) -> CollabConfig:
        """This config cut down to one pipeline and the models it uses (what a batch job deploys)."""
        if pipeline not in self.all_pipelines():
            raise ConfigError(f"pipeline {pipeline!r} not found; available: {', '.join(self.all_pipelines())}")
        used = set(self.roles(pipeline).values())
        models = {name: m for name, m in self.models.items() if name in used}
        pipelines = {pipeline: self.pipelines[pipeline]} if pipeline in self.pipelines else {}
        return self.model_copy(update={"models": models, "pipelines": pipelines})


def parse_config(data: Any, source: str = "config") -> CollabConfig:
    """Validate a config mapping; errors name `source`, the path inside it and the bad value."""
    return validate(CollabConfig, data, source, expected="a mapping with models/pipelines/server")


def load_config(path: str | Path) -> CollabConfig:
    """The config in the YAML file at `path`, or the packaged config of that name (`demo`, `tiny`:
    `collab_ray.configs`); a file a pipeline names in its params (a router, a scorer: fields marked
    `json_schema_extra={"file": True}`) may be named relative to the YAML."""
    path = configs.resolve(path)
    config = parse_config(read_yaml(path, "config"), str(path))
    for pipe in config.pipelines.values():  # files named relative to the YAML (as configs/demo.yaml does)
        for key in file_params(pipe):
            beside = beside_config(path, pipe.params[key])
            if beside.is_file():
                pipe.params[key] = str(beside)
    return config


def file_params(pipe: PipelineConfig) -> list[str]:
    """The keys of a pipeline's params that name files (fields marked `json_schema_extra={"file": True}`)."""
    fields = get_strategy(pipe.strategy).Params.model_fields
    return [
        key for key, value in (pipe.params or {}).items()
        if key in fields and isinstance(fields[key].json_schema_extra, dict) and fields[key].json_schema_extra.get("file") and isinstance(value, str)
    ]  # fmt: skip


def beside_config(config: str | Path, value: str) -> Path:
    """Where a file named `value` in the params of the config at `config` (a path or packaged name) lives:
    `value` itself when absolute, else relative to the YAML (beside the real file when `config` is a link,
    as deploy/demo.yaml is)."""
    if Path(value).is_absolute():
        return Path(value)
    return (configs.resolve(config).resolve().parent / value).resolve()
