"""The cluster files: cluster.yaml passes Ray's launcher validation, the Serve configs pass Serve's
schema, and the KubeRay manifests carry the fields of the v1 CRDs and a valid collaboration config."""

import copy
import shlex
from pathlib import Path

import pytest
import ray
import yaml

from collab_ray.cli import build_parser
from collab_ray.config import load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "deploy" / "kuberay"


def load(path: Path) -> list[dict]:
    return list(yaml.safe_load_all(path.read_text()))


def test_cluster_yaml_passes_ray_validation():
    from jsonschema import ValidationError
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = [t for name, t in config["available_node_types"].items() if t["resources"].get("GPU")]
    assert gpu_types and all(t["max_workers"] > t["min_workers"] for t in gpu_types)
    for t in gpu_types:
        accel = {k: v for k, v in t["resources"].items() if k.startswith("accelerator_type:")}
        assert list(accel.values()) == [t["resources"]["GPU"]], t
    assert any("pip install" in c and "collab_ray" in c for c in config["setup_commands"])
    assert config["docker"]["worker_image"].startswith(f"rayproject/ray:{ray.__version__}-py311")
    raw["available_node_types"]["head"]["node_confg"] = {}  # a typo is refused
    with pytest.raises(ValidationError, match="node_confg"):
        validate_config(prepare_config(raw))


def serve_app_config(serve_config: dict) -> dict:
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(serve_config)
    (app,) = schema.applications
    assert app.import_path == "collab_ray.serving.app:app_builder" and "config" in app.args
    return app.args["config"]


def test_serve_config_yaml_passes_serve_schema_and_names_a_valid_config():
    (config,) = load(ROOT / "deploy" / "serve_config.yaml")
    path = serve_app_config(config)
    assert load_config(ROOT / path).models


def test_rayservice_runs_a_collaboration_config():
    (service,) = load(KUBERAY / "rayservice.yaml")
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    spec = service["spec"]
    config = parse_config(serve_app_config(yaml.safe_load(spec["serveConfigV2"])), "serveConfigV2")
    assert "speculative" in config.pipelines
    assert all(m.num_gpus > 0 and m.device == "cuda" and m.autoscaling for m in config.models.values())
    assert config.server.autoscaling and config.server.autoscaling.max_replicas > 1
    check_cluster_spec(spec["rayClusterConfig"])


def test_rayjob_runs_collab_ray_run_on_its_own_cluster():
    job, config_map = load(KUBERAY / "rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["collab-ray", "run"]
    args = build_parser().parse_args(argv[1:])
    assert Path(args.input).is_absolute() and Path(args.output).is_absolute()
    # the config file is the ConfigMap, mounted on the head where the driver runs
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in head["volumes"]}
    config_volume = next(name for name, v in volumes.items() if v.get("configMap", {}).get("name") == config_map["metadata"]["name"])
    key = Path(args.config).relative_to(mounts[config_volume]).as_posix()
    config = parse_config(yaml.safe_load(config_map["data"][key]), key)
    assert args.pipeline in config.all_pipelines()
    check_cluster_spec(spec["rayClusterSpec"])


def check_cluster_spec(cluster: dict) -> None:
    """A RayCluster spec: head and GPU worker groups with the fields KubeRay v1 requires."""
    assert cluster["rayVersion"] == ray.__version__
    head = cluster["headGroupSpec"]
    assert "rayStartParams" in head and head["template"]["spec"]["containers"][0]["image"]
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and "rayStartParams" in group
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        (container,) = group["template"]["spec"]["containers"]
        assert container["image"] and container["resources"]["limits"]["nvidia.com/gpu"] >= 1
        assert "accelerator_type:" in group["rayStartParams"]["resources"]
