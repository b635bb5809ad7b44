"""The `lightning-lora` command: one entry point for every subcommand.

    lightning-lora fit|validate|test|predict ...   LightningCLI (see `lightning_lora.lightning_cli`)
    lightning-lora export CKPT OUT_DIR             adapter-only .ckpt -> PEFT directory
    lightning-lora merge --base M --adapter A --out DIR
    lightning-lora estimate --model NAME ...       memory / parameter table

User errors print one clear line on stderr and exit with code 2 (no traceback wall): the shared runner
(`ArgumentParser`, `run_command`, `run_guarded`, `user_error`) lives in `lightning_lora.command_line` and is
importable from here too. The subcommands are imported when they run (start-up time of the command).
"""

from __future__ import annotations

import importlib
import sys

from lightning_lora.command_line import (
    LIGHTNING_SUBCOMMANDS,
    ArgumentParser,
    one_line,
    run_command,
    run_guarded,
    user_error,
)

#: subcommand -> "module:function"; each function takes argv (without the subcommand) and returns an exit code
SUBCOMMANDS = {
    "export": ("lightning_lora.commands:export_main", "adapter-only .ckpt -> PEFT adapter directory"),
    "merge": ("lightning_lora.commands:merge_main", "write a merged transformers model (base + adapter)"),
    "estimate": ("lightning_lora.estimate:main", "memory and parameter table, full fine-tune vs LoRA"),
}


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


__all__ = ["LIGHTNING_SUBCOMMANDS", "SUBCOMMANDS", "ArgumentParser", "main", "one_line", "run_command", "run_guarded",
           "user_error"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
