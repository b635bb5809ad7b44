"""The Lightning side of LoRA under a strategy: which FSDP a strategy runs, the `LoRA` callback's FSDP steps
(inject then shard, the FSDP1 auto-wrap policy, the gathered writes at fit end) and adapter-only
checkpoints on every strategy's checkpoint path.

The strategies' checkpoint path has no hook (weights-only checkpoints and averaging callbacks' copies
reach no callback hook; FSDP strategies gather and load the whole module), so its methods are replaced
through `lightning_lora.replacements`, each with its undo and the missing hook named. The torch-only
sharding itself is `lightning_lora.fsdp`; the callback (`lightning_lora.callback`) calls this module, and
nothing below the callback imports it.

Example:
    >>> from lightning.pytorch.strategies import ModelParallelStrategy
    >>> strategy_kind(ModelParallelStrategy())
    'fsdp2'
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.strategies.fsdp import _get_sharded_state_dict_context
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, Strategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_lora.checkpoint import (
    SHARDED_METADATA,
    check_checkpoint_config,
    is_sharded_checkpoint,
    make_adapter_only,
    restore_base_keys,
)
from lightning_lora.errors import LoRAError
from lightning_lora.fsdp import (
    FSDPOptions,
    adapter_state_dict,
    clean_name,
    fsdp1_adapter_state_dict,
    fsdp1_auto_wrap_policy,
    is_sharded,
    load_sharded_adapters,
    refuse_dora,
    refuse_presharded,
    refuse_unshardable_layers,
    restore_frozen_views,
    shard_lora_model,
    write_adapter,
    write_merged,
)
from lightning_lora.replacements import Replacement, find_replacement, replace_attribute
from lightning_lora.surgery import (
    get_lora_config,
    has_lora,
    is_lora_key,
    is_merged,
    parameter_summary,
    saved_keys,
    weight_norms,
)

#: the owner of this module's replacements (`lightning_lora.replacements`)
OWNER = __name__


def strategy_kind(strategy: Any) -> str | None:
    """`"fsdp2"` for Lightning's `ModelParallelStrategy`, `"fsdp1"` for `FSDPStrategy`, else None.

    Example:
        >>> from lightning.pytorch.strategies import DDPStrategy
        >>> strategy_kind(DDPStrategy()) is None
        True
    """
    if isinstance(strategy, ModelParallelStrategy):
        return "fsdp2"
    if isinstance(strategy, FSDPStrategy):
        return "fsdp1"
    return None


def adapter_only_saving(strategy: Strategy) -> list[Replacement]:
    """Make every checkpoint written through `strategy` adapter-only while its LightningModule has adapters,
    and (non-FSDP strategies) fill in the base keys of averaging callbacks' copies when a fit resumes.

    Why a replacement (`strategy.save_checkpoint` / `load_checkpoint`): Lightning writes weights-only
    checkpoints (`ModelCheckpoint(save_weights_only=True)`, `trainer.save_checkpoint(path, weights_only=True)`)
    without calling any callback's `on_save_checkpoint`, and callbacks that average the module
    (`WeightAveraging`, `StochasticWeightAveraging`) put copies of it into the checkpoint after, or before,
    ours, depending on their order in the list; `save_checkpoint` receives every checkpoint dict last,
    whatever wrote it (`checkpoint.make_adapter_only`). On load, when training resumes from a checkpoint that
    holds such copies, their base keys are filled in from the module (`checkpoint.restore_base_keys`) because
    those callbacks load them strictly.

    Installed once per strategy; the callback leaves it in place at teardown (a checkpoint is often saved
    after `fit`, `trainer.save_checkpoint`), and the wrappers pass everything through once the module has no
    adapters (merged, or another module). The returned records undo it (`undo_replacements(strategy,
    owner=strategies.OWNER)` does too). FSDP strategies keep their own loading (`adapter_only_checkpoints`);
    only saving is wrapped there.

    Returns:
        The replacements made now (empty when already installed).

    Example:
        >>> from lightning.pytorch.strategies import SingleDeviceStrategy
        >>> strategy = SingleDeviceStrategy("cpu")
        >>> made = adapter_only_saving(strategy)
        >>> [r.name for r in made], adapter_only_saving(strategy)
        (['save_checkpoint', 'load_checkpoint'], [])
        >>> for r in reversed(made): r.undo()
        >>> "save_checkpoint" in vars(strategy)
        False
    """
    if find_replacement(strategy, "save_checkpoint", owner=OWNER) is not None:
        return []
    original_save = strategy.save_checkpoint

    def save_checkpoint(checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        module = strategy.lightning_module
        if module is not None and has_lora(module):
            make_adapter_only(checkpoint, module)  # the trained adapter's config
        original_save(checkpoint, filepath, storage_options=storage_options)

    made = [replace_attribute(strategy, "save_checkpoint", save_checkpoint, owner=OWNER, missing_hook=(
        "no callback hook sees weights-only checkpoints nor averaging callbacks' copies; save_checkpoint gets "
        "every checkpoint dict last"))]
    if strategy_kind(strategy) is not None:
        return made
    original_load = strategy.load_checkpoint

    def load_checkpoint(checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = original_load(checkpoint_path, weights_only=weights_only)
        module = strategy.lightning_module
        trainer = getattr(module, "_trainer", None)
        if (module is not None and trainer is not None and trainer.state.fn == TrainerFn.FITTING
                and has_lora(module) and not is_merged(module) and isinstance(checkpoint, dict)):
            restore_base_keys(checkpoint, module)
        return checkpoint

    made.append(replace_attribute(strategy, "load_checkpoint", load_checkpoint, owner=OWNER, missing_hook=(
        "no hook between reading a checkpoint and averaging callbacks' strict loads of their copies")))
    return made


def adapter_only_checkpoints(strategy: Any, pl_module: nn.Module) -> Callable[[], None]:
    """Make an FSDP strategy (`ModelParallelStrategy`, `FSDPStrategy`) save and load only the adapters:
    the strategies' state-dict path has no hook, so its methods are replaced (`lightning_lora.replacements`).
    Returns a function that undoes it.

    * `lightning_module_state_dict`: the saved keys only. For a distributed checkpoint (a directory that
      every rank writes with `torch.distributed.checkpoint`) the adapter shards as they are; for a
      single-file checkpoint (`save_distributed_checkpoint=False`, `state_dict_type="full"`) the full
      adapter tensors on rank 0, which alone writes the file. The base is never gathered, copied or written.
    * `load_checkpoint` of a distributed checkpoint: the adapter tensors and the optimizer state (which
      holds only adapters) are read after the checkpoint's LoRA config is checked against this run's. A
      single-file checkpoint goes through Lightning's own path (base keys absent, adapter keys checked by
      the callback's `load_state_dict` pre-hook).

    Example:
        >>> undo = adapter_only_checkpoints(trainer.strategy, pl_module)   # doctest: +SKIP
    """
    kind = strategy_kind(strategy)
    original_state_dict = strategy.lightning_module_state_dict
    original_load = strategy.load_checkpoint

    def lightning_module_state_dict() -> dict[str, Any]:
        if not has_lora(pl_module):
            return original_state_dict()
        if kind == "fsdp1":
            restore_frozen_views(strategy.model)  # the FSDP root wraps the LightningModule
        if kind == "fsdp2":
            return adapter_state_dict(pl_module, full=not getattr(strategy, "_save_distributed_checkpoint", True))
        if getattr(strategy, "_state_dict_type", "full") == "full":
            return fsdp1_adapter_state_dict(pl_module)
        return original_state_dict()  # FSDP1 sharded: shard views, no gather; the callback keeps the adapters

    def load_checkpoint(checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(strategy.broadcast(checkpoint_path))
        if not is_sharded_checkpoint(path) or not has_lora(pl_module):
            return original_load(checkpoint_path, weights_only=weights_only)
        if kind == "fsdp2":
            return load_sharded_adapters(path, pl_module, strategy.optimizers, weights_only=weights_only)
        return _load_sharded_adapters_fsdp1(path, strategy, pl_module, weights_only)

    made = [replace_attribute(strategy, "lightning_module_state_dict", lightning_module_state_dict, owner=OWNER,
                              missing_hook="no hook on the strategy's module state dict (it gathers the whole model)"),
            replace_attribute(strategy, "load_checkpoint", load_checkpoint, owner=OWNER, missing_hook=(
                "no hook on loading a distributed checkpoint (the strategy loads every key of the model)"))]

    def undo() -> None:
        for record in reversed(made):
            record.undo()

    return undo


def _load_sharded_adapters_fsdp1(path: Path, strategy: Any, pl_module: nn.Module,
                                 weights_only: bool | None) -> dict[str, Any]:
    """Lightning's `FSDPStrategy.load_checkpoint` for a distributed checkpoint, restricted to the saved keys."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.optimizer import load_sharded_optimizer_state_dict
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    metadata = torch.load(path / SHARDED_METADATA, weights_only=weights_only)
    check_checkpoint_config(metadata, get_lora_config(pl_module), str(path))
    restore_frozen_views(strategy.model)
    keys = set(saved_keys(pl_module))
    model = strategy.model
    with _get_sharded_state_dict_context(model):
        module_state = {"model": {k: v for k, v in model.state_dict().items() if clean_name(k) in keys}}
        dcp.load(module_state, checkpoint_id=str(path))
        model.load_state_dict(module_state["model"], strict=False)
        if pl_module.trainer.state.fn == "fit" and strategy.optimizers:
            reader = dcp.FileSystemReader(str(path))
            for idx, optim in enumerate(strategy.optimizers):
                key = f"optimizer_{idx}"
                optim_state = load_sharded_optimizer_state_dict(model_state_dict=module_state["model"],
                                                                optimizer_key=key, storage_reader=reader)
                optim.load_state_dict(FSDP.optim_state_dict_to_load(optim_state_dict=optim_state[key], model=model,
                                                                    optim=optim))
    return metadata


def prepare_fsdp1(strategy: Any, pl_module: nn.Module) -> None:
    """Give Lightning's `FSDPStrategy` the LoRA auto-wrap policy (`fsdp1_auto_wrap_policy`) before it wraps
    the injected module, or refuse a combination that cannot work.

    Raises:
        LoRAError: naming `ModelParallelStrategy`, when the strategy's own `auto_wrap_policy` is not a set of
            layer classes that could be combined with the adapter units, when the module is already wrapped,
            or when `use_orig_params=False` would put trainable and frozen parameters in one flat parameter.

    Example:
        >>> prepare_fsdp1(trainer.strategy, pl_module)   # doctest: +SKIP
    """
    refuse_presharded(pl_module)
    refuse_dora(pl_module)
    refuse_unshardable_layers(pl_module)
    if is_sharded(pl_module):
        raise LoRAError("The module was wrapped with FSDP in configure_model; with FSDPStrategy let the strategy "
                        "wrap it (the LoRA callback gives it an auto-wrap policy with adapter units), or use "
                        "ModelParallelStrategy (FSDP2), where lightning_lora.fsdp.shard_lora_model shards it.")
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    kwargs = strategy.kwargs
    user = kwargs.get("auto_wrap_policy")
    classes: Sequence[type] | None = None
    if isinstance(user, ModuleWrapPolicy):
        classes = tuple(user._module_classes)
    elif user is not None:
        raise LoRAError(
            f"FSDPStrategy(auto_wrap_policy={user!r}) cannot be combined with LoRA's adapter units: FSDP1 flattens "
            "each unit into one tensor of one dtype, so fp32 adapters must sit in units of their own. Pass the "
            "layer classes as a set (auto_wrap_policy={LlamaDecoderLayer}), or use ModelParallelStrategy "
            "(FSDP2), which the LoRA callback shards by itself.")
    policy = fsdp1_auto_wrap_policy(pl_module, classes)
    if not kwargs.get("use_orig_params", True):
        trainable = [n for n, p in pl_module.named_parameters() if p.requires_grad and not is_lora_key(n)]
        if trainable:
            raise LoRAError(f"FSDPStrategy(use_orig_params=False) with trainable base parameters ({trainable[:3]}): "
                            "a flat parameter cannot mix trainable and frozen tensors. Set use_orig_params=True, "
                            "drop bias/modules_to_save, or use ModelParallelStrategy (FSDP2).")
    kwargs["auto_wrap_policy"] = policy


def inject_and_shard(strategy: Any, pl_module: nn.Module, kind: str, inject: Callable[[], None],
                     options: FSDPOptions) -> tuple[Any, dict[str, float]] | None:
    """Right after `configure_model` under an FSDP strategy: `inject()`, then shard (FSDP2, `kind="fsdp2"`)
    or hand the strategy an auto-wrap policy with adapter units (FSDP1, `kind="fsdp1"`).

    Returns:
        FSDP1: the parameter summary and weight norms of the full model, measured before FSDP1 flattens
        its parameters; FSDP2: None (they are measured on the DTensors).

    Raises:
        LoRAError: the network was sharded in `configure_model`, or `options.auto` is off and
            `configure_model` did not call `shard_lora_model`; see also `prepare_fsdp1`.

    Example:
        >>> inject_and_shard(trainer.strategy, pl_module, "fsdp2", inject, FSDPOptions())   # doctest: +SKIP
    """
    refuse_presharded(pl_module)
    inject()
    if kind == "fsdp1":
        before = (parameter_summary(pl_module), weight_norms(pl_module))
        prepare_fsdp1(strategy, pl_module)
        return before
    if not is_sharded(pl_module):
        if not options.auto:
            raise LoRAError("LoRA(fsdp={'auto': False}) but configure_model did not shard the model; call "
                            "lightning_lora.fsdp.shard_lora_model(self) at the end of configure_model.")
        units = shard_lora_model(pl_module, options=options)
        kinds = {k: sum(u.kind == k for u in units) for k in ("layer", "adapters", "embedding", "head", "root")}
        rank_zero_info("LoRA: sharded with FSDP2 (fully_shard) in " + ", ".join(
            f"{n} {k} unit{'s' if n != 1 else ''}" for k, n in kinds.items() if n))
    return None


def fit_end_sharded(strategy: Any, pl_module: nn.Module, adapter_dir: str | os.PathLike | None,
                    merged_dir: str | os.PathLike | None, merge_on_fit_end: bool) -> None:
    """Fit end of a sharded model (every rank calls the collectives): the adapters are gathered (never
    the base) and written by rank 0 to `adapter_dir` (PEFT format); no merge in memory; the merged model
    goes to `merged_dir` only under FSDP2 and when it fits on rank 0 (`write_merged`), else a warning
    names the offline `lightning-lora merge` command.

    Example:
        >>> fit_end_sharded(trainer.strategy, pl_module, "out/adapter", None, True)   # doctest: +SKIP
    """
    fsdp1 = strategy_kind(strategy) == "fsdp1"
    if adapter_dir is not None:
        write_adapter(pl_module, adapter_dir, fsdp1_adapter_state_dict(pl_module) if fsdp1 else None)
        rank_zero_info(f"LoRA: adapter written to {adapter_dir} (PEFT format, gathered from the shards)")
    offline = (f"lightning-lora merge --base <base model> --adapter {adapter_dir or '<adapter dir>'} "
               f"--out {merged_dir or '<merged dir>'}")
    done = None
    if merged_dir is not None:
        done = "not supported under FSDPStrategy" if fsdp1 else write_merged(pl_module, merged_dir)
        if done == "written":
            rank_zero_info(f"LoRA: merged model written to {merged_dir} (gathered on rank 0)")
        else:
            rank_zero_warn(f"LoRA: the merged model was not written to {merged_dir} ({done}); merge offline "
                           f"from the adapter: {offline}")
    if merge_on_fit_end:
        where = f"the merged model is in {merged_dir}" if done == "written" else f"merge offline: {offline}"
        rank_zero_info(f"LoRA: the model is sharded (FSDP), so its adapters stay unmerged in memory (outputs are "
                       f"the same); {where}")


__all__ = ["OWNER", "adapter_only_checkpoints", "adapter_only_saving", "fit_end_sharded", "inject_and_shard",
           "prepare_fsdp1", "strategy_kind"]
