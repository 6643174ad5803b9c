"""The `tandem` command line.

    tandem generate "Once upon a time" --max-tokens 64
    tandem chat "What is the capital of France?"
    tandem serve [--mode disaggregated|colocated] [--prefill-instances N] [--decode-instances N]

generate and chat run one engine in this process and stream the text. serve starts
the state store, the workers (Ray actors, or local processes with --launcher local)
and the router: OpenAI HTTP on 127.0.0.1:8000 and gRPC on 127.0.0.1:50051.
"""

from __future__ import annotations

import argparse
import faulthandler
import signal
import sys
from collections.abc import Sequence

from engine.config import SUPPORTED_DTYPES, EngineConfig
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
        sub.add_argument("--dtype", default="bfloat16", choices=sorted(SUPPORTED_DTYPES))
        sub.add_argument("--max-tokens", type=int, default=128)
        sub.add_argument("--temperature", type=float, default=0.0)
        sub.add_argument("--top-p", type=float, default=1.0)
        sub.add_argument("--seed", type=int, default=None)
    _add_serve(commands)
    commands.add_parser(
        "bench", help="serving benchmark: `tandem bench run|compare --help`", add_help=False
    )
    return parser


def _add_serve(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser("serve", help="serve the model over OpenAI HTTP and gRPC")
    serve.add_argument("--model", default=None, help="as for generate (default: SmolLM2)")
    serve.add_argument("--dtype", default="bfloat16", choices=sorted(SUPPORTED_DTYPES))
    serve.add_argument("--mode", default="disaggregated", choices=["disaggregated", "colocated"])
    serve.add_argument("--prefill-instances", type=int, default=1)
    serve.add_argument("--decode-instances", type=int, default=1)
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
    from router.server import add_front_door_arguments

    add_front_door_arguments(serve)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # its own parser: `tandem bench run|compare ...`
        from benchmarks.serving.cli import main as bench_main

        return bench_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    try:
        engine = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype))
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


def _serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from cluster.deployment import Deployment, DeploymentOptions
    from router.server import front_door_options, serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        options = DeploymentOptions(
            mode=args.mode,
            prefill_instances=args.prefill_instances,
            decode_instances=args.decode_instances,
            model=args.model,
            dtype=args.dtype,
            launcher=args.launcher,
            ray_address=args.ray_address,
            host=args.host,
            threads_per_worker=args.threads_per_worker,
            cpus_per_worker=args.cpus_per_worker,
            max_num_batched_tokens=args.max_num_batched_tokens,
            kv_cache_memory_bytes=int(args.kv_cache_gb * (1 << 30)),
            attention_backend=args.attention_backend,
        )
        front_door = front_door_options(args)
    except (ValueError, OSError) as error:
        print(f"tandem serve: {error}", file=sys.stderr)
        return 2
    deployment = Deployment(options)
    signal.signal(signal.SIGTERM, _interrupt)  # stop like Ctrl-C: workers down, then exit
    # A shell starts background jobs (`tandem serve &`, nohup) with SIGINT ignored, and
    # Python keeps it so; then Ctrl-C or kill -INT would never stop the server.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1: every stack
    try:
        addresses = deployment.start()
        asyncio.run(serve(addresses, args.host, args.http_port, args.grpc_port, **front_door))
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
