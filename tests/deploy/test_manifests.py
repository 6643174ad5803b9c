"""deploy/kuberay/ checked offline, as `kubectl apply` and the pods would see it.

Built-in kinds are validated with kubernetes-validate against Kubernetes' strict schemas
(unknown fields fail) at K8S_VERSION, the oldest version we claim. RayCluster is validated
against tests/deploy/raycluster.schema.json, our subset of KubeRay's CRD, whose pod
templates refer to the same strict Kubernetes definitions. Beyond the schemas: the
ConfigMap's config loads and says what deploy/cluster.yaml says, the head runs `tandem
serve` with flags that exist, probes ask paths the router serves, every container asks
for resources, and the worker groups, Services and Redis agree with the config.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.resources
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from referencing import Registry, Resource

from cluster.config import TandemConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = sorted((ROOT / "deploy" / "kuberay").glob("*.yaml"))
RAYCLUSTER_SCHEMA = Path(__file__).with_name("raycluster.schema.json")
K8S_VERSION = "1.30.0"


def _objects() -> list[dict[str, Any]]:
    return [obj for path in MANIFESTS for obj in yaml.safe_load_all(path.read_text()) if obj]


def _one(kind: str, name: str) -> dict[str, Any]:
    (obj,) = [o for o in _objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


@functools.cache
def _raycluster_validator() -> jsonschema.Draft202012Validator:
    definitions = (
        importlib.resources.files("kubernetes_validate")
        / "kubernetes-json-schema"
        / f"v{K8S_VERSION}-local-strict"
        / "_definitions.json"
    )
    defs = json.loads(definitions.read_text())
    registry: Registry = Registry().with_resource(defs["$id"], Resource.from_contents(defs))
    schema = json.loads(RAYCLUSTER_SCHEMA.read_text())
    return jsonschema.Draft202012Validator(schema, registry=registry)


def validate(obj: dict[str, Any]) -> None:
    """Raises jsonschema.ValidationError if `obj` is not a valid object of its kind."""
    if obj.get("apiVersion", "").startswith("ray.io/"):
        assert obj["kind"] == "RayCluster", f"no schema for {obj['kind']}: add one"
        _raycluster_validator().validate(obj)
    else:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize("obj", _objects(), ids=lambda o: f"{o['kind']}/{o['metadata']['name']}")
def test_every_object_validates_against_its_schema(obj: dict[str, Any]) -> None:
    validate(obj)


def _misspell(obj: dict[str, Any], path: str) -> dict[str, Any]:
    """A copy of obj with the key at the end of `path` (dots; list indices) misspelt."""
    broken = copy.deepcopy(obj)
    *parents, key = path.split(".")
    node: Any = broken
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    node[key + "x"] = node.pop(key)
    return broken


@pytest.mark.parametrize(
    ("kind", "name", "path"),
    [
        ("Deployment", "tandem-redis", "spec.template.spec.containers.0.resources"),
        ("Service", "tandem-router", "spec.ports.0.targetPort"),
        ("RayCluster", "tandem", "spec.workerGroupSpecs.0.replicas"),
        ("RayCluster", "tandem", "spec.gcsFaultToleranceOptions.redisAddress"),
        # Inside the pod template: Kubernetes' own definitions, through the schema's $ref.
        ("RayCluster", "tandem", "spec.headGroupSpec.template.spec.containers.0.readinessProbe"),
    ],
)
def test_a_misspelt_field_fails_validation(kind: str, name: str, path: str) -> None:
    key = path.rsplit(".", 1)[1]
    with pytest.raises(jsonschema.ValidationError, match=f"'{key}(x' was unexpected|' is a req)"):
        validate(_misspell(_one(kind, name), path))


def test_ray_start_params_must_be_strings() -> None:
    cluster = copy.deepcopy(_one("RayCluster", "tandem"))
    cluster["spec"]["workerGroupSpecs"][0]["rayStartParams"]["num-cpus"] = 4
    with pytest.raises(jsonschema.ValidationError, match="not of type 'string'"):
        validate(cluster)


def _embedded_config(tmp_path: Path, text: str | None = None) -> TandemConfig:
    path = tmp_path / "cluster.yaml"
    path.write_text(text or _one("ConfigMap", "tandem-config")["data"]["cluster.yaml"])
    return load_config(path)


def test_the_configmap_carries_deploy_cluster_yaml(tmp_path: Path) -> None:
    assert _embedded_config(tmp_path) == load_config(ROOT / "deploy" / "cluster.yaml")
    broken = _one("ConfigMap", "tandem-config")["data"]["cluster.yaml"].replace(
        "instances: 2", "instances: -2"
    )
    with pytest.raises(ValueError, match=r"pools\.decode\.instances"):
        _embedded_config(tmp_path, broken)


def _head() -> dict[str, Any]:
    return _one("RayCluster", "tandem")["spec"]["headGroupSpec"]["template"]


def _serve_argv(script: str) -> list[str]:
    """The words after `tandem serve` in a shell script."""
    match = re.search(r"\btandem serve\b([^;&|\n]*)", script)
    assert match, f"no `tandem serve` in {script!r}"
    return shlex.split(match.group(1))


def _unknown_serve_flags(argv: list[str]) -> list[str]:
    """The flags in argv that `tandem serve` does not define, exactly (argparse would take
    an abbreviation); the values must parse too."""
    from tandem.cli import _parser

    parser = _parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    known = set(commands.choices["serve"]._option_string_actions)
    flags = [word.split("=")[0] for word in argv if word.startswith("-")]
    parser.parse_known_args(["serve", *argv])  # exits on a bad value
    return [flag for flag in flags if flag not in known]


def test_the_head_runs_tandem_serve_with_flags_that_exist_and_the_mounted_config() -> None:
    container = _head()["spec"]["containers"][0]
    argv = _serve_argv(" ".join(container["command"] + container["args"]))
    assert _unknown_serve_flags(argv) == []
    assert _unknown_serve_flags([*argv, "--ray-adress", "auto"]) == ["--ray-adress"]
    assert _unknown_serve_flags([*argv, "--http-p", "80"]) == ["--http-p"]  # no abbreviations
    config_path = Path(argv[argv.index("--config") + 1])
    (mount,) = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == config_path.parent]
    (volume,) = [v for v in _head()["spec"]["volumes"] if v["name"] == mount["name"]]
    config_map = _one("ConfigMap", volume["configMap"]["name"])
    assert config_path.name in config_map["data"]


def _port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return number


def test_the_head_probes_ask_paths_the_router_serves_on_its_http_port(tmp_path: Path) -> None:
    from router.http import routes
    from router.http_guard import PROBES

    served = {route.path for route in routes.routes}  # type: ignore[attr-defined]
    container = _head()["spec"]["containers"][0]
    config = _embedded_config(tmp_path)
    probes = [container[k] for k in ("startupProbe", "livenessProbe", "readinessProbe")]
    for probe in probes:
        assert probe["httpGet"]["path"] in PROBES & served  # served without an API key
        assert _port(container, probe["httpGet"]["port"]) == config.router.http_port
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"


def _containers() -> Iterator[tuple[str, dict[str, Any]]]:
    for obj in _objects():
        spec = obj.get("spec", {})
        templates = [spec.get("template")]
        if obj["kind"] == "RayCluster":
            templates = [spec["headGroupSpec"]["template"]]
            templates += [group["template"] for group in spec["workerGroupSpecs"]]
        for template in filter(None, templates):
            for container in template["spec"]["containers"]:
                yield f"{obj['metadata']['name']}/{container['name']}", container


def test_every_container_asks_for_resources_and_has_probes() -> None:
    names = []
    for name, container in _containers():
        names.append(name)
        resources = container.get("resources", {})
        assert {"cpu", "memory"} <= set(resources.get("requests", {})), name
        assert "memory" in resources.get("limits", {}), name
        assert "livenessProbe" in container and "readinessProbe" in container, name
    assert len(names) == 4  # redis, the head, a prefill and a decode worker


def test_the_worker_groups_are_the_config_pools(tmp_path: Path) -> None:
    spec = _one("RayCluster", "tandem")["spec"]
    config = _embedded_config(tmp_path)
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # the router only
    groups = {group["groupName"]: group for group in spec["workerGroupSpecs"]}
    assert set(groups) == {"prefill", "decode"}
    for name, group in groups.items():
        pool = getattr(config.pools, name)
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"]
        assert group["replicas"] == pool.instances  # one tandem instance per Pod
        # All of an instance's tensor-parallel processes on its Pod (one placement group).
        cpus = pool.resources.cpus * pool.tensor_parallel
        assert float(group["rayStartParams"]["num-cpus"]) == cpus
        (container,) = group["template"]["spec"]["containers"]
        assert float(container["resources"]["requests"]["cpu"]) >= cpus
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"  # shared KV


def test_the_router_service_reaches_the_head_on_the_config_ports(tmp_path: Path) -> None:
    service = _one("Service", "tandem-router")["spec"]
    head = _head()
    assert service["selector"].items() <= head["metadata"]["labels"].items()
    container = head["spec"]["containers"][0]
    ports = {p["name"]: _port(container, p["targetPort"]) for p in service["ports"]}
    config = _embedded_config(tmp_path)
    assert ports == {"http": config.router.http_port, "grpc": config.router.grpc_port}


def test_redis_serves_ray_gcs_and_the_store_and_secrets_come_from_the_environment(
    tmp_path: Path,
) -> None:
    redis = _one("Service", "tandem-redis")["spec"]
    address = f"tandem-redis:{redis['ports'][0]['port']}"
    spec = _one("RayCluster", "tandem")["spec"]
    assert spec["gcsFaultToleranceOptions"]["redisAddress"] == address
    config = _embedded_config(tmp_path)
    assert config.store.kind == "redis" and config.store.url is not None
    assert config.store.url.startswith(f"redis://{address}/")
    env = {
        e["name"]: e["valueFrom"]["secretKeyRef"] for e in _head()["spec"]["containers"][0]["env"]
    }
    assert {config.router.api_keys_env, config.store.password_env} <= set(env)
    redis_env = _one("Deployment", "tandem-redis")["spec"]["template"]["spec"]["containers"][0]
    password = redis_env["env"][0]["valueFrom"]["secretKeyRef"]
    assert env[config.store.password_env] == password  # one password, one Secret key


def test_the_cluster_and_the_image_run_the_ray_version_tandem_pins() -> None:
    (pin,) = re.findall(r'"ray==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert _one("RayCluster", "tandem")["spec"]["rayVersion"] == pin
    assert f'"ray[default]=={pin}"' in (ROOT / "deploy" / "Dockerfile").read_text()
