"""Every environment variable tandem's engine reads, in one place, all prefixed TANDEM_."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """TANDEM_CACHE_DIR: converted tokenizers and built CPU kernels (default ~/.cache/tandem;
    set but empty means the default too, not the working directory)."""
    return Path(os.environ.get("TANDEM_CACHE_DIR") or Path.home() / ".cache" / "tandem")


def num_threads() -> int | None:
    """TANDEM_NUM_THREADS: torch threads per engine (default: every core)."""
    value = os.environ.get("TANDEM_NUM_THREADS")
    return int(value) if value else None
