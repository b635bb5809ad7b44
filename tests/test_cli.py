"""`lightning_lora.cli`: the shared runner (one line, exit 2 for user errors) and the console script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_lora.cli import (
    ArgumentParser,
    main,
    run_command,
    run_guarded,
    user_error,
)
from lightning_lora.errors import CommandError, DataFormatError, LoRAError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).with_name("lightning-lora")


def console_script(*argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="default")
    return subprocess.run([str(SCRIPT), *argv], capture_output=True, text=True, env=env, cwd=cwd, timeout=300,
                          check=False)


def test_run_guarded_prints_a_user_error_as_one_line(capsys):
    def chained() -> None:
        try:
            raise DataFormatError("train.jsonl:3: invalid JSON\n  (column 4)")
        except DataFormatError as err:
            raise ValueError("Does not validate against any of the Union subtypes") from err

    assert run_guarded("lightning-lora fit", chained) == 2
    assert capsys.readouterr().err == "lightning-lora fit: error: train.jsonl:3: invalid JSON (column 4)\n"

    def missing() -> None:
        raise FileNotFoundError(2, "No such file or directory", "out/x")

    assert run_guarded("p", missing) == 2
    assert capsys.readouterr().err == "p: error: [Errno 2] No such file or directory: 'out/x'\n"


def test_run_guarded_keeps_bugs_and_exit_codes(capsys):
    def bug() -> None:
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        run_guarded("p", bug)
    for code, expected in ((None, 0), (0, 0), (3, 3), ("usage", 2)):
        def leave(code=code) -> None:
            raise SystemExit(code)

        assert run_guarded("p", leave) == expected
    assert run_guarded("p", lambda: None) == 0


def test_run_command_usage_errors_are_one_line(capsys):
    parser = ArgumentParser(prog="lightning-lora demo")
    parser.add_argument("--n", type=int, required=True)
    assert run_command("lightning-lora demo", parser, ["--n", "x"], lambda args: None) == 2
    assert capsys.readouterr().err == ("lightning-lora demo: error: argument --n: invalid int value: 'x' "
                                       "(see lightning-lora demo --help)\n")
    assert run_command("lightning-lora demo", parser, [], lambda args: None) == 2
    assert capsys.readouterr().err == ("lightning-lora demo: error: the following arguments are required: --n "
                                       "(see lightning-lora demo --help)\n")
    assert run_command("lightning-lora demo", parser, ["--n", "2"], lambda args: print(args.n)) == 0
    assert capsys.readouterr().out == "2\n"


def test_user_error_finds_the_user_error_behind_others():
    inner = CommandError("bad")
    try:
        try:
            raise inner
        except CommandError:
            raise KeyError("wrapped")  # implicit chaining (__context__)
    except KeyError as outer:
        assert user_error(outer) is inner
    assert user_error(RuntimeError("x")) is None
    assert isinstance(user_error(LoRAError("y")), LoRAError)


def test_main_usage_and_unknown_subcommand(capsys):
    assert main([]) == 2
    assert capsys.readouterr().out.startswith("usage: lightning-lora {fit,validate,test,predict,export,merge,estimate}")
    assert main(["--help"]) == 0
    assert main(["fitt", "--config", "x.yaml"]) == 2
    assert capsys.readouterr().err == ("lightning-lora: error: unknown subcommand 'fitt'; expected one of fit, validate, "
                                       "test, predict, export, merge, estimate (see lightning-lora --help)\n")


@pytest.mark.integration
def test_console_script_prints_no_args_and_argv_warning():
    """Every `lightning-lora` run used to print Lightning's warning that LightningCLI got both `args` and `sys.argv`."""
    proc = console_script("fit", "--config", "configs/quickstart.yaml", "--print_config")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "class_path: lightning_lora.data.InstructionDataModule" in proc.stdout


@pytest.mark.integration
def test_console_script_yaml_typo_is_exactly_one_line(tmp_path):
    (tmp_path / "typo.yaml").write_text(
        "model:\n  class_path: lightning_lora.tasks.CausalLM\n"
        "data:\n  class_path: lightning_lora.data.InstructionDataModule\n  init_args:\n    max_lenght: 32\n")
    proc = console_script("fit", "--config", str(tmp_path / "typo.yaml"))
    assert proc.returncode == 2
    assert proc.stderr == ("lightning-lora fit: error: data.init_args.max_lenght is not an option of "
                           "lightning_lora.data.InstructionDataModule; did you mean max_length? "
                           "(see lightning-lora fit --help)\n")
    assert proc.stdout == ""
