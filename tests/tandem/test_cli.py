"""The command line's settings: `tandem serve --config FILE` with flags over it,
`tandem config check`, and what `--dtype auto` picks."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.config import ConfigError
from engine.config import resolve_dtype
from tandem.cli import _parser, _serve_settings, main

ROOT = Path(__file__).resolve().parents[2]


def settings(*argv: str) -> tuple:
    args = _parser().parse_args(["serve", *argv])
    return _serve_settings(args, list(argv))


def test_flags_given_win_over_the_file_and_the_rest_comes_from_it(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "mode: colocated\npools:\n  decode: {instances: 3, kv_cache_gb: 0.5}\n"
        "router: {http_port: 9000, policy: round_robin}\nmigration: {policy: balance}\n"
    )
    config, options, front_door = settings("--config", str(path), "--http-port", "9100")
    assert (options.mode, options.decode_instances) == ("colocated", 3)
    assert options.kv_cache_memory_bytes == 1 << 29
    assert (config.router.http_port, config.router.grpc_port) == (9100, 50051)
    assert type(front_door["policy"]).__name__ == "RoundRobinPolicy"
    assert front_door["config"].migration_policy == "balance"
    # A flag left at its default does not undo the file.
    config, options, _ = settings("--config", str(path), "--decode-instances", "2")
    assert (options.mode, options.decode_instances, config.router.http_port) == (
        "colocated",
        2,
        9000,
    )


def test_no_file_and_no_flag_is_the_laptop_default() -> None:
    config, options, front_door = settings()
    assert (options.prefill_instances, options.decode_instances, options.dtype) == (1, 1, "auto")
    local = ROOT / "deploy" / "local.yaml"
    file_config, file_options, _ = settings("--config", str(local))
    assert options == file_options and config == file_config
    assert type(front_door["policy"]).__name__ == "LeastLoadedPolicy"


def test_a_bad_flag_is_named_by_the_flag_and_a_bad_file_by_its_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        settings("--decode-instances", "0", "--kv-cache-gb", "-1")
    assert sorted(caught.value.problems) == [
        "--decode-instances: Input should be greater than or equal to 1 (got 0)",
        "--kv-cache-gb: Input should be greater than 0 (got -1.0)",
    ]
    path = tmp_path / "bad.yaml"
    path.write_text("router:\n  http_prot: 80\n")
    with pytest.raises(ConfigError, match=r"router\.http_prot: unknown field; did you mean"):
        settings("--config", str(path))


def test_config_check_exits_0_for_good_files_and_2_naming_the_bad_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config", "check", str(ROOT / "deploy" / "local.yaml")]) == 0
    assert "ok (disaggregated: 1 prefill + 1 decode" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("store: {kind: redis}\n")
    assert main(["config", "check", str(bad)]) == 2
    assert f"{bad}: store.url: required when kind is redis" in capsys.readouterr().err
    assert main(["config", "lint"]) == 2


def test_dtype_auto_is_bfloat16_only_where_the_cpu_computes_in_it() -> None:
    assert resolve_dtype("auto", "flags : fpu avx2 avx512f avx512_bf16") == "bfloat16"
    assert resolve_dtype("auto", "flags : fpu avx2 amx_bf16 amx_tile") == "bfloat16"
    assert resolve_dtype("auto", "flags : fpu avx2 fma") == "float32"
    assert resolve_dtype("float32", "flags : avx512_bf16") == "float32"
