"""python -m router --workers HOST:PORT[,HOST:PORT...] [--http-port 8000] [--grpc-port 50051]"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Sequence
from dataclasses import replace

from router.errors import RouterError
from router.server import add_front_door_arguments, front_door_options, run, serve


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m router", description="tandem's router: OpenAI HTTP and gRPC APIs."
    )
    parser.add_argument("--workers", required=True, help="comma-separated host:port of the workers")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=50051)
    parser.add_argument(
        "--connect-timeout", type=float, default=30.0, help="seconds to wait for the workers"
    )
    add_front_door_arguments(parser)
    return parser


async def _run(args: argparse.Namespace) -> None:
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    options = front_door_options(args)
    options["config"] = replace(options["config"], connect_timeout_s=args.connect_timeout)
    await serve(
        [a.strip() for a in args.workers.split(",") if a.strip()],
        args.host,
        args.http_port,
        args.grpc_port,
        **options,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        run(_run(args))
    except (KeyboardInterrupt, asyncio.CancelledError):  # Ctrl-C, SIGTERM
        pass
    except (RouterError, OSError, ValueError) as e:
        logging.getLogger("router").error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
