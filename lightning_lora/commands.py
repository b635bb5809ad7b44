"""`lightning-lora export` and `lightning-lora merge`: adapter files on the command line.

    lightning-lora export CKPT OUT_DIR [--overwrite] [--base-model NAME]
        adapter-only Lightning checkpoint -> PEFT adapter directory

    lightning-lora merge --base MODEL --adapter (CKPT|PEFT_DIR) --out OUT_DIR [--dtype bf16|fp16|fp32] [--overwrite]
        base model + adapter -> a plain transformers model directory (safetensors) and its tokenizer

User errors (missing files, an existing output directory, an adapter that does not fit) print one
line on stderr and return exit code 2; outputs are written atomically, so nothing is left behind
on error. Progress goes to stderr.

Example:
    >>> from lightning_lora.cli import main
    >>> main(["export", "checkpoints/last.ckpt", "out/adapter"])   # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from rich.console import Console

from lightning_lora.errors import CommandError, LoRAError

MERGE_DTYPES = ("fp32", "bf16", "fp16")




def _console() -> Console:
    return Console(stderr=True, highlight=False)


@contextlib.contextmanager
def _step(console: Console, text: str) -> Iterator[None]:
    """Show a spinner while `text` runs, then a check mark with the time it took."""
    start = time.perf_counter()
    with console.status(f"{text} ..."):
        yield
    console.print(f"[green]✓[/green] {text} [dim]({time.perf_counter() - start:.1f}s)[/dim]")


def _offline() -> None:
    """This tool never downloads: put huggingface_hub in offline mode for this process.

    transformers' `from_pretrained` looks for an `adapter_config.json` on the Hub even with
    `local_files_only=True` (and retries for ~25 s without a network); offline mode skips that.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    with contextlib.suppress(Exception):
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True
    with contextlib.suppress(Exception):  # our own progress display replaces transformers' bars
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    if isinstance(err, KeyError) and len(err.args) == 1:
        text = str(err.args[0])
    return text or type(err).__name__


def _run(prog: str, parser: argparse.ArgumentParser, argv: list[str] | None,
         body: Callable[[argparse.Namespace, Console], None]) -> int:
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2): argparse already printed why
        return int(exc.code) if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    console = _console()
    _offline()
    try:
        body(args, console)
    except (LoRAError, ValueError, OSError) as err:
        print(f"{prog}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    return 0


def _same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except OSError:
        return False


# ====================================================================== export
def export_parser() -> argparse.ArgumentParser:
    """The argument parser of `lightning-lora export`.

    Example:
        >>> export_parser().parse_args(["last.ckpt", "out"]).overwrite
        False
    """
    parser = argparse.ArgumentParser(
        prog="lightning-lora export",
        description="Convert an adapter-only Lightning checkpoint (written with the LoRA callback) into a PEFT "
                    "adapter directory (adapter_model.safetensors + adapter_config.json) that "
                    "peft.PeftModel.from_pretrained(base, OUT_DIR) loads.",
        epilog="example: lightning-lora export lightning_logs/version_0/checkpoints/last.ckpt out/adapter")
    parser.add_argument("ckpt", metavar="CKPT", help="adapter-only .ckpt file")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="output directory (must not exist or be empty, unless "
                                                           "--overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    parser.add_argument("--base-model", metavar="NAME", default=None,
                        help="base model written to adapter_config.json (default: the one recorded in the "
                             "checkpoint); when available offline its architecture is used to check the adapter")
    return parser


def export_main(argv: list[str] | None = None) -> int:
    """`lightning-lora export CKPT OUT_DIR [--overwrite] [--base-model NAME]`; returns the exit code.

    Example:
        >>> export_main(["last.ckpt", "out/adapter", "--base-model", "smollm2-135m-instruct"])   # doctest: +SKIP
        0
    """
    def body(args: argparse.Namespace, console: Console) -> None:
        from lightning_lora.peft_format import check_output_dir, checkpoint_to_peft

        out = Path(args.out_dir)
        if _same_path(args.ckpt, out):
            raise CommandError(f"OUT_DIR {out} is the checkpoint itself; choose another output directory.")
        check_output_dir(out.expanduser().absolute(), args.overwrite)
        if not Path(args.ckpt).is_file():
            raise CommandError(f"checkpoint {args.ckpt} does not exist or is not a file; pass the .ckpt written "
                               "with the LoRA callback.")
        with _step(console, f"Converting {args.ckpt} to a PEFT adapter"):
            checkpoint_to_peft(args.ckpt, out, overwrite=args.overwrite, base_model_name_or_path=args.base_model)
        console.print(f"Wrote PEFT adapter to [bold]{out}[/bold]")

    return _run("lightning-lora export", export_parser(), argv, body)


# ====================================================================== merge
def merge_parser() -> argparse.ArgumentParser:
    """The argument parser of `lightning-lora merge`.

    Example:
        >>> merge_parser().parse_args(["--base", "m", "--adapter", "a", "--out", "o"]).dtype
        'fp32'
    """
    parser = argparse.ArgumentParser(
        prog="lightning-lora merge",
        description="Fold a LoRA adapter into its base model and write a plain transformers model directory "
                    "(safetensors, config, tokenizer) that AutoModelForCausalLM.from_pretrained loads without "
                    "any LoRA code.",
        epilog="example: lightning-lora merge --base smollm2-135m-instruct --adapter out/adapter --out out/merged")
    parser.add_argument("--base", required=True, metavar="MODEL",
                        help="base model: a local transformers directory, a model in the local Hugging Face cache, "
                             "or the bundled name smollm2-135m-instruct (nothing is downloaded)")
    parser.add_argument("--adapter", required=True, metavar="CKPT|PEFT_DIR",
                        help="adapter-only .ckpt file, or a PEFT adapter directory")
    parser.add_argument("--out", required=True, metavar="OUT_DIR", help="output directory")
    parser.add_argument("--dtype", choices=MERGE_DTYPES, default="fp32",
                        help="dtype the base is loaded, merged and written in (default: fp32)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    return parser


def _adapter_task_type(adapter: str) -> str | None:
    from lightning_lora.peft_format import AdapterFormatError, read_adapter_config, read_checkpoint

    path = Path(adapter)
    if path.is_file():
        return read_checkpoint(path).task_type
    if path.is_dir():
        return read_adapter_config(path).get("task_type")
    raise AdapterFormatError(f"adapter {adapter} does not exist; pass an adapter-only .ckpt file or a PEFT adapter "
                             "directory.")


def merge_main(argv: list[str] | None = None) -> int:
    """`lightning-lora merge --base MODEL --adapter A --out DIR [--dtype ...] [--overwrite]`; returns the exit code.

    Loads the base with `hub.load_causal_lm`, the adapter with `peft_format.load_adapter`, merges
    with `merge_lora`, and writes `save_pretrained` output (plus the base's tokenizer, when it has
    one) atomically to DIR.

    Example:
        >>> merge_main(["--base", "smollm2-135m-instruct", "--adapter", "out/adapter",
        ...             "--out", "out/merged"])  # doctest: +SKIP
        0
    """
    def body(args: argparse.Namespace, console: Console) -> None:
        from lightning_lora.hub import load_causal_lm, load_tokenizer, make_serializable
        from lightning_lora.peft_format import check_output_dir, atomic_directory, load_adapter
        from lightning_lora.surgery import merge_lora

        out = Path(args.out)
        for name, value in (("--base", args.base), ("--adapter", args.adapter)):
            if _same_path(value, out) and Path(value).exists():
                raise CommandError(f"--out {out} is the same as {name}; write the merged model to another directory.")
        check_output_dir(out.expanduser().absolute(), args.overwrite)
        task_type = _adapter_task_type(args.adapter)
        if task_type not in (None, "CAUSAL_LM"):
            raise CommandError(f"adapter {args.adapter} has task_type={task_type!r}; merge writes causal language "
                               "models (task_type CAUSAL_LM). Merge it in Python with merge_lora instead.")
        with _step(console, f"Loading base model {args.base} ({args.dtype})"):
            model = load_causal_lm(args.base, dtype=args.dtype)
        with _step(console, f"Loading adapter {args.adapter}"):
            names = load_adapter(model, args.adapter)
        with _step(console, f"Merging {len(names)} adapter layers"):
            merge_lora(model)
            make_serializable(model)
        tokenizer = None
        with contextlib.suppress(Exception):  # a base without a tokenizer is fine: write the model only
            tokenizer = load_tokenizer(args.base)
        with _step(console, f"Writing merged model to {out}"):
            with atomic_directory(out, overwrite=args.overwrite) as tmp:
                model.save_pretrained(tmp)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp)
        console.print(f"Wrote merged model{' and tokenizer' if tokenizer is not None else ''} to [bold]{out}[/bold]")

    return _run("lightning-lora merge", merge_parser(), argv, body)


__all__ = ["CommandError", "export_main", "export_parser", "merge_main", "merge_parser"]
