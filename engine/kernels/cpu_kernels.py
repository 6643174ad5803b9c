"""tandem's C++ CPU kernels: built once per machine with the installed torch, then cached.

The sources in `csrc/` are compiled by torch's extension builder (ninja and the
system's C++ compiler) with `-O3 -march=native`, into a directory under
TANDEM_CACHE_DIR named by a hash of the sources, the torch version and the
CPU's flags, so a changed source, torch or CPU gets its own build. Loading
registers the operators under `torch.ops.tandem`.

    python -c "from engine.kernels import cpu_kernels; cpu_kernels.build()"
                                   # build now, as scripts/install.sh does
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from functools import cache
from pathlib import Path

import torch

from engine import envs

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc"
SOURCES = [
    _CSRC / "decode_attention.cpp",
    _CSRC / "fused_ops.cpp",
    _CSRC / "packed_linear.cpp",
    _CSRC / "prefill_attention.cpp",
]
HEADERS = [
    _CSRC / "bf16_pairs.h",
    _CSRC / "decode_attention.h",
    _CSRC / "decode_attention_avx512.h",
    _CSRC / "parallel_dynamic.h",
    _CSRC / "tile_linear.h",
]
# -fopenmp: ATen's parallel_for is an OpenMP pragma in its header; without it, it runs serially.
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp"]


class KernelBuildError(RuntimeError):
    """The C++ kernels could not be built; the message says what is missing."""


def compiler_available() -> bool:
    return shutil.which("c++") is not None or shutil.which("g++") is not None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return ""


def cpu_has(flag: str) -> bool:
    """Whether /proc/cpuinfo lists `flag` (e.g. "amx_bf16") for this CPU."""
    return flag in _cpu_flags().split()


def _build_key() -> str:
    digest = hashlib.sha256()
    for source in SOURCES + HEADERS:
        digest.update(source.read_bytes())
    digest.update(torch.__version__.encode())
    digest.update(" ".join(_FLAGS).encode())
    digest.update(_cpu_flags().encode())
    return digest.hexdigest()[:16]


@cache
def load() -> None:
    """Builds (first time on this machine) and loads the kernels into torch.ops.tandem."""
    if not compiler_available():
        raise KernelBuildError(
            "no C++ compiler found (c++ or g++) to build tandem's CPU kernels; install one "
            "(Debian: apt install g++) or choose --attention-backend torch"
        )
    from torch.utils import cpp_extension  # imports setuptools: only when building

    build_dir = envs.cache_dir() / "kernels" / _build_key()
    build_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        cpp_extension.load(
            name="tandem_cpu_kernels",
            sources=[str(s) for s in SOURCES],
            extra_cflags=_FLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )
    except (RuntimeError, OSError) as exc:
        raise KernelBuildError(
            f"building tandem's CPU kernels in {build_dir} failed ({exc}); "
            "check that ninja (pip install ninja) and a C++ compiler work, "
            "or choose --attention-backend torch"
        ) from exc
    logger.info("CPU kernels ready in %.1f s (%s)", time.monotonic() - started, build_dir)


def build() -> None:
    """load(), saying how long it took: for install scripts."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    load()
