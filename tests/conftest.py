"""Shared fixtures: the default model, a transformers reference on the same weights, prompts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from cluster.launcher import GCS_WAIT_VARIABLE
from engine.models.source import default_model_path

# Ray clusters the tests start themselves (and `tandem serve` subprocesses) may need more
# than Ray's default 30 s for their GCS to come up while the suite loads both cores.
os.environ.setdefault(GCS_WAIT_VARIABLE, "180")

# Text the prompts are cut from: English, code, and non-ASCII scripts and emoji.
CORPUS = [
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden press into one system. ",
    "def fibonacci(n: int) -> list[int]:\n    a, b = 0, 1\n    out = []\n    for _ in range(n):\n"
    "        out.append(a)\n        a, b = b, a + b\n    return out\n\n",
    "Grüße aus München! Ça va très bien, merci. 東京は日本の首都です。 Привет, мир! 🚀🌍✨ ",
    "SELECT name, COUNT(*) FROM orders WHERE created_at > '2024-01-01' GROUP BY name;\n",
    "Photosynthesis converts light energy into chemical energy stored in glucose. ",
    "<|im_start|>user\nExplain recursion to a five-year-old.<|im_end|>\n<|im_start|>assistant\n",
]
PROMPT_LENGTHS = [1, 2, 5, 17, 31, 64, 100, 128, 200, 333, 512, 700, 900, 1100, 1300, 1500]
NUM_REFERENCE_TOKENS = 32


@pytest.fixture(scope="session")
def model_path() -> Path:
    return default_model_path()


@pytest.fixture(scope="session")
def tokenizer(model_path: Path):
    from engine.models.source import resolve_model
    from engine.tokenizer import load_tokenizer

    return load_tokenizer(resolve_model(str(model_path)))


@pytest.fixture(scope="session")
def prompts(tokenizer) -> list[list[int]]:
    """16 prompts of 1 to 1,500 tokens, each starting from a different point of the corpus."""
    out = []
    for i, length in enumerate(PROMPT_LENGTHS):
        rotated = CORPUS[i % len(CORPUS) :] + CORPUS[: i % len(CORPUS)]
        text = "".join(rotated) * (length // 40 + 1)
        out.append(tokenizer.encode(text, add_special_tokens=False)[:length])
    assert [len(p) for p in out] == PROMPT_LENGTHS
    return out


@pytest.fixture(scope="session")
def hf_model(model_path: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32
    )
    return model.eval()


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    return out[0, len(prompt_ids) :].tolist()


@pytest.fixture(scope="session")
def reference_outputs(hf_model, prompts) -> list[list[int]]:
    """transformers' greedy continuation of each prompt, 32 tokens (or up to EOS)."""
    return [hf_greedy(hf_model, p, NUM_REFERENCE_TOKENS) for p in prompts]


@pytest.fixture(scope="session")
def engine_pair(model_path: Path):
    """Two float32 engines (chunk budget 256), a source and a destination, shared by the
    migration tests: each leaves both with no request and every block free."""
    from engine.config import EngineConfig
    from engine.engine import LLMEngine

    config = EngineConfig(model=str(model_path), dtype="float32", max_num_batched_tokens=256)
    return LLMEngine(config), LLMEngine(config)
