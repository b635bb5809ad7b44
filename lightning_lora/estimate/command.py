"""`lightning-lora estimate`: the command line over `estimate_memory` (table or JSON).

Usage errors and user errors print one line on stderr and exit with code 2, through the shared
runner (`lightning_lora.command_line.ArgumentParser` / `run_command`).

Example:
    >>> main(["--model", "smollm2-135m", "--seq-len", "256", "--json"])  # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from lightning_lora.command_line import ArgumentParser, run_command
from lightning_lora.config import ALL_LINEAR
from lightning_lora.estimate.memory import (
    OPTIMIZER_IMPLS,
    OPTIMIZERS,
    PRECISIONS,
    estimate_memory,
)
from lightning_lora.estimate.models import known_models
from lightning_lora.estimate.quantize import QUANTIZE, QUANTIZE_MODULES
from lightning_lora.estimate.sharding import STRATEGIES

PROG = "lightning-lora estimate"


def build_parser() -> argparse.ArgumentParser:
    """The `lightning-lora estimate` argument parser (usage errors raise `CommandError`).

    Example:
        >>> build_parser().parse_args(["--model", "llama-3-8b", "--quantize", "nf4"]).quantize
        'nf4'
    """
    p = ArgumentParser(prog=PROG,
                       description="Parameters and training memory, full fine-tune vs LoRA (and QLoRA), from a model "
                                   "config (built on the meta device: no weights, no download).")
    p.add_argument("--model", required=True,
                   help=f"a known name ({', '.join(known_models())}), a model directory, or a config.json path")
    p.add_argument("--r", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (does not change memory)")
    p.add_argument("--target-modules", nargs="+", default=["q_proj", "v_proj"],
                   help="module names, or all-linear (default: q_proj v_proj)")
    p.add_argument("--target-parameters", nargs="+", default=None,
                   help="parameters adapted directly, e.g. mlp.experts.gate_up_proj mlp.experts.down_proj (MoE experts)")
    p.add_argument("--precision", choices=PRECISIONS, default="bf16-true",
                   help="Lightning precision (default bf16-true)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per step, per device (default 1)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute each layer in backward")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    p.add_argument("--optimizer-impl", choices=OPTIMIZER_IMPLS, default="foreach",
                   help="torch.optim code path: foreach (CUDA default), for-loop (CPU default), fused")
    p.add_argument("--quantize", choices=QUANTIZE, default=None,
                   help="add a QLoRA column: frozen linear weights in 4 bits, nf4 (torchao to_nf4) or bnb-nf4 "
                        "(bitsandbytes, double quantisation)")
    p.add_argument("--quantize-modules", choices=QUANTIZE_MODULES, default=None,
                   help="which linear weights are 4-bit: all-linear (default: all but the output head) or adapted")
    p.add_argument("--use-dora", action="store_true",
                   help="DoRA adapters: a trainable magnitude per output feature, and its activations")
    p.add_argument("--frozen-adapters", type=int, default=0, metavar="N",
                   help="N more adapters of the same config carried frozen next to the trained one (several "
                        "adapters per model; serving K adapters: N = K - 1): their weights count, with no gradients "
                        "and no optimizer state (default 0)")
    p.add_argument("--devices", type=int, default=1, help="GPUs in the run; numbers are then per GPU (default 1)")
    p.add_argument("--strategy", choices=STRATEGIES, default="auto",
                   help="auto (one device, or DDP over several), ddp, or fsdp (sharded weights, gradients, optimizer)")
    p.add_argument("--chunked-loss", action="store_true",
                   help="the loss as CausalLM computes it by default (chunked cross-entropy: no vocabulary-sized "
                        "tensor kept) instead of transformers' own loss")
    p.add_argument("--per-layer", action="store_true", help="also show parameters per adapted module")
    p.add_argument("--json", action="store_true", help="print every number as JSON (bytes, parameters)")
    return p


def _run(args: argparse.Namespace) -> None:
    targets: list[str] | str = args.target_modules
    if len(targets) == 1 and targets[0] == ALL_LINEAR:
        targets = ALL_LINEAR
    est = estimate_memory(args.model, r=args.r, alpha=args.alpha, target_modules=targets,
                          precision=args.precision, batch_size=args.batch_size, seq_len=args.seq_len,
                          gradient_checkpointing=args.gradient_checkpointing, optimizer=args.optimizer,
                          optimizer_impl=args.optimizer_impl, quantize=args.quantize,
                          quantize_modules=args.quantize_modules, use_dora=args.use_dora, devices=args.devices,
                          strategy=args.strategy, chunked_loss=args.chunked_loss,
                          target_parameters=args.target_parameters, frozen_adapters=args.frozen_adapters)
    if args.json:
        print(json.dumps(est.to_dict(), indent=2))
        return
    from rich.console import Console

    console = Console(soft_wrap=False, width=None if sys.stdout.isatty() else 120)
    for table in est.tables(per_layer=args.per_layer):
        console.print(table)
    for note in est.notes:
        console.print(f"note: {note}")


def main(argv: Sequence[str] | None = None) -> int:
    """`lightning-lora estimate ...`; returns the exit code (2 with one line on stderr for user errors).

    Example:
        >>> main(["--model", "smollm2-135m", "--seq-len", "256", "--json"])  # doctest: +SKIP
        0
    """
    return run_command(PROG, build_parser(), argv, _run)


__all__ = ["build_parser", "main"]
