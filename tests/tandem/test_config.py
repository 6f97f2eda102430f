"""The config layer: presets/files + `key=value`, flags as aliases, one error format."""

from __future__ import annotations

import dataclasses
from typing import Literal

import pytest

from tandem.config import check_choices, load_config, parse_command_line
from tandem.serve.__main__ import FLAGS as SERVE_FLAGS
from tandem.serve.config import ServeConfig
from tandem.train.export import FLAGS as EXPORT_FLAGS
from tandem.train.export import ExportConfig


def serve_cfg(*argv: str) -> ServeConfig:
    return parse_command_line(
        ServeConfig, argv, prog="tandem serve", description="", flags=SERVE_FLAGS
    )


def test_flags_items_and_set_all_reach_the_same_keys() -> None:
    cfg = serve_cfg("--bundle", "b", "--port", "0", "max_len=64", "--set", "stream_interval=4")
    assert (cfg.bundle, cfg.port, cfg.max_len, cfg.stream_interval) == ("b", 0, 64, 4)
    assert serve_cfg("max_slots=2", "--max-slots", "5").max_seqs == 5  # the flag comes later


def test_config_file_then_overrides(tmp_path) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text("max_slots: 3\nport: 7000\nbundle: from-file\n")
    cfg = serve_cfg(str(path), "port=7001")
    assert (cfg.max_seqs, cfg.port, cfg.bundle) == (3, 7001, "from-file")
    assert serve_cfg("--config", str(path)).port == 7000


def test_string_fields_keep_the_text_as_typed() -> None:
    """YAML would read `2024` as an int and `1.50` as 1.5; a str field keeps the text."""
    cfg = serve_cfg("--bundle", "2024", "token_file=1.50")
    assert (cfg.bundle, cfg.token_file) == ("2024", "1.50")
    assert serve_cfg("metrics_port=null").metrics_port is None
    assert serve_cfg("host=''", 'bundle="a b"').bundle == "a b"  # YAML quotes still apply
    assert serve_cfg("host=''").host == ""


def test_switch_flags_set_their_value() -> None:
    argv = ["--checkpoint", "runs/x", "--out", "007", "--overwrite", "--dtype", "float32"]
    cfg = parse_command_line(
        ExportConfig, argv, prog="tandem export", description="", flags=EXPORT_FLAGS
    )
    assert (cfg.out, cfg.overwrite, cfg.dtype) == ("007", True, "float32")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "abc"], "port='abc' is invalid: allowed an integer"),
        (["--port", "70000"], "port=70000 is invalid: allowed 0..65535"),
        (["mode=fast"], "mode='fast' is invalid: allowed one of ('continuous', 'static')"),
        (["max_slot=4"], "unknown config key 'max_slot' for ServeConfig: allowed keys are"),
        (["tls_cert=c.pem"], "tls_key='' is invalid"),
        (["a.yaml", "oops"], "expected key=value after CONFIG, got 'oops'"),
        (["--max-seqs", "0"], "max_seqs=0 is invalid: allowed >= 1"),
        (["--page-size", "-1"], "page_size=-1 is invalid: allowed >= 1 (0 = the engine's"),
        (
            ["--kv-cache-tokens", "16", "--page-size", "16"],
            "kv_cache_tokens=16 is invalid: allowed 0 (derive) or >= 2",
        ),
        (
            ["--max-seqs", "64", "--max-num-batched-tokens", "32"],
            "max_num_batched_tokens=32 is invalid: allowed >= max_seqs (64)",
        ),
        (["--set", "enable_prefix_caching=maybe"], "enable_prefix_caching='maybe' is invalid"),
    ],
    ids=[
        "not-an-int", "range", "literal", "unknown-key", "tls-pair", "loose-word",
        "max-seqs", "page-size", "kv-cache-tokens", "batched-tokens", "prefix-caching",
    ],
)  # fmt: skip
def test_bad_values_name_the_key_and_what_is_allowed(argv, message) -> None:
    with pytest.raises(ValueError) as err:
        serve_cfg(*argv)
    assert message in str(err.value)


def test_max_slots_is_another_spelling_of_max_seqs(tmp_path) -> None:
    """The older key keeps working wherever keys are written; of two spellings on the
    command line the later wins, as with any repeated key."""
    assert serve_cfg("--max-slots", "3").max_seqs == 3
    assert serve_cfg("max_seqs=2", "max_slots=5").max_seqs == 5
    assert serve_cfg("max_slots=5", "--max-seqs", "2").max_seqs == 2
    path = tmp_path / "old.yaml"
    path.write_text("max_slots: 6\n")
    assert serve_cfg(str(path)).max_seqs == 6
    path.write_text("max_slots: 6\nmax_seqs: 7\n")
    with pytest.raises(ValueError, match="max_slots and max_seqs are one key: give only max_seqs"):
        serve_cfg(str(path))


def test_paged_cache_keys_and_flags() -> None:
    cfg = serve_cfg(
        "--kv-cache-tokens", "4096", "--page-size", "32", "--max-num-batched-tokens", "256",
        "--no-prefix-caching", "--no-async-scheduling",
    )  # fmt: skip
    assert (cfg.kv_cache_tokens, cfg.page_size, cfg.max_num_batched_tokens) == (4096, 32, 256)
    assert (cfg.enable_prefix_caching, cfg.num_pages, cfg.async_scheduling) == (False, 128, False)
    assert ServeConfig().enable_prefix_caching and ServeConfig().async_scheduling
    assert serve_cfg("--async-scheduling").async_scheduling  # the flag vLLM users type


def test_unknown_flag_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as err:
        serve_cfg("--max-slot", "4")
    assert err.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_literal_fields_are_checked_when_built_in_code_too() -> None:
    @dataclasses.dataclass(frozen=True)
    class Cfg:
        kind: Literal["a", "b"] = "a"
        maybe: Literal["x"] | None = None

        def __post_init__(self) -> None:
            check_choices(self)

    assert Cfg(maybe=None).kind == "a"
    with pytest.raises(ValueError, match=r"kind='c' is invalid: allowed one of \('a', 'b'\)"):
        Cfg(kind="c")
    with pytest.raises(ValueError, match="maybe='y' is invalid"):
        Cfg(maybe="y")
    with pytest.raises(ValueError, match="mode='x' is invalid"):
        ServeConfig(mode="x")  # type: ignore[arg-type]
    assert load_config(Cfg, {}, ["kind=b"]).kind == "b"
