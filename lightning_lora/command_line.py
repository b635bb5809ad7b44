"""The shared runner of every `lightning-lora` subcommand: an `ArgumentParser` whose usage errors raise
`CommandError`, and `run_command` / `run_guarded`, which turn how a command ended into an exit code (a user
error printed as one line on stderr, exit 2; a bug keeps its traceback). `lightning_lora.cli` (the dispatch),
`lightning_lora.lightning_cli` and the subcommands import it; it imports none of them.

Example:
    >>> run_guarded("demo", lambda: None)
    0
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from lightning_lora.errors import CommandError, LoRAError

#: the subcommands that LightningCLI runs (`lightning_lora.lightning_cli`)
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


__all__ = ["LIGHTNING_SUBCOMMANDS", "ArgumentParser", "one_line", "run_command", "run_guarded", "user_error"]
