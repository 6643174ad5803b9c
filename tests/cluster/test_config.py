"""The YAML config: the examples load, bad files are refused with the field's path and the
reason, flags win over the file, and the config maps onto DeploymentOptions, RouterConfig
and the router's serve() arguments."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, get_args

import pytest
from pydantic import ValidationError

from cluster.config import (
    ENGINE_DTYPES,
    ROUTING_POLICIES,
    ConfigError,
    MigrationConfig,
    RouterSection,
    TandemConfig,
    apply_overrides,
    json_schema,
    load_config,
)
from cluster.config_apply import (
    FLAG_PATHS,
    api_keys,
    config_check_main,
    deployment_options,
    overrides_from_flags,
    router_config,
    serve_options,
    store_options,
)
from cluster.deployment import DeploymentOptions

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "deploy").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tandem.yaml"
    path.write_text(text)
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return caught.value.problems


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_in_deploy_is_valid_and_deployable(path: Path, capsys) -> None:
    assert config_check_main([str(path)]) == 0
    assert capsys.readouterr().out.startswith(f"{path}: ok (")
    deployment_options(load_config(path))


def test_the_examples_are_the_laptop_default_and_a_redis_cluster() -> None:
    local, cluster = (
        load_config(ROOT / "deploy/local.yaml"),
        load_config(ROOT / "deploy/cluster.yaml"),
    )
    assert deployment_options(local) == DeploymentOptions()  # what `tandem serve` runs
    assert local.store.kind == "memory" and local.pools.decode.instances == 1
    assert cluster.store.kind == "redis" and cluster.pools.decode.instances > 1


def test_the_laptop_default_matches_every_tandem_serve_flag_default() -> None:
    from tandem.cli import _parser

    defaults = vars(_parser().parse_args(["serve"]))
    # Every flag has its field, but API keys (never in a file) and --config (the file itself).
    assert set(defaults) - set(FLAG_PATHS) - {"config"} == {"command", "api_key"}
    local = load_config(ROOT / "deploy/local.yaml").model_dump()
    for dest, value in overrides_from_flags(defaults).items():
        node: Any = local
        for part in dest.split("."):
            node = node[part]
        assert node == value, dest


def test_a_misspelt_key_is_refused_with_its_path_and_a_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, "pools:\n  decode:\n    instanses: 2\n")
    assert problems(path) == [
        f"{path}: pools.decode.instanses: unknown field; did you mean 'instances'?"
    ]
    path = write(tmp_path, "slo_classes:\n  fast: {ttft_ms: 100, tpot_ms: 5, percentil: 99}\n")
    assert problems(path) == [
        f"{path}: slo_classes.fast.percentil: unknown field; did you mean 'percentile'?"
    ]


def test_every_bad_value_is_listed_with_its_path_and_reason(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "pools:\n  prefill: {instances: -1, pipeline_parallel: 2}\n"
        "store: {kind: redis}\nrouter: {http_port: 9000, grpc_port: 9000}\n"
        "slo_classes:\n  default: {ttft_ms: 0, tpot_ms: 50, percentile: 101}\n",
    )
    assert problems(path) == [
        f"{path}: slo_classes.default.ttft_ms: Input should be greater than 0 (got 0)",
        f"{path}: slo_classes.default.percentile: Input should be less than or equal to 100 "
        "(got 101)",
        f"{path}: pools.prefill.instances: Input should be greater than or equal to 1 (got -1)",
        f"{path}: pools.prefill.pipeline_parallel: not supported yet: the engine runs every "
        "layer in each instance (got 2)",
        f"{path}: router.grpc_port: must differ from http_port (9000)",
        f"{path}: store.url: required when kind is redis, e.g. redis://redis:6379/0",
    ]


def test_bad_yaml_is_refused_with_its_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "mode: colocated\npools:\n  decode: {instances: 2\n")
    (problem,) = problems(path)
    assert problem.startswith(f"{path}: line 4, column 1: invalid YAML: expected ',' or '}}'")
    path = write(tmp_path, "mode: colocated\nmode: disaggregated\n")
    assert problems(path) == [
        f"{path}: line 2, column 1: invalid YAML: the key 'mode' is given twice"
    ]
    path = write(tmp_path, "- mode\n")
    assert problems(path) == [f"{path}: the top level must be a mapping of fields"]
    assert problems(tmp_path / "absent.yaml") == [
        f"{tmp_path / 'absent.yaml'}: No such file or directory"
    ]


def test_an_empty_file_is_the_default_and_a_bare_off_means_off(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == TandemConfig()
    assert load_config(write(tmp_path, "migration: {policy: off}\n")).migration.policy == "off"


def test_the_config_is_frozen() -> None:
    config = TandemConfig()
    with pytest.raises(ValidationError, match="frozen"):
        config.mode = "colocated"


def test_flags_override_the_file_and_leave_the_rest() -> None:
    config = load_config(ROOT / "deploy/cluster.yaml")
    flags = {"decode_instances": 3, "http_port": 9000, "threads_per_worker": 2, "api_key": ["k"]}
    changed = apply_overrides(config, overrides_from_flags(flags))
    assert changed.pools.decode.instances == 3 and changed.router.http_port == 9000
    assert changed.pools.prefill.resources.threads == changed.pools.decode.resources.threads == 2
    assert changed.store == config.store and changed.pools.prefill.instances == 1
    assert config.pools.decode.instances == 2  # a new config; the file's is unchanged
    assert apply_overrides(TandemConfig(), {"store.kind": "memory"}) == TandemConfig()


def test_the_linear_kernel_flag_reaches_every_workers_engine() -> None:
    config = apply_overrides(TandemConfig(), overrides_from_flags({"linear_kernel": "packed"}))
    specs = deployment_options(config).worker_specs("127.0.0.1:1")
    assert {spec.engine_kwargs()["linear_kernel"] for spec in specs} == {"packed"}
    with pytest.raises(ConfigError, match="linear_kernel"):
        apply_overrides(TandemConfig(), {"linear_kernel": "fast"})


def test_each_pool_has_its_own_tensor_parallel_degree() -> None:
    flags = {"prefill_tensor_parallel": 3}
    config = apply_overrides(TandemConfig(), overrides_from_flags(flags))
    specs = deployment_options(config).worker_specs("127.0.0.1:1")
    assert {s.instance_id: s.engine_kwargs()["tensor_parallel_size"] for s in specs} == {
        "prefill-0": 3,
        "decode-0": 1,
    }
    colocated = apply_overrides(
        TandemConfig(), {"mode": "colocated", "pools.decode.tensor_parallel": 2}
    )
    specs = deployment_options(colocated).worker_specs("127.0.0.1:1")
    assert [s.tensor_parallel for s in specs] == [2]
    with pytest.raises(ConfigError, match="tensor_parallel: Input should be greater than"):
        apply_overrides(TandemConfig(), {"pools.decode.tensor_parallel": 0})


def test_a_bad_override_is_refused_like_a_bad_file() -> None:
    with pytest.raises(ConfigError) as caught:
        apply_overrides(TandemConfig(), {"pools.decode.instances": 0, "router.polic": "x"})
    assert caught.value.problems == [
        "command line: pools.decode.instances: Input should be greater than or equal to 1 (got 0)",
        "command line: router.polic: unknown field; did you mean 'policy'?",
    ]
    with pytest.raises(ConfigError, match="mode is not a section"):
        apply_overrides(TandemConfig(mode="colocated"), {"mode.x": 1})


def test_deployment_options_carry_the_pools_and_the_launcher() -> None:
    config = load_config(ROOT / "deploy/cluster.yaml")
    options = deployment_options(apply_overrides(config, {"ray.worker_host": "10.0.0.5"}))
    assert (options.mode, options.prefill_instances, options.decode_instances) == (
        "disaggregated", 1, 2,
    )  # fmt: skip
    assert (options.launcher, options.ray_address, options.host) == ("ray", "auto", "10.0.0.5")
    assert (options.threads_per_worker, options.cpus_per_worker) == (4, 4.0)
    assert options.kv_cache_memory_bytes == 2 << 30 and options.max_num_batched_tokens == 512
    assert options.dtype == "bfloat16" and options.start_timeout == 900
    assert options.max_restarts == 3
    assert deployment_options(config).host is None  # each worker on its node's address


def test_what_the_deployment_cannot_carry_yet_is_refused_by_path() -> None:
    config = apply_overrides(
        TandemConfig(),
        {"pools.prefill.kv_cache_gb": 2.0, "pools.decode.resources.gpus": 1,
         "pools.decode.max_num_seqs": 64},
    )  # fmt: skip
    with pytest.raises(ConfigError) as caught:
        deployment_options(config, source="f.yaml")
    assert caught.value.problems == [
        "f.yaml: pools.decode.resources.gpus: GPU workers are not supported yet; set 0",
        "f.yaml: pools.decode.max_num_seqs: not passed to the workers yet; remove it",
        "f.yaml: pools.prefill.kv_cache_gb: 2.0 differs from pools.decode.kv_cache_gb (1.0); "
        "both pools take the same value for now",
    ]
    colocated = apply_overrides(
        TandemConfig(), {"mode": "colocated", "pools.prefill.kv_cache_gb": 2}
    )
    assert deployment_options(colocated).mode == "colocated"  # the prefill pool is ignored


def test_router_config_carries_limits_migration_and_slos_in_seconds() -> None:
    config = router_config(load_config(ROOT / "deploy/cluster.yaml"))
    assert (config.max_in_flight, config.max_waiting_prompt_tokens) == (512, 32768)
    assert (config.connect_timeout_s, config.rpc_timeout_s) == (60, 10)
    assert (config.migration_policy, config.migration_interval_s) == ("balance", 1.0)
    assert config.migration_threshold == 0.2 and config.migration_timeout_s == 120
    (slo,) = config.slo_classes.values()
    assert (slo.ttft_s, slo.tpot_s, slo.window_s) == (2.0, 0.15, 60)


def test_api_keys_come_from_the_named_variable_and_a_missing_one_is_a_clear_error() -> None:
    config = load_config(ROOT / "deploy/cluster.yaml")
    assert api_keys(config, {"TANDEM_API_KEYS": " k1, k2 ,"}) == ["k1", "k2"]
    assert api_keys(TandemConfig(), {}) == []  # none named: no key needed
    assert api_keys(TandemConfig(), {"TANDEM_API_KEYS": "k9"}) == ["k9"]  # unless the default
    with pytest.raises(ConfigError, match="environment variable TANDEM_API_KEYS is not set"):
        api_keys(config, {})
    with pytest.raises(ConfigError, match="TANDEM_API_KEYS holds no key"):
        api_keys(config, {"TANDEM_API_KEYS": " , "})
    options = serve_options(config, {"TANDEM_API_KEYS": "k1", "TANDEM_REDIS_PASSWORD": "pw"})
    assert options["api_keys"] == ["k1"] and options["max_body_bytes"] == 8 << 20
    store = options["membership"].registry.store
    assert type(store).__name__ == "RedisStore" and options["membership"].ttl_s == 5.0
    assert type(options["policy"]).__name__ == "LeastLoadedPolicy" and options["grpc_tls"] is None


def test_the_store_gets_its_password_from_the_named_variable() -> None:
    from cluster.store import make_store

    config = load_config(ROOT / "deploy/cluster.yaml")
    options = store_options(config, {"TANDEM_REDIS_PASSWORD": "p@ss/word"})
    assert options == {
        "kind": "redis",
        "url": "redis://:p%40ss%2Fword@tandem-redis:6379/1",
        "prefix": "tandem:",
        "timeout_s": 2,
    }
    inspect.signature(make_store).bind(**options)
    assert store_options(TandemConfig()) == {"kind": "memory", "prefix": "tandem:", "timeout_s": 1}
    with pytest.raises(ConfigError, match="variable TANDEM_REDIS_PASSWORD is not set"):
        store_options(config, {})


def test_secrets_in_the_file_are_not_accepted(tmp_path: Path) -> None:
    path = write(tmp_path, "store: {kind: redis, url: 'redis://:hunter2@redis:6379/0'}\n")
    assert problems(path) == [
        f"{path}: store.url: holds a password: put it in the variable password_env names"
    ]
    with pytest.raises(ValidationError):
        RouterSection.model_validate({"api_keys_env": "k1,k2"})  # a key, not a variable name
    with pytest.raises(ValidationError):
        RouterSection.model_validate({"api_keys": ["k1"]})


def test_the_schema_documents_every_field(capsys) -> None:
    schema = json_schema()
    models = [schema, *schema["$defs"].values()]
    for model in models:
        for name, field in model["properties"].items():
            assert field.get("description"), name
    assert config_check_main(["--schema"]) == 0
    assert json.loads(capsys.readouterr().out) == schema


def test_the_names_written_out_match_the_engine_the_router_and_the_migration_policies() -> None:
    from cluster.migration_policy import POLICIES as MIGRATION_POLICIES
    from engine.config import SUPPORTED_DTYPES
    from router.policy import POLICIES

    assert set(ENGINE_DTYPES) == set(SUPPORTED_DTYPES)
    assert set(get_args(TandemConfig.model_fields["dtype"].annotation)) == {"auto", *ENGINE_DTYPES}
    assert set(ROUTING_POLICIES) == set(POLICIES)
    assert set(get_args(RouterSection.model_fields["policy"].annotation)) == set(POLICIES)
    assert set(get_args(MigrationConfig.model_fields["policy"].annotation)) == set(
        MIGRATION_POLICIES
    )


def test_loading_a_config_imports_neither_torch_nor_the_router() -> None:
    code = (
        "import sys\nfrom cluster.config import load_config\n"
        "load_config('deploy/cluster.yaml')\n"
        "loaded = sorted(n for n in ('torch', 'router') if n in sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
