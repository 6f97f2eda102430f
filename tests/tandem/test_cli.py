"""The `tandem` command: dispatch, one-line errors with exit codes, and --help."""

from __future__ import annotations

import pytest

from tandem.cli import COMMANDS, main


def test_help_lists_every_command(capsys) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


def test_unknown_command_is_a_usage_error(capsys) -> None:
    assert main(["fly"]) == 2
    assert "unknown command 'fly'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve", "--port", "x"], "tandem serve: error: port='x' is invalid: allowed an integer"),
        (["serve", "--max-slots", "4"], "tandem serve: error: bundle is not set"),
        (["--log-level", "WARNING", "export", "dtype=fp16"], "tandem export: error: dtype="),
        (["train", "tiny", "steps=0"], "tandem train: error: steps=0 is invalid: allowed >= 1"),
    ],
    ids=["serve-bad-port", "serve-no-bundle", "export-bad-dtype", "train-bad-steps"],
)
def test_bad_input_is_one_line_and_exit_1(argv, message, capsys) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err
