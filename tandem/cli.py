"""The `tandem` command line.

    tandem generate "Once upon a time" --max-tokens 64
    tandem chat "What is the capital of France?"
    tandem serve [--config FILE] [--mode disaggregated|colocated] [--decode-instances N] ...
    tandem config check FILE...
    tandem status [--config FILE] [--router URL]

generate and chat run one engine in this process and stream the text. serve starts
the state store, the workers (Ray actors, or local processes with --launcher local)
and the router: OpenAI HTTP on 127.0.0.1:8000 and gRPC on 127.0.0.1:50051. Its
settings come from the YAML file (cluster/config.py), and the flags given win over it.
"""

from __future__ import annotations

import argparse
import faulthandler
import signal
import sys
from collections.abc import Sequence
from typing import Any

from engine.config import DTYPE_CHOICES, EngineConfig, resolve_dtype
from engine.engine import LLMEngine
from engine.errors import TandemError
from engine.sampling_params import SamplingParams
from engine.tokenizer import apply_chat_template


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="Disaggregated LLM serving.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("generate", "continue a prompt"),
        ("chat", "answer one user message, with the model's chat template"),
    ):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("text", help="the prompt, or the user's message")
        sub.add_argument(
            "--model",
            default=None,
            help="a .gguf file or a safetensors directory (default: SmolLM2-135M-Instruct)",
        )
        sub.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=DTYPE_HELP)
        sub.add_argument("--max-tokens", type=int, default=128)
        sub.add_argument("--temperature", type=float, default=0.0)
        sub.add_argument("--top-p", type=float, default=1.0)
        sub.add_argument("--seed", type=int, default=None)
    _add_serve_arguments(commands.add_parser("serve", help="serve over OpenAI HTTP and gRPC"))
    commands.add_parser(
        "bench", help="serving benchmark: `tandem bench run|compare --help`", add_help=False
    )
    commands.add_parser(
        "config", help="`tandem config check FILE...`: validate YAML configs", add_help=False
    )
    commands.add_parser(
        "status", help="instances, roles, load and health: `tandem status --help`", add_help=False
    )
    return parser


DTYPE_HELP = "auto: bfloat16 where the CPU computes in it (avx512_bf16, amx_bf16), else float32"


def _add_serve_arguments(serve: argparse.ArgumentParser) -> None:
    serve.add_argument(
        "--config", default=None, metavar="FILE",
        help="a YAML config (deploy/local.yaml shows every section); flags given win over it",
    )  # fmt: skip
    serve.add_argument("--model", default=None, help="as for generate (default: SmolLM2)")
    serve.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=DTYPE_HELP)
    serve.add_argument("--mode", default="disaggregated", choices=["disaggregated", "colocated"])
    serve.add_argument("--prefill-instances", type=int, default=1)
    serve.add_argument("--decode-instances", type=int, default=1)
    serve.add_argument(
        "--prefill-tensor-parallel", type=int, default=1, metavar="N",
        help="processes per prefill instance, splitting the model by heads",
    )  # fmt: skip
    serve.add_argument(
        "--decode-tensor-parallel", type=int, default=1, metavar="N",
        help="processes per decode (or colocated) instance, splitting the model by heads",
    )  # fmt: skip
    serve.add_argument("--host", default="127.0.0.1", help="address to serve on")
    serve.add_argument("--http-port", type=int, default=8000)
    serve.add_argument("--grpc-port", type=int, default=50051)
    serve.add_argument("--launcher", default="ray", choices=["ray", "local"])
    serve.add_argument("--ray-address", default=None, help="join this Ray cluster ('auto' too)")
    serve.add_argument("--threads-per-worker", type=int, default=1, help="torch threads")
    serve.add_argument("--cpus-per-worker", type=float, default=1.0, help="Ray CPUs")
    serve.add_argument("--max-num-batched-tokens", type=int, default=512, help="chunk budget")
    serve.add_argument("--kv-cache-gb", type=float, default=1.0, help="KV cache per worker")
    serve.add_argument(
        "--attention-backend", default="auto", choices=["auto", "cpu", "torch"],
        help="auto: the C++ CPU kernel where a compiler builds it, else torch",
    )  # fmt: skip
    serve.add_argument(
        "--linear-kernel", default="auto", choices=["auto", "quantized", "packed", "torch"],
        help="auto: quantized (C++ kernel on the GGUF's quantized blocks) where a compiler "
        "builds it, else torch",
    )  # fmt: skip
    from router.server import add_front_door_arguments

    add_front_door_arguments(serve)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # its own parser: `tandem bench run|compare ...`
        from benchmarks.serving.cli import main as bench_main

        return bench_main(argv[1:])
    if argv[:1] == ["config"]:
        return _config(argv[1:])
    if argv[:1] == ["status"]:
        from cluster.status import main as status_main

        return status_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args, argv[1:])
    try:
        engine = LLMEngine(EngineConfig(model=args.model, dtype=resolve_dtype(args.dtype)))
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
        )
        if args.command == "chat":
            prompt = apply_chat_template(engine.tokenizer, [{"role": "user", "content": args.text}])
        else:
            prompt = engine.tokenizer.encode(args.text)
        _stream(engine, engine.add_request(prompt, params))
    except TandemError as error:
        print(f"tandem: {error}", file=sys.stderr)
        return 2
    return 0


def _config(argv: list[str]) -> int:
    if argv[:1] != ["check"]:
        print("usage: tandem config check [--schema] FILE...", file=sys.stderr)
        return 2
    from cluster.config_apply import config_check_main

    return config_check_main(argv[1:])


def _serve_settings(args: argparse.Namespace, argv: list[str]) -> tuple[Any, Any, dict[str, Any]]:
    """The config, the deployment's options and serve()'s arguments: the --config file
    (or the defaults), with the flags given on the command line put over it."""
    from cluster.config import ConfigError, TandemConfig, apply_overrides, load_config
    from cluster.config_apply import (
        FLAG_PATHS,
        deployment_options,
        overrides_from_flags,
        serve_options,
    )

    config = load_config(args.config) if args.config else TandemConfig()
    given = _flags_given(argv)
    try:
        config = apply_overrides(config, overrides_from_flags(given))
    except ConfigError as error:  # name the flag, not the field it sets
        flags = {
            p: f"--{dest.replace('_', '-')}" for dest in given for p in FLAG_PATHS.get(dest, ())
        }
        problems = [problem.split(": ", 2) for problem in error.problems]
        named = [f"{flags.get(p[1], p[1])}: {p[-1]}" for p in problems]
        raise ConfigError(list(dict.fromkeys(named))) from None  # a flag may set two fields
    front_door = serve_options(config)
    front_door["api_keys"] = [*args.api_key, *front_door["api_keys"]]
    return config, deployment_options(config, source=args.config or "flags"), front_door


def _flags_given(argv: list[str]) -> dict[str, Any]:
    """{dest: value} for the serve flags on the command line, and no others."""
    parser = argparse.ArgumentParser(add_help=False)
    _add_serve_arguments(parser)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return vars(parser.parse_args(argv))


def _serve(args: argparse.Namespace, argv: list[str]) -> int:
    import logging

    from cluster.deployment import Deployment
    from router.server import run, serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        config, options, front_door = _serve_settings(args, argv)
    except (ValueError, OSError) as error:  # ConfigError is a ValueError
        print(f"tandem serve: {error}", file=sys.stderr)
        return 2
    deployment = Deployment(options)
    # Until the router serves, SIGTERM stops like Ctrl-C: workers down, then exit; once it
    # serves, SIGTERM drains it first (router.server.serve).
    signal.signal(signal.SIGTERM, _interrupt)
    # A shell starts background jobs (`tandem serve &`, nohup) with SIGINT ignored, and
    # Python keeps it so; then Ctrl-C or kill -INT would never stop the server.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1: every stack
    try:
        addresses = deployment.start()
        router = config.router
        run(
            serve(
                addresses,
                router.host,
                router.http_port,
                router.grpc_port,
                handle_sigterm=True,  # drains first: see router.server
                **front_door,
            )
        )
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # stopping already
    except KeyboardInterrupt:
        pass
    except Exception as error:
        print(f"tandem serve: {error}", file=sys.stderr)
        return 1
    finally:
        deployment.stop()
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _stream(engine: LLMEngine, request_id: str) -> None:
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.request_id == request_id:
                sys.stdout.write(output.new_text)
                sys.stdout.flush()
    sys.stdout.write("\n")


if __name__ == "__main__":
    sys.exit(main())
