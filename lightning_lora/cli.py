"""The `lightning-lora` command: one entry point for every subcommand.

    lightning-lora fit|validate|test|predict ...   LightningCLI (see `lightning_lora.lightning_cli`)
    lightning-lora export CKPT OUT_DIR             adapter-only .ckpt -> PEFT directory
    lightning-lora merge --base M --adapter A --out DIR
    lightning-lora estimate --model NAME ...       memory / parameter table

User errors print one clear line on stderr and exit with code 2 (no traceback wall).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

from lightning_lora.errors import CommandError, LoRAError

#: subcommand -> "module:function"; each function takes argv (without the subcommand) and returns an exit code
SUBCOMMANDS = {
    "export": ("lightning_lora.commands:export_main", "adapter-only .ckpt -> PEFT adapter directory"),
    "merge": ("lightning_lora.commands:merge_main", "write a merged transformers model (base + adapter)"),
    "estimate": ("lightning_lora.estimate:main", "memory and parameter table, full fine-tune vs LoRA"),
}
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


class ArgumentParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose usage errors raise `CommandError` instead of printing the usage
    and exiting, so every `lightning-lora` subcommand reports them the same way (one line, exit 2).

    Example:
        >>> p = ArgumentParser(prog="lightning-lora x"); _ = p.add_argument("--r", type=int)
        >>> p.parse_args(["--r", "two"])
        Traceback (most recent call last):
        lightning_lora.errors.CommandError: argument --r: invalid int value: 'two' (see lightning-lora x --help)
    """

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CommandError(f"{message} (see {self.prog} --help)")


def one_line(err: BaseException) -> str:
    """An exception's message on one line (whitespace collapsed; a KeyError without its quotes).

    Example:
        >>> one_line(KeyError("no  such key"))
        'no such key'
    """
    raw = str(err.args[0]) if isinstance(err, KeyError) and len(err.args) == 1 else str(err)
    return " ".join(raw.split()) or type(err).__name__


def user_error(err: BaseException) -> BaseException | None:
    """`err` if it is the user's to fix (a `LoRAError` or an `OSError` such as a missing or unwritable
    path), else the first such error chained behind it (`raise ... from err`, as jsonargparse does for
    an exception raised in a class's `__init__`), else None.

    Example:
        >>> user_error(LoRAError("bad")) is not None, user_error(RuntimeError("bug"))
        (True, None)
    """
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, (LoRAError, OSError)):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def run_guarded(prog: str, body: Callable[[], Any]) -> int:
    """Run `body()` and turn how it ended into an exit code: 0 when it returns; a `SystemExit`'s code
    (`--help` is 0, a plain argparse usage error 2); a user error (`user_error`) is printed as
    `PROG: error: MESSAGE`, one line on stderr, and gives 2; anything else is a bug and propagates
    with its traceback.

    Example:
        >>> run_guarded("demo", lambda: print("hi"))
        hi
        0
        >>> def bad() -> None:
        ...     raise CommandError("no such file")
        >>> run_guarded("demo", bad)   # prints "demo: error: no such file" on stderr
        2
    """
    try:
        body()
    except SystemExit as exit_:
        return int(exit_.code) if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    except Exception as err:
        cause = user_error(err)
        if cause is None:
            raise
        print(f"{prog}: error: {one_line(cause)}", file=sys.stderr)
        return 2
    return 0


def run_command(prog: str, parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                body: Callable[[argparse.Namespace], Any]) -> int:
    """Parse `argv` and run `body(args)`; returns the exit code (see `run_guarded`).

    `--help` returns 0; a usage error or a user error (`user_error`) prints `PROG: error: MESSAGE` as
    one line on stderr and returns 2; anything else is a bug and propagates with its traceback.

    Example:
        >>> p = ArgumentParser(prog="demo"); _ = p.add_argument("n", type=int)
        >>> run_command("demo", p, ["3"], lambda args: print(args.n * 2))
        6
        0
    """
    return run_guarded(prog, lambda: body(parser.parse_args(list(sys.argv[1:] if argv is None else argv))))


def _usage() -> str:
    lines = ["usage: lightning-lora {fit,validate,test,predict,export,merge,estimate} ...", "",
             "LoRA fine-tuning for PyTorch Lightning.", "", "subcommands:"]
    lines += [f"  {name:<10} LightningCLI {name} (e.g. lightning-lora {name} --config configs/quickstart.yaml)"
              for name in LIGHTNING_SUBCOMMANDS]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run `lightning-lora SUBCOMMAND --help` for the options of one."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lightning-lora` console script; `argv` None reads the command line.

    Example:
        >>> main(["merge", "--help"])   # doctest: +ELLIPSIS
        usage: lightning-lora merge ...
        0
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command in LIGHTNING_SUBCOMMANDS:
        from lightning_lora.lightning_cli import run_lightning_cli

        # from the command line LightningCLI reads sys.argv itself (given both, Lightning warns)
        return run_lightning_cli(None if argv is None else args)
    if command not in SUBCOMMANDS:
        print(f"lightning-lora: error: unknown subcommand {command!r}; expected one of "
              f"{', '.join((*LIGHTNING_SUBCOMMANDS, *SUBCOMMANDS))} (see lightning-lora --help)", file=sys.stderr)
        return 2
    module, func = SUBCOMMANDS[command][0].split(":")
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
