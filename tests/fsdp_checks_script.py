"""Checks of `lightning_lora.fsdp` without a Trainer, on 2 CPU processes (gloo), for tests/test_fsdp.py.

    python tests/fsdp_checks_script.py OUT [PORT] [DISTRIBUTED_CHECKPOINT_DIR]

FSDP2: the refusals (a network sharded before injection, sharding twice, a tensor-parallel mesh, a unit
whose trainable parameters mix dtypes) and the adapter units that `adapter_units="auto"` makes for
trained biases. FSDP1 (`FullyShardedDataParallel`, what Lightning's CUDA-only `FSDPStrategy` wraps
with): the LoRA auto-wrap policy on a bf16 base with fp32 adapters under a bf16 `MixedPrecision` (what
`bf16-true` gives), two training steps, flat parameters of one dtype, adapters gathered alone. With a
checkpoint directory: `load_sharded_adapters` into a sharded module (same config, and another r).
Rank 0 writes `OUT/checks.json`.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist


def _error(fn) -> str | None:
    from lightning_lora.errors import LoRAError

    try:
        fn()
    except LoRAError as err:
        return str(err)
    return None


def fsdp2_checks() -> dict:
    import lightning as L
    from conftest import make_tiny_llama
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from lightning_lora import LoRAConfig, inject_lora, lora_state_dict
    from lightning_lora.fsdp import gather_adapters, refuse_presharded, shard_lora_model

    mesh = init_device_mesh("cpu", (2,))
    out: dict = {}
    pre = make_tiny_llama()
    fully_shard(pre, mesh=mesh)
    out["presharded"] = _error(lambda: refuse_presharded(pre))

    twice = make_tiny_llama()
    shard_lora_model(twice, mesh, config=LoRAConfig(r=2))
    out["twice"] = _error(lambda: shard_lora_model(twice, mesh))

    seeded = make_tiny_llama()
    torch.manual_seed(dist.get_rank())  # ranks seeded differently: rank 0's adapter init must win
    inject_lora(seeded, LoRAConfig(r=2))
    mine = {k: v.clone() for k, v in lora_state_dict(seeded).items()}
    shard_lora_model(seeded, mesh)
    ranks = [None, None]
    dist.all_gather_object(ranks, mine)
    full = gather_adapters(seeded)
    out["init_from_rank0"] = all(torch.equal(full[k], ranks[0][k]) for k in full)
    out["ranks_differed"] = not all(torch.equal(ranks[0][k], ranks[1][k]) for k in full)
    torch.manual_seed(0)

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = make_tiny_llama()

    tp = Module()
    tp._device_mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("data_parallel", "tensor_parallel"))
    out["tensor_parallel"] = _error(lambda: shard_lora_model(tp, config=LoRAConfig(r=2)))

    def biased() -> torch.nn.Module:
        model = make_tiny_llama(attention_bias=True).to(torch.bfloat16)
        inject_lora(model, LoRAConfig(r=2, bias="all"))  # trained bf16 biases beside fp32 adapters
        return model

    out["mixed_layer"] = _error(lambda: shard_lora_model(biased(), mesh, {"adapter_units": "layer"}))
    auto = biased()
    units = shard_lora_model(auto, mesh)
    out["auto_units"] = [(u.kind, u.dtypes) for u in units]
    x = torch.randint(1, 128, (2, 8))
    loss = auto(input_ids=x, labels=x).loss
    loss.backward()
    out["auto_loss_finite"] = bool(torch.isfinite(loss))
    out["auto_grads"] = sorted({str(p.grad.dtype) for p in auto.parameters() if p.grad is not None})
    out["auto_fsdp_modules"] = sum(isinstance(m, FSDPModule) for m in auto.modules())

    # adapters in their layer's unit (fused adapter kernels) vs in units of their own (module path), on an fp32
    # model: on a bf16 base the fused kernel rounds the input gradient once (base + adapter together), the module
    # path twice, so the two agree to bf16 rounding only, and 3 AdamW steps amplify that
    trained = {}
    for units in ("layer", "separate"):
        model = make_tiny_llama().train()
        torch.manual_seed(0)
        shard_lora_model(model, mesh, {"adapter_units": units}, config=LoRAConfig(r=4, target_modules="all-linear"))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        x = torch.randint(1, 128, (2, 8), generator=torch.Generator().manual_seed(dist.get_rank()))
        for _ in range(3):
            model(input_ids=x, labels=x).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        trained[units] = gather_adapters(model)
    out["layer_vs_separate_max_diff"] = max(float((trained["layer"][k] - trained["separate"][k]).abs().max())
                                            for k in trained["layer"])
    out["layer_vs_separate_keys"] = len(trained["layer"])

    if CHECKPOINT:  # a distributed checkpoint of tests/fsdp_script.py's run (r=4, alpha=8 on q_proj, v_proj)
        from lightning_lora.checkpoint import read_checkpoint
        from lightning_lora.fsdp import load_sharded_adapters

        saved = read_checkpoint(CHECKPOINT).state_dict
        other = Module()
        shard_lora_model(other, mesh, config=LoRAConfig(r=2, alpha=8, target_modules=["q_proj", "v_proj"]))
        out["load_other_config"] = _error(lambda: load_sharded_adapters(CHECKPOINT, other))
        same = Module()
        shard_lora_model(same, mesh, config=LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
        meta = load_sharded_adapters(CHECKPOINT, same)
        loaded = gather_adapters(same)
        out["load_same_config"] = {"global_step": meta["global_step"], "keys": len(loaded),
                                   "equal": all(torch.equal(loaded[f"model.{k}"], v) for k, v in saved.items())}
    return out


def fsdp1_checks() -> dict:
    from conftest import make_tiny_llama
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import MixedPrecision

    from lightning_lora import LoRAConfig, inject_lora, lora_parameters
    from lightning_lora.fsdp import (
        fsdp1_adapter_state_dict,
        fsdp1_auto_wrap_policy,
        sharded_weight_norms,
    )
    from lightning_lora.surgery import weight_norms

    model = make_tiny_llama().train().to(torch.bfloat16)
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    expected_norms = weight_norms(model)
    bf16 = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16, buffer_dtype=torch.bfloat16)
    wrapped = FSDP(model, auto_wrap_policy=fsdp1_auto_wrap_policy(model), mixed_precision=bf16,
                   use_orig_params=True, device_id=torch.device("cpu"))
    units = [(n, m) for n, m in wrapped.named_modules() if isinstance(m, FSDP)]
    flat = {}
    for name, unit in units:
        handle = unit._handle
        if handle is not None:
            flat[name or "<root>"] = [str(handle.flat_param.dtype), str(unit.mixed_precision.param_dtype)]
    params = lora_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    x = torch.randint(1, 128, (2, 8), generator=torch.Generator().manual_seed(dist.get_rank()))
    losses = []
    for _ in range(2):
        loss = wrapped(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    adapters = fsdp1_adapter_state_dict(model, rank0_only=False)
    norms = sharded_weight_norms(model)
    gathered = [None, None]
    dist.all_gather_object(gathered, {k: v.tolist() for k, v in adapters.items()})
    no_shard = _no_shard_frozen_units()
    return {"no_shard": no_shard, "flat": flat, "units": len(units), "lora_parameters": len(params), "losses": losses,
            "adapter_keys": sorted(adapters), "adapter_dtypes": sorted({str(v.dtype) for v in adapters.values()}),
            "adapters_equal_on_ranks": gathered[0] == gathered[1],
            "b_trained": any(float(v.abs().sum()) > 0 for k, v in adapters.items() if "lora_B" in k),
            "norms_match": all(abs(norms[k] - expected_norms[k]) <= 1e-3 * expected_norms[k] for k in expected_norms)}


CHECKPOINT: str | None = None


def _no_shard_frozen_units() -> dict:
    """NO_SHARD (what FSDP1 runs on one device): after a step, units with only frozen parameters hold plain
    tensors instead of parameters until `restore_frozen_views`."""
    import warnings

    from conftest import make_tiny_llama
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy, StateDictType

    from lightning_lora import LoRAConfig, inject_lora, lora_parameters
    from lightning_lora.fsdp import fsdp1_auto_wrap_policy, restore_frozen_views

    model = make_tiny_llama().train().to(torch.bfloat16)
    inject_lora(model, LoRAConfig(r=4, target_modules="all-linear"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NO_SHARD is deprecated
        wrapped = FSDP(model, auto_wrap_policy=fsdp1_auto_wrap_policy(model), use_orig_params=True,
                       sharding_strategy=ShardingStrategy.NO_SHARD, device_id=torch.device("cpu"))
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    x = torch.randint(1, 128, (2, 8))
    wrapped(input_ids=x, labels=x).loss.backward()
    optimizer.step()

    def unregistered() -> int:
        return sum(isinstance(m.__dict__.get("weight"), torch.Tensor) for m in model.modules())

    before = unregistered()
    restore_frozen_views(wrapped)
    with FSDP.state_dict_type(wrapped, StateDictType.SHARDED_STATE_DICT):
        keys = len(wrapped.state_dict())
    return {"unregistered_before": before, "unregistered_after": unregistered(), "state_dict_keys": keys}


def run(rank: int, out: str, port: str, checkpoint: str | None) -> None:
    global CHECKPOINT
    CHECKPOINT = checkpoint
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    try:
        results = {"fsdp2": fsdp2_checks(), "fsdp1": fsdp1_checks()}
        if rank == 0:
            with open(os.path.join(out, "checks.json"), "w") as f:
                json.dump(results, f, indent=1)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    import torch.multiprocessing as mp

    mp.spawn(run, args=(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "29551",
                        sys.argv[3] if len(sys.argv) > 3 else None), nprocs=2)
