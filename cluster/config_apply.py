"""What a TandemConfig becomes: the workers' DeploymentOptions, the router's RouterConfig
and serve() arguments, the store's options; the flags that override a file; and
`tandem config check`.

    overrides_from_flags({"decode_instances": 2})  ─▶ {"pools.decode.instances": 2}
    deployment_options(config)            ─▶ cluster.deployment.DeploymentOptions
    router_config(config), serve_options(config)  ─▶ the router's RouterConfig, serve() kwargs
    store_options(config)                 ─▶ cluster.store.make_store() kwargs

Secrets are read here, from the environment variables the config names.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit, urlunsplit

from cluster.config import ConfigError, PoolConfig, TandemConfig, json_schema, load_config

DEFAULT_API_KEYS_ENV = "TANDEM_API_KEYS"

if TYPE_CHECKING:
    from cluster.deployment import DeploymentOptions
    from router.config import RouterConfig


# `tandem serve` flag (argparse dest) -> the dotted paths it overrides.
FLAG_PATHS: dict[str, tuple[str, ...]] = {
    "model": ("model",),
    "dtype": ("dtype",),
    "mode": ("mode",),
    "prefill_instances": ("pools.prefill.instances",),
    "decode_instances": ("pools.decode.instances",),
    "prefill_tensor_parallel": ("pools.prefill.tensor_parallel",),
    "decode_tensor_parallel": ("pools.decode.tensor_parallel",),
    "host": ("router.host",),
    "http_port": ("router.http_port",),
    "grpc_port": ("router.grpc_port",),
    "launcher": ("ray.launcher",),
    "ray_address": ("ray.address",),
    "threads_per_worker": ("pools.prefill.resources.threads", "pools.decode.resources.threads"),
    "cpus_per_worker": ("pools.prefill.resources.cpus", "pools.decode.resources.cpus"),
    "max_num_batched_tokens": (
        "pools.prefill.max_num_batched_tokens",
        "pools.decode.max_num_batched_tokens",
    ),
    "kv_cache_gb": ("pools.prefill.kv_cache_gb", "pools.decode.kv_cache_gb"),
    "attention_backend": ("attention_backend",),
    "linear_kernel": ("linear_kernel",),
    "policy": ("router.policy",),
    "grpc_tls_cert": ("router.grpc_tls_cert",),
    "grpc_tls_key": ("router.grpc_tls_key",),
    "max_in_flight": ("router.limits.max_in_flight",),
    "max_waiting_prompt_tokens": ("router.limits.max_waiting_prompt_tokens",),
    "max_body_mb": ("router.limits.max_body_mb",),
    "migration_policy": ("migration.policy",),
    "migration_interval": ("migration.interval_s",),
    "migration_threshold": ("migration.threshold",),
}


def overrides_from_flags(flag_values: Mapping[str, Any]) -> dict[str, Any]:
    """{dotted path: value} for the given {flag dest: value} (pass only the flags the user
    set); flags with no field (--api-key, which never goes in a file) are left out."""
    return {path: value for dest, value in flag_values.items() for path in FLAG_PATHS.get(dest, ())}


def api_keys(config: TandemConfig, environ: Mapping[str, str] | None = None) -> list[str]:
    """The keys in the variable router.api_keys_env names; when it names none, those in
    TANDEM_API_KEYS if it is set."""
    name = config.router.api_keys_env
    if name is None:
        value = (os.environ if environ is None else environ).get(DEFAULT_API_KEYS_ENV, "")
        return [key.strip() for key in value.split(",") if key.strip()]
    value = _environment("router.api_keys_env", name, environ)
    keys = [key.strip() for key in value.split(",") if key.strip()]
    if not keys:
        raise ConfigError([f"router.api_keys_env: {name} holds no key"])
    return keys


def store_options(config: TandemConfig, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """cluster.store.make_store()'s arguments; the url gets the password from the variable
    store.password_env names."""
    store = config.store
    url = store.url
    if url is not None and store.password_env is not None:
        password = quote(_environment("store.password_env", store.password_env, environ), "")
        parts = urlsplit(url)
        url = urlunsplit(parts._replace(netloc=f"{parts.username or ''}:{password}@{parts.netloc}"))
    options = {"kind": store.kind, "prefix": store.key_prefix, "timeout_s": store.timeout_s}
    return options if url is None else {**options, "url": url}


def _environment(field: str, name: str, environ: Mapping[str, str] | None) -> str:
    environ = os.environ if environ is None else environ
    if name not in environ:
        raise ConfigError(
            [f"{field}: the environment variable {name} is not set; set it, or remove {field}"]
        )
    return environ[name]


def deployment_options(config: TandemConfig, source: str = "config") -> DeploymentOptions:
    """The workers' DeploymentOptions. Raises ConfigError (naming `source`, the file) for
    settings they cannot carry yet."""
    from cluster.deployment import DeploymentOptions

    problems = _undeployable(config)
    if problems:
        raise ConfigError([f"{source}: {problem}" for problem in problems])
    decode = config.pools.decode
    return DeploymentOptions(
        mode=config.mode,
        prefill_instances=config.pools.prefill.instances,
        decode_instances=decode.instances,
        prefill_tensor_parallel=config.pools.prefill.tensor_parallel,
        decode_tensor_parallel=decode.tensor_parallel,
        model=config.model,
        dtype=config.dtype,
        launcher=config.ray.launcher,
        ray_address=config.ray.address,
        host=config.ray.worker_host,
        max_restarts=config.ray.max_restarts,
        threads_per_worker=decode.resources.threads,
        cpus_per_worker=decode.resources.cpus,
        max_num_batched_tokens=decode.max_num_batched_tokens,
        kv_cache_memory_bytes=int(decode.kv_cache_gb * (1 << 30)),
        attention_backend=config.attention_backend,
        linear_kernel=config.linear_kernel,
        start_timeout=config.ray.start_timeout_s,
    )


def router_config(config: TandemConfig) -> RouterConfig:
    """The router's RouterConfig: limits, timeouts, migration and SLO classes."""
    from router.config import RouterConfig
    from router.slo import SLO

    limits, migration = config.router.limits, config.migration
    return RouterConfig(
        connect_timeout_s=limits.connect_timeout_s,
        rpc_timeout_s=limits.rpc_timeout_s,
        max_retries=limits.max_retries,
        drain_timeout_s=limits.drain_timeout_s,
        max_in_flight=limits.max_in_flight,
        max_waiting_prompt_tokens=limits.max_waiting_prompt_tokens,
        migration_timeout_s=migration.timeout_s,
        migration_policy=migration.policy,
        migration_interval_s=migration.interval_s,
        migration_threshold=migration.threshold,
        slo_classes={
            name: SLO(ttft_s=slo.ttft_ms / 1e3, tpot_s=slo.tpot_ms / 1e3, window_s=slo.window_s)
            for name, slo in config.slo_classes.items()
        },
    )


def serve_options(config: TandemConfig, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """router.server.serve()'s keyword arguments (as front_door_options gives from flags)."""
    from cluster.registry import Registry
    from cluster.store import make_store
    from router.membership import Membership
    from router.policy import make_policy

    tls = None
    router = config.router
    if router.grpc_tls_cert is not None and router.grpc_tls_key is not None:
        tls = (Path(router.grpc_tls_cert).read_bytes(), Path(router.grpc_tls_key).read_bytes())
    return {
        "policy": make_policy(router.policy),
        "membership": Membership(
            Registry(make_store(**store_options(config, environ)), config.store.heartbeat_ttl_s)
        ),
        "api_keys": api_keys(config, environ),
        "grpc_tls": tls,
        "max_body_bytes": int(router.limits.max_body_mb * 2**20),
        "config": router_config(config),
    }


def config_check_main(argv: Sequence[str]) -> int:
    """`tandem config check [--schema] FILE...`: 0 when every file is valid, else 2."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="tandem config check")
    parser.add_argument("files", nargs="*", metavar="FILE", help="YAML configs to validate")
    parser.add_argument("--schema", action="store_true", help="print the JSON schema")
    args = parser.parse_args(argv)
    if args.schema:
        print(json.dumps(json_schema(), indent=2))
    elif not args.files:
        parser.error("give a FILE to check, or --schema")
    failed = False
    for name in args.files:
        try:
            config = load_config(name)
            deployment_options(config, source=name)
        except ConfigError as error:
            failed = True
            print("\n".join(error.problems), file=sys.stderr)
            continue
        print(f"{name}: ok ({summary(config)})")
    return 2 if failed else 0


def summary(config: TandemConfig) -> str:
    """One line: the pools, the store, the router's address, the policies."""
    pools, router = config.pools, config.router
    if config.mode == "colocated":
        workers = f"colocated: {pools.decode.instances} workers"
    else:
        workers = (
            f"disaggregated: {pools.prefill.instances} prefill + {pools.decode.instances} decode"
        )
    return (
        f"{workers}, store {config.store.kind}, router {router.host}:{router.http_port} "
        f"(gRPC {router.grpc_port}), policy {router.policy}, migration {config.migration.policy}"
    )


def _undeployable(config: TandemConfig) -> list[str]:
    """What DeploymentOptions cannot carry yet: it gives every worker one set of settings."""
    pools = {"prefill": config.pools.prefill, "decode": config.pools.decode}
    if config.mode == "colocated":
        del pools["prefill"]
    problems = []
    for name, pool in pools.items():
        if pool.resources.gpus:
            problems.append(
                f"pools.{name}.resources.gpus: GPU workers are not supported yet; set 0"
            )
        if pool.max_num_seqs is not None:
            problems.append(f"pools.{name}.max_num_seqs: not passed to the workers yet; remove it")
    if "prefill" in pools:
        decode = _shared_settings(config.pools.decode)
        for path, value in _shared_settings(config.pools.prefill).items():
            if value != decode[path]:
                problems.append(
                    f"pools.prefill.{path}: {value} differs from pools.decode.{path} "
                    f"({decode[path]}); both pools take the same value for now"
                )
    return problems


def _shared_settings(pool: PoolConfig) -> dict[str, float]:
    """The settings DeploymentOptions holds once, for every worker."""
    return {
        "max_num_batched_tokens": pool.max_num_batched_tokens,
        "kv_cache_gb": pool.kv_cache_gb,
        "resources.cpus": pool.resources.cpus,
        "resources.threads": pool.resources.threads,
    }
