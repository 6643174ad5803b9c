"""tandem's YAML configuration: one file for the model, SLOs, pools, router, store, migration.

    load_config("deploy/cluster.yaml")    ─▶ TandemConfig (frozen; ConfigError if invalid)
    apply_overrides(config, {"router.http_port": 9000})  ─▶ a new TandemConfig
    cluster.config_apply                  ─▶ what the config becomes: DeploymentOptions,
                                             RouterConfig, the store's options

Every model forbids unknown keys, so a misspelt one is refused. A ConfigError lists each
problem as `<file>: <dotted.field.path>: <reason>`. Secrets never live in the file: the
router's API keys and the Redis password are read from environment variables it names.
In colocated mode the decode pool's workers run both phases and the prefill pool is
ignored. This module imports neither torch nor router code at import time.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

if TYPE_CHECKING:
    pass

# engine.config.SUPPORTED_DTYPES and router.policy.POLICIES, written out so that loading a
# config imports neither torch nor the router; tests/cluster/test_config.py keeps them equal.
ENGINE_DTYPES = ("bfloat16", "float32")
ROUTING_POLICIES = ("least_loaded", "prefix_aware", "round_robin", "slo_aware")
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
_REDIS_URL = r"^(redis|rediss|unix)://"


class ConfigError(ValueError):
    """An invalid configuration. `problems` holds one `<source>: <path>: <reason>` each."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid configuration:\n  " + "\n  ".join(self.problems))


class FieldError(ValueError):
    """Raised by a cross-field validator to name the field at fault, below its model."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SLOClass(_Model):
    """A class of requests' latency targets (DistServe's TTFT and TPOT SLOs)."""

    ttft_ms: float = Field(gt=0, description="time to first token target, ms")
    tpot_ms: float = Field(gt=0, description="time per output token target, ms")
    percentile: float = Field(
        default=90.0,
        gt=0,
        le=100,
        description="attainment goal, in percent of requests: 99 means p99 TTFT <= ttft_ms "
        "and p99 TPOT <= tpot_ms",
    )
    window_s: float = Field(
        default=60.0, gt=0, description="seconds of finished requests attainment is judged over"
    )


class Resources(_Model):
    """What one worker of a pool reserves."""

    cpus: float = Field(default=1.0, gt=0, description="Ray CPUs per worker")
    gpus: float = Field(default=0.0, ge=0, description="GPUs per worker (CPU workers only yet)")
    threads: int = Field(default=1, ge=1, description="torch threads per worker")


class PoolConfig(_Model):
    """One pool of model instances. An instance with `tensor_parallel` N runs N processes
    on one node, each holding 1/N of the heads (and reserving `resources`); pipeline
    parallelism is not supported yet and must be 1."""

    instances: int = Field(default=1, ge=1, description="model instances in the pool")
    tensor_parallel: int = Field(
        default=1,
        ge=1,
        description="processes per instance, splitting the model by heads on one node; "
        "must divide the model's query heads, KV heads and MLP width",
    )
    pipeline_parallel: int = Field(
        default=1, ge=1, description="degree per instance; only 1 is supported yet"
    )
    max_num_batched_tokens: int = Field(
        default=512, ge=1, description="chunk budget: tokens one engine step computes"
    )
    max_num_seqs: int | None = Field(
        default=None, ge=1, description="max batch: running requests (None: the engine's 256)"
    )
    kv_cache_gb: float = Field(default=1.0, gt=0, description="KV cache per worker, GiB")
    resources: Resources = Field(default_factory=Resources, description="what each worker reserves")

    @field_validator("pipeline_parallel")
    @classmethod
    def _no_pipeline(cls, value: int) -> int:
        if value != 1:
            raise ValueError("not supported yet: the engine runs every layer in each instance")
        return value


class Pools(_Model):
    """The two pools. In colocated mode the decode pool runs both phases and the prefill
    pool is ignored."""

    prefill: PoolConfig = Field(
        default_factory=PoolConfig, description="prompt instances (ignored in colocated mode)"
    )
    decode: PoolConfig = Field(
        default_factory=PoolConfig, description="generation instances (colocated: both phases)"
    )


class RouterLimits(_Model):
    """Admission bounds (beyond them a request gets HTTP 429) and timeouts."""

    max_in_flight: int = Field(
        default=1024, ge=1, description="requests on the workers at once; beyond, HTTP 429"
    )
    max_waiting_prompt_tokens: int = Field(
        default=65536, ge=1, description="prompt tokens not yet answered by a first token"
    )
    max_body_mb: float = Field(default=8.0, gt=0, description="largest HTTP request body, MiB")
    connect_timeout_s: float = Field(
        default=30.0, gt=0, description="seconds for each worker's first contact"
    )
    rpc_timeout_s: float = Field(
        default=10.0, gt=0, description="seconds for each Generate, Abort and Status call"
    )
    max_retries: int = Field(
        default=2, ge=0, description="times a request whose worker died resumes elsewhere"
    )
    drain_timeout_s: float = Field(
        default=30.0,
        ge=0,
        description="on SIGTERM: seconds the requests in flight get to finish before exit",
    )


class RouterSection(_Model):
    """The front door: OpenAI HTTP and gRPC. API keys never go in the file: `api_keys_env`
    names an environment variable holding them, comma-separated (unset: no key needed)."""

    host: str = Field(default="127.0.0.1", description="address the router serves on")
    http_port: int = Field(default=8000, ge=1, le=65535, description="port of the OpenAI HTTP API")
    grpc_port: int = Field(default=50051, ge=1, le=65535, description="port of the gRPC API")
    policy: Literal["least_loaded", "prefix_aware", "round_robin", "slo_aware"] = Field(
        default="least_loaded", description="routing: which prefill and decode take a request"
    )
    api_keys_env: str | None = Field(
        default=None,
        pattern=_ENV_NAME,
        description="NAME of an environment variable holding API keys k1,k2 (unset: none)",
    )
    grpc_tls_cert: str | None = Field(
        default=None, description="PEM certificate chain file: serve gRPC over TLS"
    )
    grpc_tls_key: str | None = Field(
        default=None, description="PEM private key file, with grpc_tls_cert"
    )
    limits: RouterLimits = Field(
        default_factory=RouterLimits, description="admission bounds and timeouts"
    )

    @model_validator(mode="after")
    def _consistent(self) -> RouterSection:
        if self.http_port == self.grpc_port:
            raise FieldError("grpc_port", f"must differ from http_port ({self.http_port})")
        if (self.grpc_tls_cert is None) != (self.grpc_tls_key is None):
            raise FieldError("grpc_tls_key", "grpc_tls_cert and grpc_tls_key go together")
        return self


class StoreConfig(_Model):
    """Where cluster state lives: in the serving process (memory) or in Redis. The Redis
    password never goes in the file or the url: `password_env` names its variable."""

    kind: Literal["memory", "redis"] = Field(
        default="memory", description="memory (one process) or redis (a cluster)"
    )
    url: str | None = Field(
        default=None,
        pattern=_REDIS_URL,
        description="redis://host:port/db, required for redis; no password in it",
    )
    password_env: str | None = Field(
        default=None,
        pattern=_ENV_NAME,
        description="NAME of an environment variable holding the Redis password",
    )
    key_prefix: str = Field(
        default="tandem:", min_length=1, description="prefix of every key tandem writes"
    )
    timeout_s: float = Field(default=1.0, gt=0, description="bounds each store call")
    heartbeat_ttl_s: float = Field(
        default=5.0,
        gt=0,
        description="an instance whose Status goes unanswered this long is expired: out of "
        "routing and out of the registry until it answers again",
    )

    @model_validator(mode="after")
    def _url_for_redis(self) -> StoreConfig:
        if self.url is not None and urlsplit(self.url).password is not None:
            raise FieldError("url", "holds a password: put it in the variable password_env names")
        if self.kind == "redis" and self.url is None:
            raise FieldError("url", "required when kind is redis, e.g. redis://redis:6379/0")
        if self.kind == "memory" and (self.url or self.password_env):
            raise FieldError("url", "a memory store takes no url or password; set kind: redis")
        return self


class MigrationConfig(_Model):
    """Live migration of running requests between decode instances (Llumnix)."""

    policy: Literal["off", "balance"] = Field(
        default="off",
        description="off, or balance: from the most to the least loaded decode instance",
    )
    interval_s: float = Field(default=1.0, gt=0, description="seconds between two planning rounds")
    threshold: float = Field(
        default=0.2,
        gt=0,
        le=1,
        description="the gap in KV usage (0..1) between two instances worth a move",
    )
    timeout_s: float = Field(
        default=120.0, gt=0, description="seconds for one migration, all its stages"
    )

    @field_validator("policy", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML reads a bare `off` as false


class RayConfig(_Model):
    """How the workers are launched, and where they listen."""

    launcher: Literal["ray", "local"] = Field(
        default="ray", description="ray: Ray actors; local: processes on this machine"
    )
    address: str | None = Field(default=None, description="join this Ray cluster ('auto' too)")
    worker_host: str | None = Field(
        default=None,
        description="where the state store and every worker listen (None: on a Ray cluster, "
        "each worker on its node's address; on this machine alone, 127.0.0.1)",
    )
    max_restarts: int = Field(
        default=3, ge=0, description="Ray: times a worker whose process died is started again"
    )
    start_timeout_s: float = Field(
        default=600.0, gt=0, description="seconds for every worker to come up"
    )

    @model_validator(mode="after")
    def _address_needs_ray(self) -> RayConfig:
        if self.launcher == "local" and self.address is not None:
            raise FieldError("address", "only with launcher: ray")
        return self


class TandemConfig(_Model):
    """One tandem deployment: `tandem serve --config FILE`."""

    model: str | None = Field(
        default=None, description="a .gguf file or safetensors directory (None: SmolLM2-135M)"
    )
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        default="auto",
        description="weights and KV cache; auto: bfloat16 where the worker's CPU computes in "
        "it (avx512_bf16 or amx_bf16), else float32",
    )
    mode: Literal["disaggregated", "colocated"] = Field(
        default="disaggregated", description="colocated: the decode pool runs both phases"
    )
    attention_backend: Literal["auto", "cpu", "torch"] = Field(
        default="auto", description="auto: the C++ CPU kernel where it builds, else torch"
    )
    linear_kernel: Literal["auto", "quantized", "packed", "torch"] = Field(
        default="auto",
        description="linear layers: quantized (C++ kernel on a GGUF's Q4_0/Q4_1/Q8_0 blocks, "
        "dequantized exactly), packed (C++ kernel on float weights) or torch; auto: "
        "quantized where the C++ kernels build, else torch",
    )
    slo_classes: dict[str, SLOClass] = Field(
        default_factory=lambda: {"default": SLOClass(ttft_ms=1000, tpot_ms=100)},
        description="SLO classes by name; requests are judged against 'default' for now",
    )
    pools: Pools = Field(default_factory=Pools, description="the prefill and decode pools")
    router: RouterSection = Field(
        default_factory=RouterSection,
        description="the router: ports, routing policy, API keys, limits",
    )
    store: StoreConfig = Field(
        default_factory=StoreConfig, description="where cluster state lives: memory or Redis"
    )
    migration: MigrationConfig = Field(
        default_factory=MigrationConfig, description="live migration between decode instances"
    )
    ray: RayConfig = Field(
        default_factory=RayConfig, description="how the workers are launched, and where they listen"
    )


def json_schema() -> dict[str, Any]:
    """The JSON schema of the YAML file, with every field's description."""
    return TandemConfig.model_json_schema()


def load_config(path: str | Path) -> TandemConfig:
    """The file's config. Raises ConfigError naming the file, each field and the reason."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError([f"{path}: {error.strerror or error}"]) from error
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as error:
        raise ConfigError([f"{path}: {_yaml_problem(error)}"]) from error
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of fields"])
    return _validate(data, str(path))


def apply_overrides(config: TandemConfig, overrides: Mapping[str, Any]) -> TandemConfig:
    """A new config with each dotted path set, e.g. {"pools.decode.instances": 2}: the flags
    a user set explicitly, which win over the file. Raises ConfigError."""
    data = config.model_dump(exclude_unset=True)
    for dotted, value in overrides.items():
        node = data
        *parents, last = dotted.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError([f"command line: {dotted}: {part} is not a section"])
            node = child
        node[last] = value
    return _validate(data, "command line")


def _validate(data: dict[str, Any], source: str) -> TandemConfig:
    try:
        return TandemConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError([_problem(source, e) for e in error.errors()]) from None


def _problem(source: str, error: Any) -> str:
    loc = tuple(error["loc"])
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, FieldError):
        loc += (cause.field,)
    path = ".".join(str(part) for part in loc) or "(top level)"
    kind, message = error["type"], error["msg"]
    if kind == "extra_forbidden":
        message = "unknown field" + _suggestion(loc)
    elif kind == "missing":
        message = "required"
    else:
        message = message.removeprefix("Value error, ")
        if not isinstance(error["input"], dict | list):
            message += f" (got {error['input']!r})"
    return f"{source}: {path}: {message}"


def _suggestion(loc: tuple) -> str:
    """'; did you mean ...' for an unknown key, from the fields of the model that holds it."""
    model: Any = TandemConfig
    in_dict = False
    for part in loc[:-1]:
        if in_dict:  # a key of a dict of models (slo_classes)
            in_dict = False
            continue
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return ""
        model = field.annotation
        if get_origin(model) is dict:
            model, in_dict = get_args(model)[1], True
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(model.model_fields)}"


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def _yaml_problem(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    if mark is None:
        return f"invalid YAML: {problem}"
    return f"line {mark.line + 1}, column {mark.column + 1}: invalid YAML: {problem}"
