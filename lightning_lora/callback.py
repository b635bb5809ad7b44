"""The `LoRA` callback: LoRA fine-tuning for any LightningModule, with no change to its code.

Example:
    >>> import lightning as L
    >>> from lightning_lora import LoRA
    >>> trainer = L.Trainer(callbacks=[LoRA(r=8, alpha=16, target_modules=["q_proj", "v_proj"])])  # doctest: +SKIP
    >>> trainer.fit(model, datamodule=dm)                                                          # doctest: +SKIP

What happens, in the order of Lightning's hooks (see DESIGN.md):

1. `setup`: adapters are injected into the LightningModule (its networks are searched) and the base
   is frozen; a model built in `configure_model` (or in the module's own `setup`) is injected right
   after `configure_model` instead. The module is set to load checkpoints non-strictly for base keys.
2. Restoring a `ckpt_path`: before the weights load, the checkpoint's LoRA config is compared with
   ours and every adapter key is checked (base keys may be absent).
3. `configure_optimizers` (the module's own, or the one LightningCLI builds): every optimizer it
   returns is left holding exactly the trainable parameters, before optimizer state is restored.
4. `on_fit_start`: the trainable/total table is printed and logged, once.
5. Every `log_every_n_steps`: `lora/grad_norm` and `lora/delta_ratio`.
6. Every checkpoint holds only the adapters (plus trainable biases / `modules_to_save`) and the
   LoRA config under `checkpoint["lightning_lora"]`.
7. `on_fit_end`: the adapter is written in PEFT format (`adapter_dir`), merged into the base
   (`merge_on_fit_end`), and the merged model saved (`merged_dir`), on rank 0, atomically.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_lora._io import atomic_directory
from lightning_lora.config import LoRAConfig, LoRAConfigError
from lightning_lora.surgery import (
    LoRAError,
    _saved_keys,
    check_adapter_state_dict,
    find_network,
    find_target_modules,
    get_lora_config,
    has_lora,
    inject_lora,
    is_lora_key,
    lora_layers,
    lora_parameters,
    merge_lora,
    parameter_summary,
)

#: key of the LoRA section in every checkpoint the callback (or the mixin) writes
CHECKPOINT_KEY = "lightning_lora"
CHECKPOINT_VERSION = 1


def checkpoint_metadata(module: torch.nn.Module, config: LoRAConfig) -> dict[str, Any]:
    """The `checkpoint["lightning_lora"]` section: config, where the network sits, and its origin."""
    prefix, network = find_network(module)
    task_type = None
    try:
        from lightning_lora.peft_format import infer_task_type

        task_type = infer_task_type(network)
    except Exception:
        task_type = None
    name = getattr(network, "name_or_path", None) or None
    return {"version": CHECKPOINT_VERSION, "config": config.to_dict(), "model_prefix": prefix,
            "base_model_name_or_path": name, "task_type": task_type}


def make_adapter_only(checkpoint: dict[str, Any], module: torch.nn.Module, config: LoRAConfig) -> None:
    """Keep only the adapter keys in `checkpoint["state_dict"]` and add the LoRA section."""
    keys = _saved_keys(module)
    state = checkpoint.get("state_dict", {})
    checkpoint["state_dict"] = {k: state[k] for k in keys if k in state}
    checkpoint[CHECKPOINT_KEY] = checkpoint_metadata(module, config)


def check_checkpoint_config(checkpoint: dict[str, Any], config: LoRAConfig, source: str = "the checkpoint") -> None:
    """Raise a `LoRAError` that shows both configs when the checkpoint's LoRA config differs."""
    meta = checkpoint.get(CHECKPOINT_KEY)
    if not isinstance(meta, dict) or "config" not in meta:
        raise LoRAError(f"{source} has no LoRA section ({CHECKPOINT_KEY!r}); it was not written by a LoRA run. "
                        "To start LoRA training from a full-model checkpoint, load its weights into the module "
                        "before fitting instead of passing it as ckpt_path.")
    saved = LoRAConfig.from_dict(meta["config"])
    if saved != config:
        diff = "\n  ".join(config.describe_differences(saved))
        raise LoRAError(f"The LoRA config in {source} differs from this run's:\n  {diff}\n"
                        f"this run:   {config.to_dict()}\n{source}: {saved.to_dict()}\n"
                        "Resume with the same LoRA settings as the run that wrote the checkpoint.")


def _find_optimizers(obj: Any) -> list[torch.optim.Optimizer]:
    """Every optimizer inside what `configure_optimizers` returned (optimizer, list, tuple, dict)."""
    if isinstance(obj, torch.optim.Optimizer):
        return [obj]
    if isinstance(obj, dict):
        return [o for v in obj.values() for o in _find_optimizers(v)]
    if isinstance(obj, (list, tuple)):
        return [o for v in obj for o in _find_optimizers(v)]
    return []  # schedulers and other entries


def restrict_optimizer(optimizer: torch.optim.Optimizer, trainable: list[torch.nn.Parameter],
                       base: list[torch.nn.Parameter] | None = None) -> None:
    """Leave `optimizer` holding only `trainable` parameters (groups keep their order and options,
    so a scheduler built on the optimizer stays valid).

    An optimizer whose one group holds exactly the `base` parameters was built over the whole
    module before the adapters existed (LightningCLI's `--optimizer` does this): its group is given
    the trainable parameters instead.

    Raises:
        LoRAError: when no trainable parameter is left in the optimizer.
    """
    groups = optimizer.param_groups
    if base is not None and len(groups) == 1 and {id(p) for p in groups[0]["params"]} == {id(p) for p in base}:
        groups[0]["params"] = list(trainable)
        return
    keep = {id(p) for p in trainable}
    for group in groups:
        group["params"] = [p for p in group["params"] if id(p) in keep]
    if not any(group["params"] for group in groups):
        raise LoRAError(f"{type(optimizer).__name__} holds none of the LoRA parameters after freezing the base. "
                        "Build it from self.parameters() (or self.trainer.model.parameters()) so that the "
                        "adapters are included.")


class LoRA(Callback):
    """Fine-tune any LightningModule through LoRA adapters.

    Every `LoRAConfig` field is a keyword here, so LightningCLI YAML can configure it:

        trainer:
          callbacks:
            - class_path: lightning_lora.LoRA
              init_args: {r: 16, alpha: 32, target_modules: [q_proj, v_proj]}

    Args:
        r, alpha, dropout, target_modules, exclude_modules, bias, use_rslora, init,
            modules_to_save, rank_pattern, alpha_pattern, adapter_dtype: see `LoRAConfig`.
        merge_on_fit_end: merge the adapters into the base at the end of `fit`, leaving a plain model.
        adapter_dir: if set, the final adapter is also written there in PEFT format.
        merged_dir: if set, the merged model is written there with `save_pretrained` (needs a
            transformers model inside the module, and `merge_on_fit_end=True`).
        log_every_n_steps: how often `lora/grad_norm` and `lora/delta_ratio` are logged.

    Example:
        >>> cb = LoRA(r=4, target_modules="all-linear")
        >>> cb.config.r
        4
    """

    def __init__(
        self,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        target_modules: list[str] | str = ("q_proj", "v_proj"),  # type: ignore[assignment]
        exclude_modules: list[str] | str | None = None,
        bias: Literal["none", "all", "lora_only"] = "none",
        use_rslora: bool = False,
        init: Literal["gaussian", "kaiming"] = "kaiming",
        modules_to_save: list[str] | None = None,
        rank_pattern: dict[str, int] | None = None,
        alpha_pattern: dict[str, float] | None = None,
        adapter_dtype: str | None = "float32",
        merge_on_fit_end: bool = True,
        adapter_dir: str | None = None,
        merged_dir: str | None = None,
        log_every_n_steps: int = 50,
    ) -> None:
        super().__init__()
        if isinstance(target_modules, tuple):
            target_modules = list(target_modules)
        self.config = LoRAConfig(r=r, alpha=alpha, dropout=dropout, target_modules=target_modules,
                                 exclude_modules=exclude_modules, bias=bias, use_rslora=use_rslora, init=init,
                                 modules_to_save=modules_to_save, rank_pattern=rank_pattern or {},
                                 alpha_pattern=alpha_pattern or {}, adapter_dtype=adapter_dtype)
        if log_every_n_steps < 1:
            raise LoRAConfigError(f"log_every_n_steps={log_every_n_steps} is invalid; expected an integer >= 1.")
        if merged_dir is not None and not merge_on_fit_end:
            raise LoRAConfigError("merged_dir is set but merge_on_fit_end=False; set merge_on_fit_end=True to write the "
                             "merged model, or drop merged_dir.")
        self.merge_on_fit_end = merge_on_fit_end
        self.adapter_dir = adapter_dir
        self.merged_dir = merged_dir
        self.log_every_n_steps = log_every_n_steps
        self.adapted_modules: list[str] = []
        self._patched: dict[str, Any] = {}
        self._merged_module: pl.LightningModule | None = None
        self._weight_norms: dict[str, float] = {}

    @classmethod
    def from_config(cls, config: LoRAConfig, **kwargs: Any) -> LoRA:
        """Build the callback from a `LoRAConfig` (plus the callback's own keywords)."""
        return cls(**config.to_dict(), **kwargs)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(r=self.config.r, target_modules=str(self.config.target_modules))

    # ------------------------------------------------------------------ injection
    def _inject(self, pl_module: pl.LightningModule) -> None:
        if has_lora(pl_module):
            existing = get_lora_config(pl_module)
            if existing != self.config:
                raise LoRAError("The module already has LoRA adapters with another config:\n  " +
                                "\n  ".join(self.config.describe_differences(existing)) +
                                "\nUse one LoRA callback, or drop apply_lora() from the module.")
            self.adapted_modules = [name for name, _ in lora_layers(pl_module)]
            return
        self.adapted_modules = inject_lora(pl_module, self.config)

    def _patch(self, pl_module: pl.LightningModule, name: str, make: Callable[[Callable], Callable]) -> None:
        """Wrap `pl_module.<name>` with an instance attribute (undone in `teardown`)."""
        if name in self._patched:
            return
        had = name in pl_module.__dict__
        self._patched[name] = pl_module.__dict__.get(name) if had else None
        original = getattr(pl_module, name)
        # no `__wrapped__`: Lightning's `is_overridden` would unwrap it and skip our configure_model
        object.__setattr__(pl_module, name, make(original))

    def _unpatch(self, pl_module: pl.LightningModule) -> None:
        for name, previous in self._patched.items():
            if previous is None:
                pl_module.__dict__.pop(name, None)
            else:
                object.__setattr__(pl_module, name, previous)
        self._patched = {}

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._merged_module is pl_module and stage != "fit":
            return  # already merged into a plain model: nothing to evaluate through adapters
        self._merged_module = None
        self._previous_strict = pl_module._strict_loading
        pl_module.strict_loading = False  # adapter-only checkpoints; adapter keys are checked below
        try:
            find_target_modules(pl_module, self.config)
            exists = True
        except LoRAError as err:
            if "matched no module" not in str(err):
                raise
            exists = False  # built later, in configure_model or the module's own setup
        if exists or has_lora(pl_module):
            self._inject(pl_module)

        def make_configure_model(original: Callable) -> Callable:
            def configure_model() -> None:
                original()
                self._inject(pl_module)  # raises the 'matched no module' error if there is still nothing
            return configure_model

        def make_on_load_checkpoint(original: Callable) -> Callable:
            def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
                check_checkpoint_config(checkpoint, self.config)
                check_adapter_state_dict(pl_module, checkpoint["state_dict"])
                original(checkpoint)
            return on_load_checkpoint

        def make_configure_optimizers(original: Callable) -> Callable:
            def configure_optimizers() -> Any:
                result = original()
                trainable = [p for p in pl_module.parameters() if p.requires_grad]
                base = [p for n, p in pl_module.named_parameters() if not is_lora_key(n)]
                for optimizer in _find_optimizers(result):
                    restrict_optimizer(optimizer, trainable, base)
                return result
            return configure_optimizers

        self._patch(pl_module, "configure_model", make_configure_model)
        self._patch(pl_module, "on_load_checkpoint", make_on_load_checkpoint)
        self._patch(pl_module, "configure_optimizers", make_configure_optimizers)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._unpatch(pl_module)
        if hasattr(self, "_previous_strict"):
            pl_module._strict_loading = self._previous_strict

    # ------------------------------------------------------------------ fit start: table, logging
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not has_lora(pl_module):
            raise LoRAError("The LoRA callback found no adapters at fit start; was the model replaced after setup?")
        self._enable_input_grads_for_checkpointing(pl_module)
        summary = parameter_summary(pl_module)
        rank_zero_info(f"LoRA: {len(self.adapted_modules)} modules adapted\n{summary}")
        self._weight_norms = {name: layer.weight.detach().float().norm().item() for name, layer in lora_layers(pl_module)}
        metrics = {"lora/trainable_params": float(summary.trainable), "lora/total_params": float(summary.total),
                   "lora/trainable_percent": summary.trainable_percent}
        hparams = {f"lora/{k}": (v if isinstance(v, (int, float, bool, str)) or v is None else str(v))
                   for k, v in self.config.to_dict().items()}
        for logger in trainer.loggers:
            logger.log_hyperparams(hparams)
            logger.log_metrics(metrics, step=trainer.global_step)

    @staticmethod
    def _enable_input_grads_for_checkpointing(pl_module: pl.LightningModule) -> None:
        """Reentrant gradient checkpointing needs the checkpointed block's input to require grad;
        with a frozen embedding it would not ('element 0 of tensors does not require grad')."""
        for module in pl_module.modules():
            on = getattr(module, "is_activation_checkpointing", None)  # transformers >= 5 name
            if on is None:
                on = getattr(module, "is_gradient_checkpointing", False)
            if on and hasattr(module, "enable_input_require_grads"):
                if getattr(module, "_require_grads_hook", None) is None:
                    module.enable_input_require_grads()

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if trainer.global_step % self.log_every_n_steps != 0 or not trainer.loggers:
            return
        grads = [p.grad.detach().float().norm() for p in lora_parameters(pl_module) if p.grad is not None]
        metrics = {"lora/grad_norm": torch.stack(grads).norm().item() if grads else 0.0,
                   "lora/delta_ratio": self.delta_ratio(pl_module)}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    @torch.no_grad()
    def delta_ratio(self, pl_module: torch.nn.Module) -> float:
        """Mean over adapted layers of ||scaling B A||_F / ||W||_F, computed from r x r products."""
        ratios = []
        for name, layer in lora_layers(pl_module):
            a, b = layer.lora_A.weight.float(), layer.lora_B.weight.float()
            delta = layer.scaling * torch.sqrt(torch.clamp(((b.T @ b) * (a @ a.T)).sum(), min=0.0)).item()
            w = self._weight_norms.get(name) or layer.weight.detach().float().norm().item()
            ratios.append(delta / w if w > 0 else math.inf)
        return sum(ratios) / len(ratios) if ratios else 0.0

    # ------------------------------------------------------------------ checkpoints
    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if has_lora(pl_module):  # once merged, a plain model is saved whole
            make_adapter_only(checkpoint, pl_module, self.config)

    # ------------------------------------------------------------------ fit end
    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.interrupted or not has_lora(pl_module):
            return
        prefix, network = find_network(pl_module)
        if self.adapter_dir is not None and trainer.is_global_zero:
            from lightning_lora.peft_format import save_adapter

            save_adapter(network, self.adapter_dir, config=self.config, overwrite=True)
            rank_zero_info(f"LoRA: adapter written to {self.adapter_dir} (PEFT format)")
        if not self.merge_on_fit_end:
            return
        merge_lora(pl_module)
        self._merged_module = pl_module
        rank_zero_info(f"LoRA: adapters merged into the base model ({len(self.adapted_modules)} modules)")
        if self.merged_dir is not None and trainer.is_global_zero:
            save_pretrained_atomic(pl_module, self.merged_dir)
            rank_zero_info(f"LoRA: merged model written to {self.merged_dir}")


def save_pretrained_atomic(module: torch.nn.Module, directory: str | os.PathLike) -> Path:
    """`save_pretrained` the transformers model inside `module` (and the module's `tokenizer`, if it
    has one) into `directory`, atomically.

    Raises:
        LoRAError: when the module holds no transformers model.
    """
    from lightning_lora.hub import make_serializable

    prefix, network = find_network(module)
    if not hasattr(network, "save_pretrained"):
        raise LoRAError(f"merged_dir={str(directory)!r} needs a transformers model inside {type(module).__name__}; "
                        "none was found. Save the merged module with torch.save(module.state_dict()) instead.")
    make_serializable(network)
    tokenizer = getattr(module, "tokenizer", None)

    with atomic_directory(directory, overwrite=True) as tmp:
        network.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)
    return Path(directory)

