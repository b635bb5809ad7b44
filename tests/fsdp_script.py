"""A LoRA run through Lightning's ModelParallelStrategy (FSDP2) on CPU processes (gloo), for tests/test_fsdp.py.

    python tests/fsdp_script.py OUT MAX_STEPS CKPT_PATH|none MODE ADAPTER_UNITS [GRADIENT_CLIP_VAL]

MODE: `sharded` / `full` (ModelParallelStrategy, FSDP2, with `save_distributed_checkpoint` True / False),
`fsdp1-sharded` / `fsdp1-full` (FSDPStrategy, FSDP1, `state_dict_type`). A tiny Llama built in
`configure_model` under `bf16-true` (bf16 base, fp32 adapters) on 2 CPU processes, trained with the `LoRA`
callback (which injects and shards it, or gives FSDP1 its wrap policy), a checkpoint every step (a
distributed directory written by every rank, or one file written by rank 0), the PEFT adapter and the
merged model at fit end.
Every rank writes `OUT/rank<R>.json` with what it measured; rank 0 writes `OUT/adapters.pt` (the
adapters gathered after fit). The Lightning launcher re-runs this file on each rank.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import lightning as L
import torch
from conftest import make_tiny_llama
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from lit_models import TokenData

from lightning_lora import LoRA
from lightning_lora.fsdp import gather_adapters
from lightning_lora.surgery import is_lora_key


def build_base() -> torch.nn.Module:
    """What `configure_model` builds: under `bf16-true` the default dtype is bfloat16, so the weights are
    drawn in bfloat16; the same seed gives every rank (and the test's reference) the same weights."""
    return make_tiny_llama(seed=0).train()


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = None

    def configure_model(self) -> None:
        if self.model is None:
            self.model = build_base()

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch[0], labels=batch[0]).loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)  # the callback leaves it holding the adapters


sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from gpu_fsdp_check import cpu_fsdp_strategy  # noqa: E402

#: Lightning's `FSDPStrategy` on CPU processes (FSDP1 itself runs there with gloo)
CPUFSDPStrategy = cpu_fsdp_strategy()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _bytes(tensors) -> int:
    return sum(_local(t).numel() * _local(t).element_size() for t in tensors)


class Probe(Callback):
    """Per-rank facts: parameter, gradient and optimizer bytes, dtypes, what the optimizer holds."""

    def __init__(self) -> None:
        self.facts: dict = {}

    def on_fit_start(self, trainer, pl_module) -> None:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
        from torch.distributed.tensor import DTensor

        from lightning_lora.fsdp import clean_name

        params = list(pl_module.named_parameters())
        self.facts.update(
            units=[clean_name(n) for n, m in pl_module.named_modules()
                   if isinstance(m, (FSDPModule, FullyShardedDataParallel))],
            flat_dtypes=sorted({str(m._handle.flat_param.dtype) for m in pl_module.modules()
                                if isinstance(m, FullyShardedDataParallel) and m._handle is not None}),
            all_dtensor=all(isinstance(p, DTensor) for _, p in params),
            trainable_dtypes=sorted({str(p.dtype) for _, p in params if p.requires_grad}),
            frozen_dtypes=sorted({str(p.dtype) for _, p in params if not p.requires_grad}),
            trainable_keys=sorted(clean_name(n) for n, p in params if p.requires_grad),
            param_bytes={"trainable": _bytes(p for _, p in params if p.requires_grad),
                         "frozen": _bytes(p for _, p in params if not p.requires_grad)},
            full_bytes={"trainable": sum(p.numel() * p.element_size() for _, p in params if p.requires_grad),
                        "frozen": sum(p.numel() * p.element_size() for _, p in params if not p.requires_grad)})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = list(pl_module.named_parameters())
        self.facts["grad_bytes"] = _bytes(p.grad for _, p in params if p.grad is not None)
        self.facts["frozen_with_grad"] = sum(p.grad is not None for _, p in params if not p.requires_grad)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from torch.distributed.tensor import DTensor

        optimizer = trainer.optimizers[0]
        names = {id(p): n for n, p in pl_module.named_parameters()}
        held = [p for g in optimizer.param_groups for p in g["params"]]
        self.facts.update(
            optimizer_params=len(held),
            optimizer_holds_only_adapters=all(is_lora_key(names[id(p)]) for p in held),
            optimizer_all_dtensor=all(isinstance(p, DTensor) for p in held),
            optimizer_state_bytes=_bytes(v for s in optimizer.state.values() for v in s.values()
                                         if torch.is_tensor(v) and v.dim() > 0))


def main() -> None:
    out, max_steps, ckpt, save_mode, units = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    clip = float(sys.argv[6]) if len(sys.argv) > 6 else 0.0
    devices = 2
    root = Path(out)
    probe = Probe()
    lora = LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"], log_every_n_steps=1,
                adapter_dir=str(root / "adapter"), merged_dir=str(root / "merged"), fsdp={"adapter_units": units})
    if save_mode.startswith("fsdp1-"):  # FSDPStrategy (FSDP1), state_dict_type "sharded" or "full"
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        strategy = CPUFSDPStrategy(auto_wrap_policy={LlamaDecoderLayer}, state_dict_type=save_mode.split("-")[1])
    else:
        strategy = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1,
                                         save_distributed_checkpoint=save_mode == "sharded")
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, precision="bf16-true",
                        max_steps=max_steps, logger=CSVLogger(str(root), name="logs"), log_every_n_steps=1,
                        gradient_clip_val=clip or None,  # Lightning clips no norm under FSDP1
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
                        callbacks=[lora, probe, ModelCheckpoint(dirpath=str(root / "ckpts"), every_n_train_steps=1,
                                                                save_top_k=-1),
                                   ModelCheckpoint(dirpath=str(root / "weights"), every_n_train_steps=max_steps,
                                                   save_weights_only=True)])
    module = Net()
    trainer.fit(module, datamodule=TokenData(n=16), ckpt_path=None if ckpt == "none" else ckpt)
    adapters = gather_adapters(module)  # every rank: full tensors
    digest = hashlib.sha256(b"".join(v.view(torch.uint8).numpy().tobytes() for v in adapters.values())).hexdigest()
    facts = dict(probe.facts, step=trainer.global_step, sha256=digest, rank=trainer.global_rank,
                 adapter_dtypes=sorted({str(v.dtype) for v in adapters.values()}))
    (root / f"rank{trainer.global_rank}.json").write_text(json.dumps(facts, indent=1))
    if trainer.is_global_zero:
        torch.save(adapters, root / "adapters.pt")
        print("RESULT", trainer.global_step)
    if torch.distributed.is_initialized():  # stop gloo's threads before the interpreter exits (else: std::terminate)
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
