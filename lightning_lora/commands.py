"""`lightning-lora export` and `lightning-lora merge`: adapter files on the command line.

    lightning-lora export CKPT OUT_DIR [--overwrite] [--base-model NAME]
        adapter-only Lightning checkpoint -> PEFT adapter directory

    lightning-lora export CKPT_OR_ADAPTER OUT_DIR --format gguf [--outtype f32|f16|bf16] [--base-model NAME]
        adapter-only checkpoint or PEFT adapter directory -> llama.cpp's LoRA-adapter GGUF (OUT_DIR/adapter.<outtype>.gguf)

    lightning-lora merge --base MODEL --adapter (CKPT|PEFT_DIR) --out OUT_DIR [--dtype bf16|fp16|fp32] [--overwrite]
        base model + adapter -> a plain transformers model directory (safetensors) and its tokenizer
        [--format gguf --outtype f32|f16|bf16|q8_0]: one llama.cpp GGUF file (OUT_DIR/model.<outtype>.gguf) with the
        tokenizer and chat template, and an Ollama Modelfile next to it

Before either command reports success it checks that what it wrote is usable as it claims, inside
the temporary directory that is then renamed into place (`lightning_lora.commands_checks`): an exported
adapter loads onto the base model its `adapter_config.json` names (that architecture built on the meta device, when it is
available: local, cached or fetched) and holds exactly the checkpoint's tensors; a merged model reloads with
`AutoModelForCausalLM.from_pretrained` and computes the same finite logits as the merged model in
memory (a GGUF: it reloads with `from_pretrained(gguf_file=...)`, computes the merged model's logits within
the cosine threshold of its outtype and encodes text as the original tokenizer; an adapter GGUF: its
pairs are named and shaped as the base GGUF's tensors and give the adapter's update). User errors (missing files, an existing output directory, an adapter that does not fit, an
output that fails its check) print one line on stderr and return exit code 2, and nothing is left
behind. Progress goes to stderr.

Example:
    >>> from lightning_lora.cli import main
    >>> main(["export", "checkpoints/last.ckpt", "out/adapter"])   # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from lightning_lora._io import atomic_directory, check_output_dir
from lightning_lora.checkpoint import is_sharded_checkpoint
from lightning_lora.command_line import ArgumentParser, one_line, run_command
from lightning_lora.commands_checks import _first_line, merged_logits, verify_export, verify_merged
from lightning_lora.errors import AdapterFormatError, CommandError, LoRAError, listed
from lightning_lora.gguf_export import (
    check_adapter_gguf,
    check_input_ids,
    check_writable,
    reference_logits,
    require_gguf,
    verify_model_gguf,
    write_adapter_gguf,
    write_model_gguf,
    write_modelfile,
)
from lightning_lora.hub import (
    BUNDLED_MODELS,
    bundled_gguf,
    load_causal_lm,
    load_tokenizer,
    locate_model,
    make_serializable,
    meta_model,
)
from lightning_lora.peft_format import checkpoint_to_peft, load_adapter, read_adapter_config, read_checkpoint
from lightning_lora.surgery import merge_and_unload

MERGE_DTYPES = ("fp32", "bf16", "fp16")
MERGE_FORMATS = ("hf", "gguf")
EXPORT_FORMATS = ("peft", "gguf")
GGUF_OUTTYPES = ("f32", "f16", "bf16", "q8_0")
ADAPTER_GGUF_OUTTYPES = ("f32", "f16", "bf16")


def _console() -> Console:
    return Console(stderr=True, highlight=False)


@contextlib.contextmanager
def _step(console: Console, text: str) -> Iterator[None]:
    """Show a spinner while `text` runs, then a check mark with the time it took."""
    start = time.perf_counter()
    with console.status(f"{text} ..."):
        yield
    console.print(f"[green]✓[/green] {text} [dim]({time.perf_counter() - start:.1f}s)[/dim]")


def _quiet_transformers() -> None:
    """Our own progress display replaces transformers' bars (huggingface_hub's download bars stay)."""
    with contextlib.suppress(Exception):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except OSError:
        return False


def _check_output(out: Path, overwrite: bool) -> None:
    """`_io.check_output_dir` with its `FileExistsError` as a `CommandError` (same message)."""
    try:
        check_output_dir(out.expanduser().absolute(), overwrite)
    except FileExistsError as err:
        raise CommandError(str(err)) from None


# ====================================================================== export
def export_parser() -> argparse.ArgumentParser:
    """The argument parser of `lightning-lora export`.

    Example:
        >>> export_parser().parse_args(["last.ckpt", "out"]).overwrite
        False
    """
    parser = ArgumentParser(
        prog="lightning-lora export",
        description="Convert an adapter-only Lightning checkpoint (written with the LoRA callback) into a PEFT "
                    "adapter directory (adapter_model.safetensors + adapter_config.json) that "
                    "peft.PeftModel.from_pretrained(base, OUT_DIR) loads, or with --format gguf (also from a PEFT "
                    "directory) into llama.cpp's LoRA-adapter GGUF. The result is checked to load onto the "
                    "base model it names before the command reports success.",
        epilog="example: lightning-lora export lightning_logs/version_0/checkpoints/last.ckpt out/adapter")
    parser.add_argument("ckpt", metavar="CKPT", help="adapter-only .ckpt file, or the distributed checkpoint "
                                                     "directory of an FSDP run (with --format gguf also a PEFT "
                                                     "adapter directory)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="output directory (must not exist or be empty, unless "
                                                           "--overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    parser.add_argument("--base-model", metavar="NAME", default=None,
                        help="base model written to adapter_config.json (default: the one recorded in the "
                             "checkpoint); when its config.json is available (local, cached or fetched) its "
                             "architecture is used to check the adapter")
    parser.add_argument("--format", choices=EXPORT_FORMATS, default="peft",
                        help="peft: a PEFT adapter directory (default); gguf: llama.cpp's LoRA-adapter GGUF "
                             "(OUT_DIR/adapter.<outtype>.gguf, for llama-server --lora / Ollama's ADAPTER)")
    parser.add_argument("--outtype", choices=ADAPTER_GGUF_OUTTYPES, default=None,
                        help="tensor type of the adapter GGUF (default: f32; with --format gguf only)")
    parser.add_argument("--base-gguf", metavar="FILE", default=None,
                        help="a GGUF of the base model to check the adapter's tensor names and shapes against "
                             "(default: the bundled file for smollm2-135m-instruct, else the base model's layout)")
    return parser


def export_main(argv: list[str] | None = None) -> int:
    """`lightning-lora export CKPT OUT_DIR [--overwrite] [--base-model NAME]`; returns the exit code.

    Example:
        >>> export_main(["last.ckpt", "out/adapter", "--base-model", "smollm2-135m-instruct"])   # doctest: +SKIP
        0
    """
    def body(args: argparse.Namespace) -> None:
        console = _console()
        _quiet_transformers()
        out = Path(args.out_dir)
        if _same_path(args.ckpt, out):
            raise CommandError(f"OUT_DIR {out} is the checkpoint itself; choose another output directory.")
        _check_output(out, args.overwrite)
        _gguf_options(args, "f32", ("outtype", "base_gguf"))
        if args.format == "gguf":
            _export_gguf(args, console, out)
            return
        if not Path(args.ckpt).is_file() and not is_sharded_checkpoint(args.ckpt):
            raise CommandError(f"checkpoint {args.ckpt} does not exist or is not a file; pass the .ckpt written "
                               "with the LoRA callback.")
        with atomic_directory(out, overwrite=args.overwrite) as tmp:
            with _step(console, f"Converting {args.ckpt} to a PEFT adapter"), \
                    warnings.catch_warnings(record=True) as notes:
                warnings.simplefilter("always")
                checkpoint_to_peft(args.ckpt, tmp, overwrite=True, base_model_name_or_path=args.base_model)
            with _step(console, "Checking the adapter"):
                checked = verify_export(tmp, args.ckpt, shown_as=str(out))
            for note in notes:
                console.print(f"[yellow]note:[/yellow] {note.message}")
            console.print(f"  {checked}", soft_wrap=True)
        console.print(f"Wrote PEFT adapter to [bold]{out}[/bold]")

    return run_command("lightning-lora export", export_parser(), argv, body)


def _gguf_options(args: argparse.Namespace, default_outtype: str, options: tuple[str, ...]) -> None:
    """GGUF-only options given without `--format gguf` are an error; `--outtype` gets its default."""
    if args.format != "gguf":
        given = [f"--{name.replace('_', '-')}" for name in options if getattr(args, name, None) is not None]
        if given:
            raise CommandError(f"{', '.join(given)} only apply with --format gguf; add --format gguf, or drop them.")
    elif args.outtype is None:
        args.outtype = default_outtype


def _bundled_gguf_file(base: str | None) -> str | None:
    """The bundled GGUF file of a bundled base model name (llama.cpp's own output), else None."""
    if base is None or str(base).lower() not in BUNDLED_MODELS:
        return None
    with contextlib.suppress(LoRAError):
        return os.path.join(*bundled_gguf(str(base).lower()))
    return None


def _export_gguf(args: argparse.Namespace, console: Console, out: Path) -> None:
    """`export --format gguf`: checkpoint or PEFT directory -> OUT_DIR/adapter.<outtype>.gguf, checked."""
    require_gguf()
    source = Path(args.ckpt)
    if not source.exists():
        raise CommandError(f"adapter {args.ckpt} does not exist; pass an adapter-only .ckpt file or a PEFT adapter "
                           "directory.")
    with tempfile.TemporaryDirectory(prefix="lightning-lora-peft-") as scratch:
        if source.is_dir() and (source / "adapter_config.json").is_file():
            peft_dir = source
            base = args.base_model or read_adapter_config(peft_dir).get("base_model_name_or_path")
        else:
            with _step(console, f"Converting {args.ckpt} to a PEFT adapter"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                peft_dir = Path(scratch) / "adapter"
                checkpoint_to_peft(args.ckpt, peft_dir, overwrite=True, base_model_name_or_path=args.base_model)
            base = args.base_model or read_checkpoint(args.ckpt).base_model_name_or_path
        if not base:
            raise CommandError(f"{args.ckpt} names no base model; pass --base-model (the model the adapter was "
                               "trained on): the GGUF's tensor names come from its architecture.")
        network = meta_model(str(base))
        if network is None:
            locate_model(str(base))  # a ModelNotFoundError line when the base cannot be had (offline, gated, ...)
            raise CommandError(f"base model {base}: transformers cannot build a causal language model from its "
                               "config.json; pass --base-model naming the model the adapter was trained on.")
        base_gguf = args.base_gguf or _bundled_gguf_file(str(base))
        if base_gguf is not None and not Path(base_gguf).is_file():
            raise CommandError(f"--base-gguf {base_gguf} does not exist; pass the .gguf file of the base model.")
        with atomic_directory(out, overwrite=args.overwrite) as tmp:
            target = tmp / f"adapter.{args.outtype}.gguf"
            with _step(console, f"Writing llama.cpp LoRA adapter ({args.outtype})"):
                write_adapter_gguf(peft_dir, target, network, args.outtype, base_gguf=base_gguf)
            with _step(console, "Checking the adapter GGUF"):
                checked = check_adapter_gguf(target, peft_dir, network, base_gguf=base_gguf)
            console.print(f"  {checked}" + (f" (checked against {base_gguf})" if base_gguf else ""), soft_wrap=True)
    console.print(f"Wrote llama.cpp LoRA adapter to [bold]{out / target.name}[/bold]")


# ====================================================================== merge
def merge_parser() -> argparse.ArgumentParser:
    """The argument parser of `lightning-lora merge`.

    Example:
        >>> merge_parser().parse_args(["--base", "m", "--adapter", "a", "--out", "o"]).dtype
        'fp32'
    """
    parser = ArgumentParser(
        prog="lightning-lora merge",
        description="Fold a LoRA adapter into its base model and write a plain transformers model directory "
                    "(safetensors, config, tokenizer) that AutoModelForCausalLM.from_pretrained loads without "
                    "any LoRA code. The result is reloaded and compared with the merged model before the command "
                    "reports success.",
        epilog="example: lightning-lora merge --base smollm2-135m-instruct --adapter out/adapter --out out/merged")
    parser.add_argument("--base", required=True, metavar="MODEL",
                        help="base model: a local transformers directory, a hub id (org/name or org/name@revision; "
                             "downloaded into the Hugging Face cache on first use, HF_HUB_OFFLINE=1 and HF_TOKEN "
                             "respected), or the bundled name smollm2-135m-instruct")
    parser.add_argument("--adapter", required=True, metavar="CKPT|PEFT_DIR",
                        help="adapter-only .ckpt file, or a PEFT adapter directory")
    parser.add_argument("--out", required=True, metavar="OUT_DIR", help="output directory")
    parser.add_argument("--dtype", choices=MERGE_DTYPES, default="fp32",
                        help="dtype the base is loaded, merged and written in (default: fp32)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    parser.add_argument("--format", choices=MERGE_FORMATS, default="hf",
                        help="hf: a transformers directory (default); gguf: one llama.cpp GGUF file "
                             "(OUT_DIR/model.<outtype>.gguf, tokenizer and chat template inside) and an Ollama "
                             "Modelfile")
    parser.add_argument("--outtype", choices=GGUF_OUTTYPES, default=None,
                        help="tensor type of the GGUF (default: f16; 1-D tensors stay f32; with --format gguf only)")
    return parser


def _adapter_origin(adapter: str) -> tuple[str | None, str | None]:
    """The task type and the base model an adapter (checkpoint or PEFT directory) records."""
    path = Path(adapter)
    if path.is_file():
        ckpt = read_checkpoint(path)
        return ckpt.task_type, ckpt.base_model_name_or_path
    if path.is_dir():
        cfg = read_adapter_config(path)
        return cfg.get("task_type"), cfg.get("base_model_name_or_path") or None
    raise AdapterFormatError(f"adapter {adapter} does not exist; pass an adapter-only .ckpt file or a PEFT adapter "
                             "directory.")


def _load_base(base: str, dtype: str) -> Any:
    try:
        return load_causal_lm(base, dtype=dtype)
    except (OSError, ValueError) as err:  # a local directory that is not a causal LM (ModelNotFoundError passes)
        if isinstance(err, LoRAError):
            raise
        raise CommandError(f"--base {base}: cannot load a causal language model from it ({_first_line(err)}); pass "
                           "a transformers model directory with config.json and weights.") from None


def _check_finite(model: Any, logits: Any, adapter: str, dtype: str) -> None:
    """A merged model with inf/nan weights or logits is not usable: a `CommandError` naming them."""
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad or not bool(torch.isfinite(logits).all()):
        where = (f"non-finite weights (inf or nan) in {len(bad)} tensor(s): {listed(bad)}" if bad
                 else "non-finite logits (inf or nan)")
        fix = ("check the adapter (a training run that diverged leaves nan in it)" if dtype == "fp32"
               else "check the adapter, or merge with --dtype fp32")
        raise CommandError(f"the merged model has {where}: the adapter {adapter} holds non-finite values, or the "
                           f"merged weights overflow {dtype}; {fix}.")


def merge_main(argv: list[str] | None = None) -> int:
    """`lightning-lora merge --base MODEL --adapter A --out DIR [--dtype ...] [--overwrite]`; returns the exit code.

    Loads the base with `hub.load_causal_lm`, the adapter with `peft_format.load_adapter`, merges
    with `merge_and_unload`, writes `save_pretrained` output (plus the base's tokenizer, when it has
    one) to a temporary directory, checks it with `verify_merged`, and renames it to DIR.

    Example:
        >>> merge_main(["--base", "smollm2-135m-instruct", "--adapter", "out/adapter",
        ...             "--out", "out/merged"])  # doctest: +SKIP
        0
    """
    def body(args: argparse.Namespace) -> None:
        console = _console()
        _quiet_transformers()
        out = Path(args.out)
        for name, value in (("--base", args.base), ("--adapter", args.adapter)):
            if _same_path(value, out) and Path(value).exists():
                raise CommandError(f"--out {out} is the same as {name}; write the merged model to another directory.")
        _check_output(out, args.overwrite)
        _gguf_options(args, "f16", ("outtype",))
        if args.format == "gguf":
            require_gguf()
        task_type, recorded_base = _adapter_origin(args.adapter)
        if task_type not in (None, "CAUSAL_LM"):
            raise CommandError(f"adapter {args.adapter} has task_type={task_type!r}; merge writes causal language "
                               "models (task_type CAUSAL_LM). Merge it in Python with merge_and_unload instead.")
        with _step(console, f"Loading base model {args.base} ({args.dtype})"):
            model = _load_base(args.base, args.dtype)
        if args.format == "gguf":
            check_writable(model.config)  # before the merge: an unsupported architecture fails fast
        with _step(console, f"Loading adapter {args.adapter}"):
            try:
                names = load_adapter(model, args.adapter)
            except LoRAError as err:
                if recorded_base is None or _same_path(recorded_base, args.base):
                    raise
                raise CommandError(f"{one_line(err)} The adapter was trained on {recorded_base}: pass --base "
                                   f"{recorded_base}.") from None
        with _step(console, f"Merging {len(names)} adapter layers"):
            merge_and_unload(model)
            make_serializable(model)
            model.eval()
            expected = merged_logits(model)
        _check_finite(model, expected, args.adapter, args.dtype)
        tokenizer = None
        with contextlib.suppress(Exception):  # a base without a tokenizer is fine: write the model only
            tokenizer = load_tokenizer(args.base)
        if args.format == "gguf":
            _merge_gguf(args, console, out, model, tokenizer)
            return
        with atomic_directory(out, overwrite=args.overwrite) as tmp:
            with _step(console, f"Writing merged model to {out}"):
                model.save_pretrained(tmp)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp)
            del model
            with _step(console, "Checking the merged model"):
                checked = verify_merged(tmp, expected, args.dtype, tokenizer=tokenizer is not None)
            console.print(f"  {checked}", soft_wrap=True)
        console.print(f"Wrote merged model{' and tokenizer' if tokenizer is not None else ''} to [bold]{out}[/bold]")

    return run_command("lightning-lora merge", merge_parser(), argv, body)


def _merge_gguf(args: argparse.Namespace, console: Console, out: Path, model: Any, tokenizer: Any) -> None:
    """`merge --format gguf`: the merged model -> OUT_DIR/model.<outtype>.gguf + Modelfile, verified on a
    chat prompt (`gguf_export.check_input_ids`)."""
    if tokenizer is None:
        raise CommandError(f"--base {args.base} has no tokenizer; a GGUF carries its tokenizer. Pass a base model "
                           "directory with the tokenizer files (tokenizer.json).")
    tokens = check_input_ids(tokenizer)
    expected = reference_logits(model, tokens)
    config = model.config
    name = Path(str(args.base).rstrip("/")).name
    with atomic_directory(out, overwrite=args.overwrite) as tmp:
        target = tmp / f"model.{args.outtype}.gguf"
        with _step(console, f"Writing GGUF ({args.outtype})"):
            write_model_gguf(model, tokenizer, target, args.outtype, name=name,
                             tokenizer_gguf=_bundled_gguf_file(args.base))
            write_modelfile(target, tokenizer)
        del model
        with _step(console, "Checking the GGUF with transformers' GGUF loader"):
            checked = verify_model_gguf(target, expected, args.outtype, tokenizer, tokens=tokens, config=config)
        size = target.stat().st_size
        console.print(f"  {checked}", soft_wrap=True)
    console.print(f"Wrote [bold]{out / target.name}[/bold] ({size / 2**20:.1f} MiB) and {out / 'Modelfile'}",
                  soft_wrap=True)


__all__ = ["CommandError", "export_main", "export_parser", "merge_main", "merge_parser", "merged_logits",
           "verify_export", "verify_merged"]
