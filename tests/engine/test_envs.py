"""Environment settings: an empty TANDEM_CACHE_DIR is the default, not the working directory
(kernels built there would land in whatever folder the command ran from)."""

from __future__ import annotations

from pathlib import Path

from engine import envs


def test_cache_dir_is_the_variable_or_the_default_when_unset_or_empty(monkeypatch, tmp_path):
    default = Path.home() / ".cache" / "tandem"
    monkeypatch.delenv("TANDEM_CACHE_DIR", raising=False)
    assert envs.cache_dir() == default
    monkeypatch.setenv("TANDEM_CACHE_DIR", "")
    assert envs.cache_dir() == default
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path))
    assert envs.cache_dir() == tmp_path
