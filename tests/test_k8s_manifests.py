"""The KubeRay manifests in k8s/: valid against the operator's CRDs, consistent with the project.

Schema check: each manifest's `spec` against `openAPIV3Schema.properties.spec` of its CRD (the
copies in ../shared/k8s-schemas), made strict the way `kubectl apply --validate=strict` is: a
field the schema does not declare is an error, not silently dropped. Consistency checks: Ray
version and image tag follow pyproject.toml, entrypoints parse with raymed's own CLI, the clusters
hold what their commands ask for, and the RayService runs serve/raymed.yaml.
"""

from __future__ import annotations

import copy
import functools
import importlib
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from raymed.cli import build_parser
from tests.test_cluster_image import image_ray_version, parse_dockerfile, project

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT.parent / "shared" / "k8s-schemas"
MANIFESTS = {"rayjob-train.yaml": "RayJob", "rayjob-tune.yaml": "RayJob", "rayservice.yaml": "RayService",
             "raycluster.yaml": "RayCluster"}
S3_SECRET = "raymed-s3"
FAST_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 1 MB of YAML each
needs_schemas = pytest.mark.skipif(
    not SCHEMAS.is_dir(), reason=f"no KubeRay CRD schemas at {SCHEMAS} (the shared/k8s-schemas folder "
                                 "next to the repository); the manifests' schema check needs them")


def manifest(name: str) -> dict:
    (doc,) = list(yaml.safe_load_all((ROOT / "k8s" / name).read_text()))
    return doc


def strict(schema):
    """The schema with `additionalProperties: false` wherever an object lists its properties."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) if k in ("items", "additionalProperties", "anyOf", "allOf", "oneOf", "not") else v
           for k, v in schema.items()}
    if "properties" in schema:
        out["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


@functools.cache
def spec_validator(kind: str) -> jsonschema.Draft7Validator:
    """From the CRD file KubeRay names after the kind (ray.io_rayjobs.yaml for RayJob)."""
    crd = yaml.load((SCHEMAS / f"ray.io_{kind.lower()}s.yaml").read_text(), Loader=FAST_LOADER)
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]["properties"]["spec"]))


def schema_errors(spec: dict, kind: str) -> list[str]:
    validator = spec_validator(kind)
    return [f"spec.{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(spec)]


def cluster_spec(doc: dict) -> dict:
    return {"RayJob": lambda s: s["rayClusterSpec"], "RayService": lambda s: s["rayClusterConfig"],
            "RayCluster": lambda s: s}[doc["kind"]](doc["spec"])


def containers(cluster: dict) -> list[dict]:
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def quantity(value) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def capacity(cluster: dict, resource: str, bound: str = "maxReplicas") -> float:
    """What the worker groups offer of `resource` (cpu, nvidia.com/gpu) at `bound` replicas."""
    total = 0.0
    for group in cluster.get("workerGroupSpecs", []):
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        total += group[bound] * quantity(limits.get(resource, 0))
    return total


def entrypoint_args(doc: dict):
    words = shlex.split(doc["spec"]["entrypoint"])
    assert words[0] == "raymed", doc["spec"]["entrypoint"]
    return build_parser().parse_args(words[1:])


@needs_schemas
@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_is_valid_for_the_kuberay_crd(name):
    doc = manifest(name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == MANIFESTS[name]
    assert doc["metadata"]["name"]
    assert schema_errors(doc["spec"], doc["kind"]) == []


@needs_schemas
def test_the_schema_check_rejects_unknown_fields_and_wrong_types():
    doc = manifest("rayjob-train.yaml")
    typo = copy.deepcopy(doc["spec"])
    typo["shutdownAfterJobFinish"] = typo.pop("shutdownAfterJobFinishes")
    assert any("shutdownAfterJobFinish" in e for e in schema_errors(typo, "RayJob"))
    wrong = copy.deepcopy(doc["spec"])
    wrong["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"
    assert any("replicas" in e for e in schema_errors(wrong, "RayJob"))


@pytest.mark.parametrize("name", MANIFESTS)
def test_ray_version_image_and_s3_secret(name):
    cluster = cluster_spec(manifest(name))
    assert cluster["rayVersion"] == image_ray_version()  # the Ray the image runs
    assert cluster["authOptions"] == {"mode": "token"}
    for container in containers(cluster):
        assert container["image"] == f"ghcr.io/OWNER/raymed:{project()['version']}", container["name"]
        assert {"secretRef": {"name": S3_SECRET}} in container["envFrom"], container["name"]
        assert not any(e["name"].startswith("AWS_") and "value" in e for e in container.get("env", []))


def test_dockerfile_puts_the_tune_spaces_where_the_tune_job_reads_them():
    args = entrypoint_args(manifest("rayjob-tune.yaml"))
    workdir = parse_dockerfile(ROOT / "Dockerfile").workdir
    space = Path(args.space)
    assert space.is_relative_to(workdir), f"--space {space} is not in the image's {workdir}"
    assert (ROOT / space.relative_to(workdir)).is_file()


@pytest.mark.parametrize("name", ["rayjob-train.yaml", "rayjob-tune.yaml"])
def test_rayjob_runs_raymed_on_gpu_workers_and_cleans_up(name):
    doc = manifest(name)
    spec, cluster = doc["spec"], cluster_spec(doc)
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    args = entrypoint_args(doc)
    assert args.command == name.removeprefix("rayjob-").removesuffix(".yaml")
    assert args.data.startswith("s3://") and args.storage.startswith("s3://")
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpus, cpus = capacity(cluster, "nvidia.com/gpu"), capacity(cluster, "cpu")
    if args.command == "train":
        assert args.gpus_per_worker > 0 and args.workers * args.gpus_per_worker <= gpus
        assert args.workers * args.cpus_per_worker <= cpus
    else:  # sized for its concurrent trials
        assert args.gpus_per_trial > 0 and args.max_concurrent * args.gpus_per_trial <= gpus
        assert args.max_concurrent * args.workers_per_trial * args.cpus_per_worker <= cpus
        assert cluster["enableInTreeAutoscaling"] is True
    for group in cluster["workerGroupSpecs"]:
        gpu_limit = group["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
        if gpu_limit:
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
                group["template"]["spec"]["tolerations"]


def test_rayservice_serves_the_serve_config_with_room_to_autoscale():
    doc = manifest("rayservice.yaml")
    config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    assert config == yaml.safe_load((ROOT / "serve" / "raymed.yaml").read_text())
    (app,) = config["applications"]
    module, _, builder = app["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), builder))
    cluster = cluster_spec(doc)
    assert cluster["enableInTreeAutoscaling"] is True
    assert all(g["minReplicas"] < g["maxReplicas"] for g in cluster["workerGroupSpecs"])
    need = {bound: sum(d["autoscaling_config"][bound] * d["ray_actor_options"]["num_cpus"]
                       for d in app["deployments"]) for bound in ("min_replicas", "max_replicas")}
    assert need["min_replicas"] <= capacity(cluster, "cpu", "minReplicas")
    assert need["max_replicas"] <= capacity(cluster, "cpu", "maxReplicas")
    assert sum(d["ray_actor_options"].get("num_gpus", 0) for d in app["deployments"]) <= \
        capacity(cluster, "nvidia.com/gpu")


def test_raycluster_autoscales_cpu_and_gpu_groups():
    cluster = cluster_spec(manifest("raycluster.yaml"))
    assert cluster["enableInTreeAutoscaling"] is True
    groups = cluster["workerGroupSpecs"]
    for group in groups:
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        assert group["minReplicas"] < group["maxReplicas"], group["groupName"]
    assert capacity(cluster, "nvidia.com/gpu") > 0 and capacity(cluster, "cpu") > 0
