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

With `adapter_name` on a module that already carries adapters (loaded in its `__init__` or `configure_model`,
e.g. with `load_adapter`), step 1 adds a new adapter beside them (`inject_lora(..., adapter_name=)`): it runs
with the active ones and is the only one that trains; the optimizers, the checkpoints and `adapter_dir` hold it
alone; the merge at fit end merges every active adapter (undone as for one adapter).

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
import dataclasses
import shutil
import weakref
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, StochasticWeightAveraging, WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_lora._io import atomic_directory
from lightning_lora.checkpoint import (
    adapter_config,
    check_adapter_keys,
    check_checkpoint_adapters,
    check_checkpoint_config,
    trained_adapter,
)
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
    STATE_ATTR,
    AdapterProbe,
    MergedAdapters,
    active_adapters,
    adapter_grad_norm,
    adapter_keys,
    adapter_names,
    delta_ratio,
    enable_input_grads_for_checkpointing,
    forget_merged,
    get_lora_config,
    has_lora,
    inject_lora,
    is_lora_key,
    is_merged,
    lora_layers,
    lora_states,
    merge_and_unload,
    networks_to_skip,
    parameter_summary,
    restrict_optimizers,
    set_adapter,
    unmerge_and_reinject,
    weight_norms,
)

#: `gguf_outtype` values (`gguf_export.OUTTYPES`; repeated here so the callback imports no gguf code)
GGUF_OUTTYPES = ("f32", "f16", "bf16", "q8_0")

#: the adapters a `LoRA(adapter_name=...)` callback added to a module (a later fit or evaluation, with this
#: callback or another with the same name and config, uses them again instead of refusing the name)
_ADDED: weakref.WeakKeyDictionary[torch.nn.Module, set[str]] = weakref.WeakKeyDictionary()


def _merged_config(module: torch.nn.Module, name: str | None) -> LoRAConfig | None:
    """The config of the merged adapter `name` (None: the first) that `merge_and_unload(keep=True)` kept on
    `module`, or None."""
    record = module.__dict__.get(STATE_ATTR)
    if not isinstance(record, MergedAdapters):
        return None
    for _, state in record.states:
        if name in (None, state.adapter_name):
            return state.config
        if name in state.others:
            return state.others[name].config
    return None


def _save_adapter_alone(module: torch.nn.Module, directory: str, name: str) -> None:
    """Write adapter `name` of `module` alone in PEFT format, its two files directly in `directory` (atomically;
    `save_adapter` puts an adapter named other than "default" in a subfolder of its name, PEFT's layout of a
    directory of several adapters)."""
    with atomic_directory(directory, overwrite=True) as tmp:
        staged = save_adapter(module, tmp / ".staged", selected_adapters=[name])
        for file in list((staged / name if name != "default" else staged).iterdir()):
            if file.is_file():
                file.rename(tmp / file.name)
        shutil.rmtree(staged)


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
        adapter_name: train a new adapter of this name beside the adapters the module already carries (loaded
            in its `__init__` or `configure_model`, e.g. `load_adapter(self.model, path)`): they keep running
            but stay frozen, out of the optimizer and out of the checkpoints (which hold the new adapter alone,
            its config and name, and the names of the others: the module's code loads them again on resume);
            `adapter_dir` gets the new adapter alone (its files directly in the directory; load it beside the
            others with `load_adapter(model, adapter_dir, adapter_name=...)`); the merge at fit end merges every
            active adapter, the frozen ones and the new one. A name the module already has is refused. On a
            module without adapters it is the name of the one adapter. Default None: one adapter ("default"), or
            the module's own adapters when they have this callback's config.

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
                 fsdp: dict[str, Any] | bool | None = None, adapter_name: str | None = None,
                 **config: Any) -> None:
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
        if adapter_name is not None and (not isinstance(adapter_name, str) or not adapter_name.strip()
                                         or "." in adapter_name or adapter_name == "__base__"):
            raise LoRAConfigError(f"adapter_name={adapter_name!r} is invalid; expected a non-empty name without dots "
                                  "(it becomes part of state-dict keys), e.g. adapter_name='new'.")
        self.adapter_name = adapter_name
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
            merged = _merged_config(pl_module, self.adapter_name)
            if merged in (self.config, dataclasses.replace(self.config, task_heads=False)):
                unmerge_and_reinject(pl_module)
            else:  # another config: the merged model is the new base
                forget_merged(pl_module)
        name = self.adapter_name
        if name is not None and lora_states(pl_module):
            self._add_named(pl_module, name)
        elif has_lora(pl_module):
            existing = get_lora_config(pl_module)
            if existing != self.config:
                raise LoRAError("The module already has LoRA adapters with another config:\n  " +
                                "\n  ".join(self.config.describe_differences(existing)) +
                                "\nUse one LoRA callback, or drop apply_lora() from the module.")
        else:
            inject_lora(pl_module, self.config, skip=networks_to_skip(pl_module, self.networks),
                        adapter_name=name or "default")
            if name is not None:
                _ADDED.setdefault(pl_module, set()).add(name)
        self.adapted_modules = [path for path, layer in lora_layers(pl_module)
                                if name is None or layer.adapter_slot(name) is not None]
        if self.merge_on_fit_end:  # refused now rather than after training (a grouped conv cannot be merged)
            for name, layer in lora_layers(pl_module):
                layer.check_merge(name)

    def _add_named(self, pl_module: pl.LightningModule, name: str) -> None:
        """`adapter_name` on a module with adapters: add adapter `name` beside them (it alone trains), or, in a
        later fit or evaluation, train again the one a `LoRA(adapter_name=name)` added (same config)."""
        names = adapter_names(pl_module)
        if name not in names:
            path = lora_states(pl_module)[0][0]
            if self.networks and not any(path == n or path.startswith(n + ".") for n in self.networks):
                raise LoRAError(f"LoRA(adapter_name={name!r}, networks={self.networks}): the adapters {names} are in "
                                f"{path!r}, outside those networks; a new adapter is added to the network that holds "
                                "them.")
            skip = [s[len(path) + 1:] if path else s for s in networks_to_skip(pl_module, self.networks)
                    if not path or s.startswith(path + ".")]
            inject_lora(pl_module, self.config, skip=skip, adapter_name=name)
            _ADDED.setdefault(pl_module, set()).add(name)
            return
        params = dict(pl_module.named_parameters())
        trains = any(params[k].requires_grad for k in adapter_keys(pl_module, name) if k in params)
        if name not in _ADDED.get(pl_module, set()) and not trains:
            raise LoRAError(f"LoRA(adapter_name={name!r}): the module already has an adapter named {name!r} (its "
                            f"adapters: {names}; {name!r} is frozen, loaded by the module's own code); pass another "
                            "adapter_name= for the adapter to train, e.g. adapter_name='new'.")
        first = lora_states(pl_module)[0][1].adapter_name == name
        expected = self.config if first else dataclasses.replace(self.config, task_heads=False)
        existing = adapter_config(pl_module, name)
        if existing != expected:
            raise LoRAError(f"The module's adapter {name!r} has another config than this LoRA callback's:\n  " +
                            "\n  ".join(expected.describe_differences(existing)) +
                            "\nUse the same settings, or another adapter_name= to train a new adapter.")
        active = active_adapters(pl_module)
        set_adapter(pl_module, active if name in active else [*active, name], trainable=[name])

    def _injecting(self) -> Any:
        """Context of the module's `configure_model` under FSDP: `shard_lora_model(self)` there injects with this
        callback's config (`fsdp.injecting_with`)."""
        return injecting_with(self._inject)

    def _inject_and_shard(self, trainer: pl.Trainer, pl_module: pl.LightningModule, kind: str) -> None:
        """Right after `configure_model` under an FSDP strategy (`lightning_lora.strategies.inject_and_shard`)."""
        if self.adapter_name is not None and lora_states(pl_module):
            raise LoRAError(f"LoRA(adapter_name={self.adapter_name!r}) under FSDP: adding an adapter beside the "
                            f"module's adapters {adapter_names(pl_module)} is not supported with a sharded model yet; "
                            "train it with DDP or on one device.")
        self._before_wrap = inject_and_shard(trainer.strategy, pl_module, kind, lambda: self._inject(pl_module),
                                             self.fsdp)
        self._sharded = True

    def _check_restored(self, trainer: pl.Trainer, module: torch.nn.Module, state_dict: dict[str, Any],
                        prefix: str, *args: Any) -> None:
        """`load_state_dict` pre-hook of the module: undo a merge, then check what is about to load."""
        if prefix:
            return
        loading = getattr(getattr(trainer, "_checkpoint_connector", None), "_loaded_checkpoint", None)
        if is_merged(module) and not has_lora(module):
            unmerge_and_reinject(module)
        if not has_lora(module):
            return
        if loading:  # Lightning is restoring a checkpoint
            check_checkpoint_adapters(loading, module)
            check_checkpoint_config(loading, trained_adapter(module)[1], training=trainer.state.fn == TrainerFn.FITTING)
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
            if self.adapter_name is None:
                save_adapter(pl_module, self.adapter_dir, overwrite=True)
            else:
                _save_adapter_alone(pl_module, self.adapter_dir, self.adapter_name)
            rank_zero_info(f"LoRA: adapter{f' {self.adapter_name!r}' if self.adapter_name else ''} written to "
                           f"{self.adapter_dir} (PEFT format)")
        if not self.merge_on_fit_end:
            return
        several = any(state.others for _, state in lora_states(pl_module))
        merged = f" {active_adapters(pl_module)}" if several else ""
        merge_and_unload(pl_module, keep=True)
        rank_zero_info(f"LoRA: adapters{merged} merged into the base model ({len(self.adapted_modules)} modules)")
        if self.merged_dir is not None and trainer.is_global_zero:
            save_pretrained(pl_module, self.merged_dir)
            rank_zero_info(f"LoRA: merged model written to {self.merged_dir}")
        if self.merged_gguf is not None and trainer.is_global_zero:
            checked = save_merged_gguf(pl_module, self.merged_gguf, self.gguf_outtype)
            rank_zero_info(f"LoRA: merged GGUF ({self.gguf_outtype}) written to {self.merged_gguf} with an Ollama "
                           f"Modelfile; it {checked}")


LoRA.__init__.__signature__, LoRA.__init__.__annotations__ = with_config_fields(LoRA.__init__)  # type: ignore[attr-defined]
