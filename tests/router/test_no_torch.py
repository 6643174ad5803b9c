from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_router_imports_neither_torch_nor_transformers() -> None:
    code = (
        "import sys, pkgutil, importlib, router\n"
        "for m in pkgutil.iter_modules(router.__path__):\n"
        "    importlib.import_module('router.' + m.name)\n"
        "heavy = sorted(n for n in ('torch', 'transformers') if n in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
