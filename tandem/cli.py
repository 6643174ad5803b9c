"""The `tandem` command line.

    tandem generate "Once upon a time" --max-tokens 64
    tandem chat "What is the capital of France?"

Both stream the text as it is generated. `tandem serve` arrives with the data plane.
"""

from __future__ import annotations

import argparse
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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


def _stream(engine: LLMEngine, request_id: str) -> None:
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.request_id == request_id:
                sys.stdout.write(output.new_text)
                sys.stdout.flush()
    sys.stdout.write("\n")


if __name__ == "__main__":
    sys.exit(main())
