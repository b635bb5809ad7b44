"""The `LoRA` callback: LoRA fine-tuning for any LightningModule, with no change to its code.

It maps Lightning's hooks (order in DESIGN.md) to `surgery` and `checkpoint` functions:

1. `setup`: adapters are injected into the module's networks and the base is frozen; a network built
   in `configure_model` (or the module's own `setup`) is injected right after `configure_model`
   (`_inject_after_configure_model`, the one wrapped method of the module: no hook runs between `configure_model`
   and the restore of a `ckpt_path`).
2. Restoring a `ckpt_path` (a `load_state_dict` pre-hook): the checkpoint's LoRA config must equal
   ours and every adapter key must be present (base keys may be absent).
3. `on_fit_start`: every optimizer is left holding exactly the trainable parameters (before its
   state is restored), its groups split for LoRA+ when `loraplus_lr_ratio` is set
   (`lightning_lora.loraplus`); the parameter table is printed and logged.
4. Every `log_every_n_steps`: `lora/grad_norm` and `lora/delta_ratio`.
5. Every checkpoint the Trainer writes (`Strategy.save_checkpoint`, `strategies.adapter_only_saving`), weights-only
   ones and those edited by averaging callbacks included: only the adapters and `checkpoint["lightning_lora"]`.
6. `on_fit_end`: the PEFT adapter (`adapter_dir`), the merge (`merge_on_fit_end`, reversible: a
   later `validate/test/predict(ckpt_path=...)` or `fit` undoes it), the merged model (`merged_dir`) and its
   verified llama.cpp / Ollama GGUF (`merged_gguf`, `gguf_outtype`).

Under `ModelParallelStrategy` (FSDP2) and `FSDPStrategy` (FSDP1) `lightning_lora.strategies` (over the
torch-only `lightning_lora.fsdp`) does the sharded parts: inject after `configure_model` then shard (FSDP2)
or give the strategy an auto-wrap policy with adapter units (FSDP1); adapter-only state dicts on the
strategy's checkpoint path; adapters gathered at fit end (the base never), the merge left to
`lightning-lora merge` unless the full model fits on rank 0.

Example:
    >>> import lightning as L
    >>> from lightning_lora import LoRA
    >>> trainer = L.Trainer(callbacks=[LoRA(r=8, alpha=16, target_modules=["q_proj", "v_proj"])])  # doctest: +SKIP
    >>> trainer.fit(model, datamodule=dm)                                                          # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, StochasticWeightAveraging, WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_lora.checkpoint import check_adapter_keys, check_checkpoint_config
from lightning_lora.config import LoRAConfig, with_config_fields
from lightning_lora.errors import LoRAConfigError, LoRAError
from lightning_lora.fsdp import (
    FSDPOptions,
    injecting_with,
    is_sharded,
    sharded_delta_ratio,
    sharded_grad_norm,
    sharded_weight_norms,
)
from lightning_lora.gguf_export import require_gguf, save_merged_gguf
from lightning_lora.hub import save_pretrained
from lightning_lora.loraplus import apply_loraplus
from lightning_lora.peft_format import save_adapter
from lightning_lora.quantization import host_init_context, is_quantized_module
from lightning_lora.replacements import replace_attribute
from lightning_lora.strategies import (
    adapter_only_checkpoints,
    adapter_only_saving,
    fit_end_sharded,
    inject_and_shard,
    strategy_kind,
)
from lightning_lora.surgery import (
    AdapterProbe,
    adapter_grad_norm,
    delta_ratio,
    enable_input_grads_for_checkpointing,
    forget_merged,
    get_lora_config,
    has_lora,
    inject_lora,
    is_lora_key,
    is_merged,
    lora_layers,
    merge_and_unload,
    merged_config,
    networks_to_skip,
    parameter_summary,
    restrict_optimizers,
    unmerge_and_reinject,
    weight_norms,
)

#: `gguf_outtype` values (`gguf_export.OUTTYPES`; repeated here so the callback imports no gguf code)
GGUF_OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def _inject_after_configure_model(pl_module: pl.LightningModule, inject: Callable[[], None],
                                  context: Callable[[], Any] = contextlib.nullcontext) -> Callable[[], None]:
    """Run `inject()` right after the module's `configure_model` (itself run inside `context()`): the one
    place where no Lightning hook runs between building the network and restoring a checkpoint into it.
    Replaces `configure_model` with an instance attribute (`lightning_lora.replacements`); the returned
    function undoes it (at teardown)."""
    original = pl_module.configure_model

    def configure_model() -> None:  # no `__wrapped__`: Lightning's `is_overridden` must see an override
        with context():
            original()
        inject()

    return replace_attribute(pl_module, "configure_model", configure_model, owner=__name__, missing_hook=(
        "no hook runs between configure_model and the restore of a ckpt_path")).undo


#: Lightning callbacks that copy the module in their `setup` (to average it): listed before `LoRA`, their
#: `setup` is run again once the adapters are injected, so that their copy has the adapters too
MODULE_COPYING_CALLBACKS: tuple[type[Callback], ...] = (WeightAveraging, StochasticWeightAveraging)


def _refuse_averaging_a_quantized_base(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """An averaging callback on a 4-bit base: one clear error at fit start instead of a crash at its first
    update (torch's `AveragedModel` averages every parameter, and NF4 / bitsandbytes weights support no
    arithmetic: `NF4Tensor dispatch: attempting to run aten.mul.Tensor`)."""
    averaging = [type(cb).__name__ for cb in trainer.callbacks if isinstance(cb, MODULE_COPYING_CALLBACKS)]
    if averaging and any(is_quantized_module(m) for m in pl_module.modules()):
        raise LoRAConfigError(
            f"{averaging[0]} cannot average a model with a 4-bit base: torch's AveragedModel averages every "
            "parameter, the frozen 4-bit weights too, and those support no arithmetic. Remove "
            f"{averaging[0]} from the Trainer's callbacks, or train without a 4-bit base (quantize_base=None).")


class LoRA(Callback):
    """Fine-tune any LightningModule through LoRA adapters.

    Takes every `LoRAConfig` field as a keyword (`r`, `alpha`, `dropout`, `target_modules`, ...;
    the signature is derived from `LoRAConfig`, so the two cannot drift), plus:

    Args:
        merge_on_fit_end: merge the adapters into the base at the end of `fit`, leaving a plain model.
            The merge is reversible: `trainer.validate/test/predict(module, ckpt_path=...)` and a
            second `fit` undo it first (base weights within one float rounding).
        adapter_dir: if set, the final adapter is written there in PEFT format.
        merged_dir: if set, the merged model is written there with `save_pretrained` (needs a
            transformers model inside the module, and `merge_on_fit_end=True`).
        merged_gguf: if set, the merged model is also written to this `.gguf` file for llama.cpp /
            Ollama (rank 0, atomically, read back with transformers' GGUF loader and compared with the
            merged model first; an Ollama `Modelfile` next to it). Needs `merge_on_fit_end=True`, a
            supported architecture (`gguf_export.SUPPORTED_ARCHITECTURES`), the module's `tokenizer`
            and the `gguf` package; not under FSDP (use `lightning-lora merge --format gguf`).
        gguf_outtype: tensor type of `merged_gguf`: `f32`, `f16` (default), `bf16` or `q8_0`.
        log_every_n_steps: how often `lora/grad_norm` and `lora/delta_ratio` are logged.
        networks: paths of the submodules to adapt (e.g. `["student"]`); default: the whole module
            except direct children frozen before setup (a teacher), which are named in the summary.
        fsdp: options for sharding under `ModelParallelStrategy` (`lightning_lora.fsdp.FSDPOptions`
            as a dict, e.g. `{"adapter_units": "separate", "reshard_after_forward": True}`; False: your
            `configure_model` calls `lightning_lora.fsdp.shard_lora_model` itself).

    In a LightningCLI YAML::

        trainer:
          callbacks:
            - class_path: lightning_lora.LoRA
              init_args: {r: 16, alpha: 32, target_modules: [q_proj, v_proj]}

    Example:
        >>> cb = LoRA(r=4, target_modules="all-linear")
        >>> cb.config.r, cb.config.target_modules
        (4, 'all-linear')
    """

    def __init__(self, *, merge_on_fit_end: bool = True, adapter_dir: str | None = None,
                 merged_dir: str | None = None, merged_gguf: str | None = None, gguf_outtype: str = "f16",
                 log_every_n_steps: int = 50, networks: list[str] | None = None,
                 fsdp: dict[str, Any] | bool | None = None, **config: Any) -> None:
        super().__init__()
        if isinstance(config.get("target_modules"), tuple):
            config["target_modules"] = list(config["target_modules"])
        self.config = LoRAConfig(**config)
        if log_every_n_steps < 1:
            raise LoRAConfigError(f"log_every_n_steps={log_every_n_steps} is invalid; expected an integer >= 1.")
        if merged_dir is not None and not merge_on_fit_end:
            raise LoRAConfigError("merged_dir is set but merge_on_fit_end=False; set merge_on_fit_end=True to write "
                                  "the merged model, or drop merged_dir.")
        if merged_gguf is not None and not merge_on_fit_end:
            raise LoRAConfigError("merged_gguf is set but merge_on_fit_end=False; set merge_on_fit_end=True to write "
                                  "the merged GGUF, or drop merged_gguf.")
        if gguf_outtype not in GGUF_OUTTYPES:
            raise LoRAConfigError(f"gguf_outtype={gguf_outtype!r} is invalid; expected one of "
                                  f"{', '.join(GGUF_OUTTYPES)}, e.g. gguf_outtype='q8_0'.")
        self.merge_on_fit_end, self.adapter_dir, self.merged_dir = merge_on_fit_end, adapter_dir, merged_dir
        self.merged_gguf, self.gguf_outtype = merged_gguf, gguf_outtype
        if merged_gguf is not None:  # a missing gguf package fails here, not after training
            require_gguf()
        self.log_every_n_steps = log_every_n_steps
        self.networks = [networks] if isinstance(networks, str) else (list(networks) if networks else None)
        self.fsdp = FSDPOptions.coerce(fsdp)
        self._sharded = False
        self._before_wrap: tuple[Any, dict[str, float]] | None = None  # FSDP1: summary and norms of the full model
        self.adapted_modules: list[str] = []
        self._undo: list[Callable[[], Any]] = []
        self._weight_norms: dict[str, float] = {}
        self._probe: AdapterProbe | None = None
        self._probed = False

    @classmethod
    def from_config(cls, config: LoRAConfig, **kwargs: Any) -> LoRA:
        """Build the callback from a `LoRAConfig` (plus the callback's own keywords).

        Example:
            >>> LoRA.from_config(LoRAConfig(r=4), merge_on_fit_end=False).config.r
            4
        """
        return cls(**config.to_dict(), **kwargs)

    # ------------------------------------------------------------------ injection
    def _inject(self, pl_module: pl.LightningModule) -> None:
        if is_merged(pl_module):  # merged at the end of an earlier fit
            if merged_config(pl_module) == self.config:
                unmerge_and_reinject(pl_module)
            else:  # another config: the merged model is the new base
                forget_merged(pl_module)
        if has_lora(pl_module):
            existing = get_lora_config(pl_module)
            if existing != self.config:
                raise LoRAError("The module already has LoRA adapters with another config:\n  " +
                                "\n  ".join(self.config.describe_differences(existing)) +
                                "\nUse one LoRA callback, or drop apply_lora() from the module.")
        else:
            inject_lora(pl_module, self.config, skip=networks_to_skip(pl_module, self.networks))
        self.adapted_modules = [name for name, _ in lora_layers(pl_module)]
        if self.merge_on_fit_end:  # refused now rather than after training (a grouped conv cannot be merged)
            for name, layer in lora_layers(pl_module):
                layer.check_merge(name)

    def _injecting(self) -> Any:
        """Context of the module's `configure_model` under FSDP: `shard_lora_model(self)` there injects with this
        callback's config (`fsdp.injecting_with`)."""
        return injecting_with(self._inject)

    def _inject_and_shard(self, trainer: pl.Trainer, pl_module: pl.LightningModule, kind: str) -> None:
        """Right after `configure_model` under an FSDP strategy (`lightning_lora.strategies.inject_and_shard`)."""
        self._before_wrap = inject_and_shard(trainer.strategy, pl_module, kind, lambda: self._inject(pl_module),
                                             self.fsdp)
        self._sharded = True

    def _check_restored(self, trainer: pl.Trainer, module: torch.nn.Module, state_dict: dict[str, Any],
                        prefix: str, *args: Any) -> None:
        """`load_state_dict` pre-hook of the module: undo a merge, then check what is about to load."""
        if prefix:
            return
        if is_merged(module) and not has_lora(module):
            unmerge_and_reinject(module)
        if not has_lora(module):
            return
        loading = getattr(getattr(trainer, "_checkpoint_connector", None), "_loaded_checkpoint", None)
        if loading:  # Lightning is restoring a checkpoint
            check_checkpoint_config(loading, get_lora_config(module), training=trainer.state.fn == TrainerFn.FITTING)
            check_adapter_keys(module, state_dict)
        elif any(is_lora_key(k) for k in state_dict):  # an adapter state dict loaded by hand
            check_adapter_keys(module, state_dict, "The state dict")

    def _recopy_earlier_averaging(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Averaging callbacks listed before this one copied the module before it had adapters: run their
        `setup` again so that their copy is of the injected module (any callback order works)."""
        if stage != "fit" or self not in trainer.callbacks:
            return
        for callback in trainer.callbacks[:trainer.callbacks.index(self)]:
            if isinstance(callback, MODULE_COPYING_CALLBACKS):
                callback.setup(trainer, pl_module, stage)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        adapter_only_saving(trainer.strategy)  # left in place at teardown (see its docstring)
        previous = pl_module._strict_loading
        pl_module.strict_loading = False  # adapter-only checkpoints; adapter keys are checked by the pre-hook
        self._undo = [lambda: setattr(pl_module, "_strict_loading", previous)]
        handle = pl_module.register_load_state_dict_pre_hook(
            lambda *args: self._check_restored(trainer, *args))
        self._undo.append(handle.remove)
        if is_merged(pl_module) and stage != "fit":
            return  # evaluate the merged model as it is, unless a checkpoint is loaded (the pre-hook)
        kind = strategy_kind(trainer.strategy)
        if kind is not None:  # FSDP: adapter-only state dicts; inject (and shard) once the network exists
            self._undo.append(adapter_only_checkpoints(trainer.strategy, pl_module))
            self._undo.append(_inject_after_configure_model(
                pl_module, lambda: self._inject_and_shard(trainer, pl_module, kind), self._injecting))
            return
        try:
            self._inject(pl_module)
            self._recopy_earlier_averaging(trainer, pl_module, stage)
        except LoRAError as err:
            if "matched no module" not in str(err) or not callable(getattr(pl_module, "configure_model", None)):
                raise
            # the network is built later, in configure_model or the module's own setup
            # (with quantize_base the network is built in host memory and reaches the device in 4 bits)
            self._undo.append(_inject_after_configure_model(pl_module, lambda: self._inject(pl_module),
                                                            lambda: host_init_context(self.config)))

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._probe is not None:
            self._probe.close()
            self._probe = None
        for undo in reversed(self._undo):
            undo()
        self._undo = []

    # ------------------------------------------------------------------ fit start: optimizers, table, logging
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not has_lora(pl_module):
            raise LoRAError("The LoRA callback found no adapters at fit start; was the model replaced after setup?")
        _refuse_averaging_a_quantized_base(trainer, pl_module)
        restrict_optimizers(pl_module, trainer.optimizers)
        if self.config.loraplus_lr_ratio is not None:  # LoRA+: B (and 1-D parameters) at ratio x the group's lr
            apply_loraplus(pl_module, trainer.optimizers, [c.scheduler for c in trainer.lr_scheduler_configs],
                           self.config.loraplus_lr_ratio, self.config.loraplus_lr_embedding)
        enable_input_grads_for_checkpointing(pl_module)
        self._probed = False
        before, self._before_wrap = self._before_wrap, None
        summary = before[0] if before is not None else parameter_summary(pl_module)
        rank_zero_info(f"LoRA: {len(self.adapted_modules)} modules adapted\n{summary}")
        self._sharded = is_sharded(pl_module)
        self._weight_norms = before[1] if before is not None else (
            sharded_weight_norms(pl_module) if self._sharded else weight_norms(pl_module))
        metrics = {"lora/trainable_params": float(summary.trainable), "lora/total_params": float(summary.total),
                   "lora/trainable_percent": summary.trainable_percent}
        hparams = {f"lora/{k}": (v if isinstance(v, (int, float, bool, str)) or v is None else str(v))
                   for k, v in self.config.to_dict().items()}
        for logger in trainer.loggers:
            logger.log_hyperparams(hparams)
            logger.log_metrics(metrics, step=trainer.global_step)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._probe is None and not self._probed:  # the first batch of this fit
            self._probe, self._probed = AdapterProbe(pl_module), True

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        silent = self._probe.close() if self._probe is not None else []
        self._probe = None
        if silent:
            rank_zero_warn(f"LoRA: {len(silent)} adapted layer(s) did not run in the first training step: "
                           f"{', '.join(silent[:6])}{' ...' if len(silent) > 6 else ''}. If their parent reads their "
                           ".weight directly instead of calling them, their adapters never train; exclude them "
                           "(exclude_modules). Layers that only some inputs reach (MoE experts) are fine.")

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if trainer.global_step % self.log_every_n_steps != 0 or not trainer.loggers:
            return
        if self._sharded:  # every rank takes part in the reductions
            metrics = {"lora/grad_norm": sharded_grad_norm(pl_module),
                       "lora/delta_ratio": sharded_delta_ratio(pl_module, self._weight_norms)}
        else:
            metrics = {"lora/grad_norm": adapter_grad_norm(pl_module),
                       "lora/delta_ratio": delta_ratio(pl_module, self._weight_norms)}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    # ------------------------------------------------------ fit end (checkpoints: strategies.adapter_only_saving)
    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.interrupted or not has_lora(pl_module):
            return
        if is_sharded(pl_module):  # every rank takes part in gathering the adapters
            fit_end_sharded(trainer.strategy, pl_module, self.adapter_dir, self.merged_dir, self.merge_on_fit_end)
            if self.merged_gguf is not None:
                rank_zero_warn(f"LoRA: merged_gguf={self.merged_gguf!r} is not written for a sharded model; write it "
                               "from the adapter with: lightning-lora merge --base BASE --adapter ADAPTER_DIR --out "
                               "DIR --format gguf")
            return
        if self.adapter_dir is not None and trainer.is_global_zero:
            save_adapter(pl_module, self.adapter_dir, overwrite=True)
            rank_zero_info(f"LoRA: adapter written to {self.adapter_dir} (PEFT format)")
        if not self.merge_on_fit_end:
            return
        merge_and_unload(pl_module, keep=True)
        rank_zero_info(f"LoRA: adapters merged into the base model ({len(self.adapted_modules)} modules)")
        if self.merged_dir is not None and trainer.is_global_zero:
            save_pretrained(pl_module, self.merged_dir)
            rank_zero_info(f"LoRA: merged model written to {self.merged_dir}")
        if self.merged_gguf is not None and trainer.is_global_zero:
            checked = save_merged_gguf(pl_module, self.merged_gguf, self.gguf_outtype)
            rank_zero_info(f"LoRA: merged GGUF ({self.gguf_outtype}) written to {self.merged_gguf} with an Ollama "
                           f"Modelfile; it {checked}")


LoRA.__init__.__signature__, LoRA.__init__.__annotations__ = with_config_fields(LoRA.__init__)  # type: ignore[attr-defined]
