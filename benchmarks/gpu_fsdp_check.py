"""GPU check of LoRA under FSDP on one CUDA GPU (world size 1 still wraps, casts and checkpoints through FSDP).

    python benchmarks/gpu_fsdp_check.py                       # one CUDA GPU: about 4-6 minutes (H200)
    python benchmarks/gpu_fsdp_check.py --out "$OUT" --deadline 420   # on a lent device machine (run tool)
    python benchmarks/gpu_fsdp_check.py --dry-run             # on CPU with a tiny model (~1.5 min)
    python benchmarks/gpu_fsdp_check.py --jobs fsdp2,fsdp2-resume --steps 4

Jobs (each in its own subprocess, so that each has its own process group and memory peak):

- `fsdp2`: Lightning's `ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)` (FSDP2), the
  `LoRA` callback injecting and sharding a model built in `configure_model`, `bf16-true` (bf16 base, fp32
  adapters), transformers' activation checkpointing, a distributed (sharded) checkpoint every step, the
  PEFT adapter and the merged model at fit end.
- `fsdp2-resume`: resumed from `fsdp2`'s step-2 checkpoint; its adapters must equal `fsdp2`'s bit for bit.
- `fsdp2-file`: `save_distributed_checkpoint=False` (one adapter-only file written by rank 0) and adapters in
  units of their own (`LoRA(fsdp={"adapter_units": "separate"})`).
- `fsdp1`: Lightning's `FSDPStrategy(auto_wrap_policy={<decoder layer>}, activation_checkpointing_policy=
  {<decoder layer>}, state_dict_type="sharded")` (FSDP1, CUDA only in Lightning; NO_SHARD on one GPU): the
  callback gives it `lightning_lora.fsdp.fsdp1_auto_wrap_policy` (every adapter matrix its own unit, kept in
  fp32 for compute).
- `fsdp1-resume`: resumed from `fsdp1`'s step-2 checkpoint, writing one-file checkpoints
  (`state_dict_type="full"`: adapters gathered unit by unit, written by rank 0); must equal `fsdp1` bit for bit.

For every job: status (ok / error with the last lines), steps, seconds per step after warm-up, the CUDA
steady-state peak (`max_memory_allocated` after a reset at step 3) against `lightning_lora.estimate` for the
same settings (`--devices 1 --strategy fsdp`), per-rank bytes of parameters / gradients / optimizer state,
the FSDP units, what each checkpoint holds (adapter keys only, its bytes), `read_checkpoint` and PEFT export
of the last checkpoint, and a SHA-256 of the final adapters. Results: `OUT/gpu_fsdp.json` and
`OUT/gpu_fsdp.md` (default OUT: `benchmarks/results`), rewritten after every job.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
JOBS = ("fsdp2", "fsdp2-resume", "fsdp2-file", "fsdp1", "fsdp1-resume")


# ------------------------------------------------------------------------------------------ one job
def _setting(args: argparse.Namespace) -> dict[str, Any]:
    return {"model": args.model, "r": 16, "alpha": 32, "target_modules": "all-linear", "batch": args.batch,
            "seq": args.seq, "steps": args.steps, "precision": "bf16-true", "gradient_checkpointing": True,
            "device": args.device}


def run_job(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
    from torch.utils.data import DataLoader, TensorDataset

    sys.path.insert(0, str(HERE))
    from _worker import build_model

    from lightning_lora import LoRA
    from lightning_lora.checkpoint import is_sharded_checkpoint, read_checkpoint
    from lightning_lora.fsdp import (
        decoder_layers,
        fsdp1_adapter_state_dict,
        gather_adapters,
    )
    from lightning_lora.surgery import is_lora_key

    kind = name.split("-")[0]
    file_mode, resume = name.endswith("-file"), name.endswith("-resume")
    cuda = args.device == "cuda"
    work = Path(args.work)
    ckpt_dir = work / f"{name}-ckpts"
    probe_layer = build_model(args.model, "meta", "bf16")
    layer_cls = {type(m) for _, m in decoder_layers(probe_layer)}
    vocab = int(probe_layer.config.vocab_size)
    del probe_layer

    class Net(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = None

        def configure_model(self) -> None:
            if self.model is None:  # random weights (seed 0), built on the device in bf16; FSDP1 checkpoints
                # activations with the strategy's checkpoint wrapper (its usual recipe), FSDP2 with transformers'
                self.model = build_model(args.model, args.device, "bf16", gradient_checkpointing=kind == "fsdp2")

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch[0], labels=batch[0]).loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-4)

    facts: dict[str, Any] = {"job": name}

    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    def nbytes(ts) -> int:
        return sum(local(t).numel() * local(t).element_size() for t in ts)

    class Probe(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.t0 = 0.0

        def on_fit_start(self, trainer, pl_module) -> None:
            params = list(pl_module.named_parameters())
            facts["param_bytes"] = {"trainable": nbytes(p for _, p in params if p.requires_grad),
                                    "frozen": nbytes(p for _, p in params if not p.requires_grad)}
            facts["dtypes"] = {"trainable": sorted({str(p.dtype) for _, p in params if p.requires_grad}),
                               "frozen": sorted({str(p.dtype) for _, p in params if not p.requires_grad})}
            facts["units"] = len([m for m in pl_module.modules() if type(m).__name__.startswith("FSDP")
                                  or type(m).__name__ == "FullyShardedDataParallel"])

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if cuda:
                torch.cuda.synchronize()
                if trainer.global_step == 2:
                    torch.cuda.reset_peak_memory_stats()
            self.t0 = time.perf_counter()

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            params = list(pl_module.named_parameters())
            facts["grad_bytes"] = nbytes(p.grad for _, p in params if p.grad is not None)
            facts["frozen_with_grad"] = sum(p.grad is not None for _, p in params if not p.requires_grad)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)
            opt = trainer.optimizers[0]
            names = {id(p): n for n, p in pl_module.named_parameters()}
            held = [p for g in opt.param_groups for p in g["params"]]
            facts["optimizer_params"] = len(held)
            facts["optimizer_only_adapters"] = all(is_lora_key(names.get(id(p), "")) for p in held)
            facts["optimizer_state_bytes"] = nbytes(v for s in opt.state.values() for v in s.values()
                                                    if torch.is_tensor(v) and v.dim() > 0)

    if kind == "fsdp2":
        strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1,
                                         save_distributed_checkpoint=not file_mode)
    else:
        cls = FSDPStrategy if cuda else cpu_fsdp_strategy()
        # world size 1: FSDP1 runs NO_SHARD (lightning_lora.fsdp.restore_frozen_views keeps its frozen units'
        # parameters registered); the resume writes one-file checkpoints
        strategy = cls(auto_wrap_policy=layer_cls, activation_checkpointing_policy=layer_cls,
                       state_dict_type="full" if resume else "sharded")
    probe = Probe()
    callbacks = [LoRA(r=16, alpha=32, target_modules="all-linear", log_every_n_steps=1,
                      adapter_dir=str(work / f"{name}-adapter"),
                      merged_dir=str(work / f"{name}-merged") if name == "fsdp2" else None,
                      fsdp={"adapter_units": "separate"} if (kind == "fsdp2" and file_mode) else None), probe]
    callbacks.append(ModelCheckpoint(dirpath=str(ckpt_dir), filename="{step}", every_n_train_steps=1, save_top_k=-1))
    gen = torch.Generator().manual_seed(0)
    # two batches per epoch: the step-2 checkpoint ends an epoch, so a resume replays nothing (Lightning restarts
    # a non-resumable dataloader's epoch from its first batch)
    tokens = torch.randint(1, min(vocab, 32000), (args.batch * 2, args.seq), generator=gen)
    data = DataLoader(TensorDataset(tokens), batch_size=args.batch)
    trainer = L.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, strategy=strategy, precision="bf16-true",
                        max_steps=args.steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=callbacks, default_root_dir=str(work))
    module = Net()
    ckpt = None
    if resume:
        ckpt = str(work / f"{kind}-ckpts" / "step=2.ckpt")
    trainer.fit(module, train_dataloaders=data, ckpt_path=ckpt)
    if kind == "fsdp2":
        adapters = gather_adapters(module)
    else:
        adapters = fsdp1_adapter_state_dict(module, rank0_only=False)
    facts["sha256"] = hashlib.sha256(b"".join(v.contiguous().view(torch.uint8).numpy().tobytes()
                                              for _, v in sorted(adapters.items()))).hexdigest()
    facts["adapter_tensors"] = len(adapters)
    facts["steps"] = trainer.global_step
    facts["seconds_per_step"] = sum(probe.times[2:]) / max(1, len(probe.times[2:])) if probe.times else None
    if cuda:
        facts["steady_peak_bytes"] = torch.cuda.max_memory_allocated()
    facts["checkpoints"] = _checkpoint_facts(ckpt_dir, is_sharded_checkpoint, read_checkpoint)
    facts["adapter_dir"] = sorted(p.name for p in (work / f"{name}-adapter").iterdir()) \
        if (work / f"{name}-adapter").is_dir() else None
    if name == "fsdp2":
        facts["merged_dir"] = sorted(p.name for p in (work / f"{name}-merged").iterdir()) \
            if (work / f"{name}-merged").is_dir() else None
    return facts


def cpu_fsdp_strategy() -> type:
    """For `--dry-run` (and the CPU tests of `tests/fsdp_script.py`): Lightning's `FSDPStrategy` on CPU
    (Lightning refuses it there by an exact type test; FSDP1 itself runs on CPU with `device_id=cpu`, which
    Lightning does not pass)."""
    import torch
    from lightning.fabric.strategies.fsdp import _setup_activation_checkpointing
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel

    class CPUFSDPStrategy(FSDPStrategy):
        def _setup_model(self, model):
            model = FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload,
                                             mixed_precision=self.mixed_precision_config,
                                             sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"),
                                             **self.kwargs)
            _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
            return model

    return CPUFSDPStrategy


def _checkpoint_facts(ckpt_dir: Path, is_sharded, read_checkpoint) -> dict[str, Any]:
    import torch

    from lightning_lora.surgery import is_lora_key

    entries = sorted(ckpt_dir.iterdir())
    info: dict[str, Any] = {"names": [p.name for p in entries]}
    sizes, only_adapters = {}, True
    for path in entries:
        if is_sharded(path):
            import torch.distributed.checkpoint as dcp

            stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
            keys = [k.split(".", 1)[1] for k in stored if k.startswith(("state_dict.", "model."))]
            sizes[path.name] = sum(f.stat().st_size for f in path.iterdir())
        else:
            keys = list(torch.load(path, map_location="cpu", weights_only=True)["state_dict"])
            sizes[path.name] = path.stat().st_size
        only_adapters = only_adapters and bool(keys) and all(is_lora_key(k) for k in keys)
    info["bytes"] = sizes
    info["only_adapter_keys"] = only_adapters
    last = entries[-1]
    ckpt = read_checkpoint(last)
    info["read_checkpoint"] = {"tensors": len(ckpt.state_dict), "r": ckpt.config.r, "prefix": ckpt.model_prefix}
    from lightning_lora.peft_format import checkpoint_to_peft

    peft_dir = ckpt_dir.parent / f"{ckpt_dir.name}-peft"
    checkpoint_to_peft(last, peft_dir, overwrite=True)
    info["export"] = sorted(p.name for p in peft_dir.iterdir())
    return info


# ------------------------------------------------------------------------------------------ the driver
def _estimate(args: argparse.Namespace) -> dict[str, Any] | None:
    if args.model == "tiny-llama":
        return None
    from lightning_lora.estimate import estimate_memory

    est = estimate_memory(args.model, r=16, alpha=32, target_modules="all-linear", precision="bf16-true",
                          batch_size=args.batch, seq_len=args.seq, gradient_checkpointing=True, devices=1,
                          strategy="fsdp")
    return {"lora_total_bytes": est.lora.total, "weights": est.lora.weights, "gradients": est.lora.gradients,
            "optimizer": est.lora.optimizer, "activations": est.lora.activations,
            "communication": est.lora.communication}


def _markdown(result: dict[str, Any]) -> str:
    gib = 1024**3
    lines = ["# LoRA under FSDP on one GPU (benchmarks/gpu_fsdp_check.py)", "",
             f"settings: `{json.dumps(result['settings'])}`", ""]
    est = result.get("estimate")
    if est:
        lines.append(f"estimate (`--devices 1 --strategy fsdp`): {est['lora_total_bytes'] / gib:.2f} GiB peak")
        lines.append("")
    lines += [("| job | status | steps | s/step | peak GiB | est. GiB | grad MiB | optim MiB | units | ckpt adapter-only "
               "| sha256 |"), "|---|---|---|---|---|---|---|---|---|---|---|"]
    for job in result["jobs"]:
        f = job.get("facts", {})
        peak = f.get("steady_peak_bytes")
        ck = f.get("checkpoints") or {}
        lines.append(
            f"| {job['job']} | {job['status']} | {f.get('steps', '')} | "
            f"{f['seconds_per_step']:.3f} |" if f.get("seconds_per_step") is not None else
            f"| {job['job']} | {job['status']} | {f.get('steps', '')} | |")
        lines[-1] += (f" {peak / gib:.2f} |" if peak else " |") + (
            f" {est['lora_total_bytes'] / gib:.2f} |" if est else " |") + (
            f" {f['grad_bytes'] / 2**20:.1f} |" if "grad_bytes" in f else " |") + (
            f" {f['optimizer_state_bytes'] / 2**20:.1f} |" if "optimizer_state_bytes" in f else " |") + (
            f" {f.get('units', '')} | {ck.get('only_adapter_keys', '')} | {str(f.get('sha256', ''))[:12]} |")
    for job in result["jobs"]:
        if job["status"] != "ok":
            lines += ["", f"## {job['job']}: {job['status']}", "", "```", job.get("error", "")[-3000:], "```"]
    resumes = [(a, b) for a, b in (("fsdp2", "fsdp2-resume"), ("fsdp1", "fsdp1-resume"))]
    by_name = {j["job"]: j.get("facts", {}) for j in result["jobs"]}
    for a, b in resumes:
        if by_name.get(a, {}).get("sha256") and by_name.get(b, {}).get("sha256"):
            same = by_name[a]["sha256"] == by_name[b]["sha256"]
            lines += ["", f"{b} equals {a} bit for bit: **{same}**"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default llama-3.2-1b on CUDA, tiny-llama with --dry-run")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--jobs", default=",".join(JOBS))
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model (FSDPStrategy through a CPU subclass)")
    parser.add_argument("--job-timeout", type=float, default=240.0)
    parser.add_argument("--deadline", type=float, default=540.0, help="seconds for all jobs; later ones are skipped")
    parser.add_argument("--work", default=None, help="directory for checkpoints, adapters and the merged model "
                                                       "(default: a temporary one, removed at the end)")
    parser.add_argument("--job", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.device = "cpu" if args.dry_run else "cuda"
    args.model = args.model or ("tiny-llama" if args.dry_run else "llama-3.2-1b")
    args.batch = args.batch or (2 if args.dry_run else 4)
    args.seq = args.seq or (32 if args.dry_run else 1024)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if args.job is not None:  # one job, in this subprocess
        try:
            facts = run_job(args.job, args)
            status = {"status": "ok", "facts": facts}
        except BaseException as err:  # noqa: BLE001 (record every failure)
            status = {"status": f"error: {type(err).__name__}", "error": traceback.format_exc()}
        Path(args.work).mkdir(parents=True, exist_ok=True)
        (Path(args.work) / f"job-{args.job}.json").write_text(json.dumps(status, indent=1, default=str))
        return 0

    keep = args.work is not None
    args.work = args.work or tempfile.mkdtemp(prefix="gpu_fsdp_")  # checkpoints, adapters, the merged model
    result: dict[str, Any] = {"settings": _setting(args), "jobs": []}
    try:
        result["estimate"] = _estimate(args)
    except Exception as err:  # noqa: BLE001
        result["estimate_error"] = repr(err)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")]))
    start = time.time()
    for name in [j for j in args.jobs.split(",") if j]:
        if name not in JOBS:
            parser.error(f"unknown job {name!r}; expected some of {', '.join(JOBS)}")
        if time.time() - start > args.deadline:
            result["jobs"].append({"job": name, "status": "skipped: deadline"})
            continue
        cmd = [sys.executable, str(Path(__file__).resolve()), "--job", name, "--out", str(out), "--work", args.work,
               "--model", args.model,
               "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq)]
        if args.dry_run:
            cmd.append("--dry-run")
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False,
                                  timeout=min(args.job_timeout, max(30.0, args.deadline - (t0 - start) + 60)))
            record_path = Path(args.work) / f"job-{name}.json"
            record = json.loads(record_path.read_text()) if record_path.is_file() else {
                "status": f"error: exit {proc.returncode}", "error": (proc.stdout + proc.stderr)[-4000:]}
        except subprocess.TimeoutExpired:
            record = {"status": "error: timeout"}
        record.update(job=name, wall_s=round(time.time() - t0, 1))
        result["jobs"].append(record)
        print(json.dumps({k: v for k, v in record.items() if k != "error"}, default=str), flush=True)
        (out / "gpu_fsdp.json").write_text(json.dumps(result, indent=1, default=str))
        (out / "gpu_fsdp.md").write_text(_markdown(result))
    print(_markdown(result))
    if not keep:
        shutil.rmtree(args.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
