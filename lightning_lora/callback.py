"""The `LoRA` callback: LoRA fine-tuning for any LightningModule, with no change to its code.

It maps Lightning's hooks (order in DESIGN.md) to `surgery` and `checkpoint` functions:

1. `setup`: adapters are injected into the module's networks and the base is frozen; a network built
   in `configure_model` (or the module's own `setup`) is injected right after `configure_model`
   (`_inject_after_configure_model`, the one wrapped method: no hook runs between `configure_model`
   and the restore of a `ckpt_path`).
2. Restoring a `ckpt_path` (a `load_state_dict` pre-hook): the checkpoint's LoRA config must equal
   ours and every adapter key must be present (base keys may be absent).
3. `on_fit_start`: every optimizer is left holding exactly the trainable parameters (before its
   state is restored), its groups split for LoRA+ when `loraplus_lr_ratio` is set
   (`lightning_lora.loraplus`); the parameter table is printed and logged.
4. Every `log_every_n_steps`: `lora/grad_norm` and `lora/delta_ratio`.
5. `on_save_checkpoint`: only the adapters and `checkpoint["lightning_lora"]`.
6. `on_fit_end`: the PEFT adapter (`adapter_dir`), the merge (`merge_on_fit_end`, reversible: a
   later `validate/test/predict(ckpt_path=...)` or `fit` undoes it) and the merged model (`merged_dir`).

Example:
    >>> import lightning as L
    >>> from lightning_lora import LoRA
    >>> trainer = L.Trainer(callbacks=[LoRA(r=8, alpha=16, target_modules=["q_proj", "v_proj"])])  # doctest: +SKIP
    >>> trainer.fit(model, datamodule=dm)                                                          # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_lora.checkpoint import check_adapter_keys, check_checkpoint_config, make_adapter_only
from lightning_lora.config import LoRAConfig
from lightning_lora.errors import LoRAConfigError, LoRAError
from lightning_lora.loraplus import apply_loraplus
from lightning_lora.matching import outermost
from lightning_lora.surgery import (
    MERGED_ATTR,
    adapter_grad_norm,
    delta_ratio,
    enable_input_grads_for_checkpointing,
    get_lora_config,
    has_lora,
    inject_lora,
    is_lora_key,
    is_merged,
    lora_layers,
    merge_and_unload,
    merged_config,
    parameter_summary,
    restrict_optimizers,
    unmerge_and_reinject,
    weight_norms,
)


def networks_to_skip(pl_module: torch.nn.Module, networks: list[str] | None) -> list[str]:
    """The subtrees of `pl_module` the callback leaves alone.

    With `networks` (paths inside the module), everything outside them; otherwise the direct children
    whose parameters were all frozen before setup (a teacher), when another child has trainable ones.

    Raises:
        LoRAConfigError: a path in `networks` that is not a submodule.

    Example:
        >>> from torch import nn
        >>> m = nn.Module(); m.student = nn.Linear(2, 2); m.teacher = nn.Linear(2, 2).requires_grad_(False)
        >>> networks_to_skip(m, None), networks_to_skip(m, ["teacher"])
        (['teacher'], ['student'])
    """
    if networks:
        for path in networks:
            try:
                pl_module.get_submodule(path)
            except AttributeError:
                children = ", ".join(n for n, _ in pl_module.named_children())
                raise LoRAConfigError(f"networks={networks!r}: {path!r} is not a submodule of "
                                      f"{type(pl_module).__name__}; its submodules are: {children}.") from None
        return outermost(n for n, _ in pl_module.named_modules()
                         if n and not any(n == p or n.startswith(p + ".") or p.startswith(n + ".") for p in networks))
    children = [(n, [p.requires_grad for p in c.parameters()]) for n, c in pl_module.named_children()]
    if not any(any(flags) for _, flags in children):
        return []
    return [n for n, flags in children if flags and not any(flags)]


def _inject_after_configure_model(pl_module: pl.LightningModule, inject: Callable[[], None]) -> Callable[[], None]:
    """Run `inject()` right after the module's `configure_model`: the one place where no Lightning hook
    runs between building the network and restoring a checkpoint into it. Wraps `configure_model`
    with an instance attribute; the returned function undoes it (called at teardown)."""
    original = pl_module.configure_model

    def configure_model() -> None:  # no `__wrapped__`: Lightning's `is_overridden` must see an override
        original()
        inject()

    pl_module.__dict__["configure_model"] = configure_model
    return lambda: pl_module.__dict__.pop("configure_model", None)


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
        log_every_n_steps: how often `lora/grad_norm` and `lora/delta_ratio` are logged.
        networks: paths of the submodules to adapt (e.g. `["student"]`); default: the whole module
            except direct children frozen before setup (a teacher), which are named in the summary.

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
                 merged_dir: str | None = None, log_every_n_steps: int = 50, networks: list[str] | None = None,
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
        self.merge_on_fit_end, self.adapter_dir, self.merged_dir = merge_on_fit_end, adapter_dir, merged_dir
        self.log_every_n_steps = log_every_n_steps
        self.networks = [networks] if isinstance(networks, str) else (list(networks) if networks else None)
        self.adapted_modules: list[str] = []
        self._undo: list[Callable[[], Any]] = []
        self._weight_norms: dict[str, float] = {}

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
                del pl_module.__dict__[MERGED_ATTR]
        if has_lora(pl_module):
            existing = get_lora_config(pl_module)
            if existing != self.config:
                raise LoRAError("The module already has LoRA adapters with another config:\n  " +
                                "\n  ".join(self.config.describe_differences(existing)) +
                                "\nUse one LoRA callback, or drop apply_lora() from the module.")
        else:
            inject_lora(pl_module, self.config, skip=networks_to_skip(pl_module, self.networks))
        self.adapted_modules = [name for name, _ in lora_layers(pl_module)]

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
            check_checkpoint_config(loading, get_lora_config(module))
            check_adapter_keys(module, state_dict)
        elif any(is_lora_key(k) for k in state_dict):  # an adapter state dict loaded by hand
            check_adapter_keys(module, state_dict, "The state dict")

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        previous = pl_module._strict_loading
        pl_module.strict_loading = False  # adapter-only checkpoints; adapter keys are checked by the pre-hook
        self._undo = [lambda: setattr(pl_module, "_strict_loading", previous)]
        handle = pl_module.register_load_state_dict_pre_hook(
            lambda *args: self._check_restored(trainer, *args))
        self._undo.append(handle.remove)
        if is_merged(pl_module) and stage != "fit":
            return  # evaluate the merged model as it is, unless a checkpoint is loaded (the pre-hook)
        try:
            self._inject(pl_module)
        except LoRAError as err:
            if "matched no module" not in str(err) or not callable(getattr(pl_module, "configure_model", None)):
                raise
            # the network is built later, in configure_model or the module's own setup
            self._undo.append(_inject_after_configure_model(pl_module, lambda: self._inject(pl_module)))

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo = []

    # ------------------------------------------------------------------ fit start: optimizers, table, logging
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not has_lora(pl_module):
            raise LoRAError("The LoRA callback found no adapters at fit start; was the model replaced after setup?")
        restrict_optimizers(pl_module, trainer.optimizers)
        if self.config.loraplus_lr_ratio is not None:  # LoRA+: B (and 1-D parameters) at ratio x the group's lr
            apply_loraplus(pl_module, trainer.optimizers, [c.scheduler for c in trainer.lr_scheduler_configs],
                           self.config.loraplus_lr_ratio, self.config.loraplus_lr_embedding)
        enable_input_grads_for_checkpointing(pl_module)
        summary = parameter_summary(pl_module)
        rank_zero_info(f"LoRA: {len(self.adapted_modules)} modules adapted\n{summary}")
        self._weight_norms = weight_norms(pl_module)
        metrics = {"lora/trainable_params": float(summary.trainable), "lora/total_params": float(summary.total),
                   "lora/trainable_percent": summary.trainable_percent}
        hparams = {f"lora/{k}": (v if isinstance(v, (int, float, bool, str)) or v is None else str(v))
                   for k, v in self.config.to_dict().items()}
        for logger in trainer.loggers:
            logger.log_hyperparams(hparams)
            logger.log_metrics(metrics, step=trainer.global_step)

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if trainer.global_step % self.log_every_n_steps != 0 or not trainer.loggers:
            return
        metrics = {"lora/grad_norm": adapter_grad_norm(pl_module),
                   "lora/delta_ratio": delta_ratio(pl_module, self._weight_norms)}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    # ------------------------------------------------------------------ checkpoints and fit end
    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if has_lora(pl_module):  # once merged, a plain model is saved whole
            make_adapter_only(checkpoint, pl_module, self.config)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.interrupted or not has_lora(pl_module):
            return
        if self.adapter_dir is not None and trainer.is_global_zero:
            from lightning_lora.peft_format import save_adapter

            save_adapter(pl_module, self.adapter_dir, overwrite=True)
            rank_zero_info(f"LoRA: adapter written to {self.adapter_dir} (PEFT format)")
        if not self.merge_on_fit_end:
            return
        merge_and_unload(pl_module, keep=True)
        rank_zero_info(f"LoRA: adapters merged into the base model ({len(self.adapted_modules)} modules)")
        if self.merged_dir is not None and trainer.is_global_zero:
            from lightning_lora.hub import save_pretrained

            save_pretrained(pl_module, self.merged_dir)
            rank_zero_info(f"LoRA: merged model written to {self.merged_dir}")


def _derive_signature() -> None:
    """Give `LoRA.__init__` the real signature: every `LoRAConfig` field (name, type, default) as a
    keyword, then the callback's own, so that LightningCLI / jsonargparse validate YAML values."""
    own = inspect.signature(LoRA.__init__)
    hints = typing.get_type_hints(LoRAConfig)
    params = [own.parameters["self"]]
    for f in dataclasses.fields(LoRAConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=hints[f.name]))
    params += [p for n, p in own.parameters.items() if n not in ("self", "config")]
    own_hints = typing.get_type_hints(LoRA.__init__)
    LoRA.__init__.__signature__ = inspect.Signature(params, return_annotation=None)  # type: ignore[attr-defined]
    LoRA.__init__.__annotations__ = {**{f.name: hints[f.name] for f in dataclasses.fields(LoRAConfig)},
                                     **{k: v for k, v in own_hints.items() if k != "config"}}


_derive_signature()
