"""Each supported family loads from safetensors and matches transformers token for token.

Tiny random models (saved with transformers' own save_pretrained) cover what SmolLM2
does not: q/k/v bias (Qwen2), Mistral, untied embeddings, and RoPE scaling variants.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from engine.errors import ModelNotFoundError, UnsupportedModelError
from tandem import LLM, SamplingParams
from tests.conftest import hf_greedy

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
)
FAMILIES = {
    "llama": lambda v: LlamaConfig(vocab_size=v, tie_word_embeddings=False, **TINY),
    "llama3-rope": lambda v: LlamaConfig(
        vocab_size=v,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
        **TINY,
    ),
    "linear-rope": lambda v: LlamaConfig(
        vocab_size=v, rope_scaling={"rope_type": "linear", "factor": 2.0}, **TINY
    ),
    "mistral": lambda v: MistralConfig(vocab_size=v, sliding_window=None, **TINY),
    "qwen2": lambda v: Qwen2Config(vocab_size=v, tie_word_embeddings=True, **TINY),
    "qwen2-yarn": lambda v: Qwen2Config(
        vocab_size=v,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512},
        **TINY,
    ),
}


def save_random_model(config, tokenizer, path) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random biases, so a loader that drops them is caught
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_matches_transformers(family, tokenizer, prompts, tmp_path):
    config = FAMILIES[family](len(tokenizer))
    save_random_model(config, tokenizer, tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    batch = [prompts[i] for i in (0, 3, 7, 10, 12)]  # 1 to 900 tokens
    expected = [hf_greedy(reference, p, 16) for p in batch]
    llm = LLM(str(tmp_path), dtype="float32", max_num_batched_tokens=128)
    outputs = llm.generate(batch, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    assert [o.token_ids[: len(e)] for o, e in zip(outputs, expected)] == expected


def test_safetensors_export_of_the_default_model_matches_its_gguf(
    model_path, tokenizer, prompts, tmp_path
):
    model = AutoModelForCausalLM.from_pretrained(
        str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32
    )
    model.hf_quantizer = None  # the weights are dequantized already; only the record remains
    del model.config.quantization_config
    model.save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path)
    params = SamplingParams(max_tokens=12, temperature=0)
    from_gguf = LLM(None, dtype="float32").generate(prompts[:6], params)
    from_dir = LLM(str(tmp_path), dtype="float32").generate(prompts[:6], params)
    assert [o.token_ids for o in from_dir] == [o.token_ids for o in from_gguf]


def test_missing_model_says_what_is_supported(tmp_path):
    with pytest.raises(ModelNotFoundError, match="safetensors"):
        LLM(str(tmp_path / "nope"))
    with pytest.raises(ModelNotFoundError, match="no loadable model"):
        LLM(str(tmp_path))


def test_unsupported_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UnsupportedModelError, match=r"'gpt2'.*llama, mistral, qwen2"):
        LLM(str(tmp_path))


def test_weights_without_safetensors_are_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(UnsupportedModelError, match=r"no \*\.safetensors"):
        LLM(str(tmp_path))
