"""The adapter-only checkpoint format: what a LoRA run's `.ckpt` holds, written, read and checked here.

A Lightning checkpoint written with the `LoRA` callback (or a `LoRAMixin` module) holds, besides
Lightning's own entries (optimizer states, loops, callbacks, ...):

* `state_dict`: only the keys LoRA training changes (`...q_proj.lora_A.weight`, trained biases,
  `modules_to_save`), keyed as the LightningModule's state dict; no base weight; the same for every
  other copy of the module's state that a callback stores (`module_copies`: `WeightAveraging`'s
  `current_model_state`, `StochasticWeightAveraging`'s `average_model_state`); weights-only
  checkpoints included;
* `checkpoint["lightning_lora"]` (`CHECKPOINT_KEY`): `{"version": 1, "config": LoRAConfig.to_dict(),
  "model_prefix": "model", "base_model_name_or_path": ..., "task_type": "CAUSAL_LM"}`;
  `model_prefix` is the path of the transformers model inside the LightningModule. On a model with several
  adapters (`inject_lora(..., adapter_name=)`, `LoRA(adapter_name=)`) only the trained adapter's keys are
  saved, `config` is that adapter's, and the section adds `"adapter_name"` (the trained adapter) and
  `"frozen_adapters"` (the model's other adapters, which the module's own code loads again); so does a
  single adapter with a name other than "default".

The callback, the mixin and `lightning-lora export` are clients of these functions; nothing here
imports Lightning (checkpoints are plain dicts).

Example:
    >>> from torch import nn
    >>> from lightning_lora import LoRAConfig, inject_lora
    >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
    >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
    >>> ckpt = {"state_dict": m.state_dict()}
    >>> make_adapter_only(ckpt, m)
    >>> sorted(ckpt["state_dict"]), ckpt["lightning_lora"]["version"]
    (['q_proj.lora_A.weight', 'q_proj.lora_B.weight'], 1)
"""

from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_lora.config import LoRAConfig
from lightning_lora.errors import AdapterFormatError, LoRAError, first_line, listed
from lightning_lora.surgery import (
    find_network,
    get_lora_state,
    infer_task_type,
    is_lora_key,
    lora_state_dict,
    lora_states,
    saved_keys,
    state_dict_problems,
    vocab_mismatch,
)

#: key of the LoRA section in every checkpoint the callback (or the mixin) writes
CHECKPOINT_KEY = "lightning_lora"
#: version of that section; a checkpoint with another version is refused with a clear message
CHECKPOINT_VERSION = 1


def adapter_config(module: nn.Module, adapter_name: str) -> LoRAConfig:
    """The `LoRAConfig` adapter `adapter_name` of `module` was injected with (as recorded: an adapter added
    beside others has `task_heads=False`).

    Raises:
        LoRAError: the module has no adapters, or none with that name.

    Example:
        >>> from torch import nn
        >>> from lightning_lora import inject_lora
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
        >>> _ = inject_lora(m, LoRAConfig(r=1, target_modules=["q_proj"]), adapter_name="new")
        >>> adapter_config(m, "default").r, adapter_config(m, "new").r
        (2, 1)
    """
    state = get_lora_state(module)
    if adapter_name == state.adapter_name:
        return state.config
    if adapter_name not in state.others:
        raise LoRAError(f"this model has no adapter named {adapter_name!r}; its adapters: "
                        f"{[state.adapter_name, *state.others]}.")
    return state.others[adapter_name].config


def trained_adapter(module: nn.Module) -> tuple[str | None, LoRAConfig, list[str]]:
    """`(name, config, frozen)` of what LoRA training changes in `module`: the name and `LoRAConfig` of the
    adapter that trains and the names of the model's other adapters (frozen). One adapter: its name, its
    config, `[]`. Several trainable adapters (`set_adapter(model, [a, b])`): `(None, the first's config,
    the others)`.

    Raises:
        LoRAError: the module has no adapters.

    Example:
        >>> from torch import nn
        >>> from lightning_lora import inject_lora
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
        >>> _ = inject_lora(m, LoRAConfig(r=1, target_modules=["q_proj"]), adapter_name="new")
        >>> name, config, frozen = trained_adapter(m); name, config.r, frozen
        ('new', 1, ['default'])
    """
    states = lora_states(module)
    state = get_lora_state(module)
    if len(states) > 1 or (not state.others and state.active is None and state.trainable is None):
        return state.adapter_name, state.config, []
    names = [state.adapter_name, *state.others]
    trained = state.trainable if state.trainable is not None else (state.active or [state.adapter_name])
    frozen = [n for n in names if n not in trained]
    if len(trained) != 1:
        return None, state.config, frozen
    return trained[0], adapter_config(module, trained[0]), frozen


def checkpoint_section(module: nn.Module, config: LoRAConfig | None = None) -> dict[str, Any]:
    """The `checkpoint["lightning_lora"]` section for `module`: version, config (of the trained adapter:
    `trained_adapter`), where the network sits (`model_prefix`), its origin (`base_model_name_or_path`) and
    PEFT `task_type`; on a model with several adapters (or one not named "default") also `adapter_name` and
    `frozen_adapters`.

    Example:
        >>> from torch import nn
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> sorted(checkpoint_section(m, LoRAConfig(target_modules=["q_proj"])))
        ['base_model_name_or_path', 'config', 'model_prefix', 'task_type', 'version']
    """
    adapter, trained, frozen = trained_adapter(module) if lora_states(module) else ("default", None, [])
    config = config if config is not None else trained
    if config is None:
        raise LoRAError("This model has no LoRA adapters; call inject_lora(model, LoRAConfig(...)) first.")
    prefix, network = find_network(module)
    name = getattr(network, "name_or_path", None) or None
    section = {"version": CHECKPOINT_VERSION, "config": config.to_dict(), "model_prefix": prefix,
               "base_model_name_or_path": name, "task_type": infer_task_type(network)}
    if frozen or adapter != "default":
        section.update(adapter_name=adapter, frozen_adapters=frozen)
    return section


def check_checkpoint_adapters(checkpoint: dict[str, Any], module: nn.Module, source: str = "the checkpoint") -> None:
    """Raise a `LoRAError` when the checkpoint's adapter was trained beside adapters that `module` lacks (its
    `frozen_adapters`), or under another name than the adapter `module` trains. Checkpoints without these
    entries (one adapter named "default") are checked by their config and keys only.

    Example:
        >>> from torch import nn
        >>> from lightning_lora import inject_lora
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
        >>> check_checkpoint_adapters({"lightning_lora": {"adapter_name": "new", "frozen_adapters": ["fr"]}}, m)
        Traceback (most recent call last):
        lightning_lora.errors.LoRAError: the checkpoint holds adapter 'new', trained beside ['fr'], which this model does not have (its adapters: ['default']); load them in the module's __init__ or configure_model (e.g. load_adapter(self.model, PATH, adapter_name=...)) before the checkpoint is restored.
    """
    meta = checkpoint.get(CHECKPOINT_KEY)
    if not isinstance(meta, dict) or "adapter_name" not in meta:
        return
    saved, frozen = meta.get("adapter_name"), list(meta.get("frozen_adapters") or [])
    state = get_lora_state(module)
    names = [state.adapter_name, *state.others]
    missing = [n for n in frozen if n not in names]
    if missing:
        raise LoRAError(f"{source} holds adapter {saved!r}, trained beside {missing}, which this model does not have "
                        f"(its adapters: {names}); load them in the module's __init__ or configure_model (e.g. "
                        "load_adapter(self.model, PATH, adapter_name=...)) before the checkpoint is restored.")
    trained = trained_adapter(module)[0]
    if frozen and saved is not None and trained is not None and saved != trained:  # alone, a name is a label only
        raise LoRAError(f"{source} holds adapter {saved!r}, but this model trains adapter {trained!r} (its adapters: "
                        f"{names}); use the same adapter_name as the run that wrote it.")


#: how deep `module_copies` looks: the checkpoint's entries, `callbacks`, one callback's state
COPY_DEPTH = 3


def module_copies(checkpoint: dict[str, Any], keys: set[str]) -> list[tuple[dict[Any, Any], Any]]:
    """Where `checkpoint` holds state dicts of the module besides its `state_dict`: every non-empty dict
    whose keys are all in `keys` (the module's state-dict keys), up to `COPY_DEPTH` levels down, as
    `(container, name)` pairs. Callbacks that copy or average the module store them:
    `WeightAveraging`'s `current_model_state`, `StochasticWeightAveraging`'s `average_model_state`.

    Example:
        >>> ckpt = {"state_dict": {"w": 1}, "current_model_state": {"w": 2},
        ...         "callbacks": {"SWA": {"average_model_state": {"w": 3}, "n_averaged": 4}}}
        >>> [name for _, name in module_copies(ckpt, {"w"})]
        ['current_model_state', 'average_model_state']
    """
    found: list[tuple[dict[Any, Any], Any]] = []

    def walk(tree: dict[Any, Any], depth: int) -> None:
        for name, value in tree.items():
            if not isinstance(value, dict) or (tree is checkpoint and name == "state_dict"):
                continue
            if value and all(isinstance(k, str) and k in keys for k in value):
                found.append((tree, name))
            elif depth > 1:
                walk(value, depth - 1)

    walk(checkpoint, COPY_DEPTH)
    return found


def make_adapter_only(checkpoint: dict[str, Any], module: nn.Module, config: LoRAConfig | None = None) -> None:
    """Keep only the keys LoRA training changes in `checkpoint["state_dict"]` and in every other copy of
    the module's state in it (`module_copies`), and add the LoRA section.

    Raises:
        LoRAError: `module` has no adapters.
    """
    keys = saved_keys(module)
    state = checkpoint.get("state_dict", {})
    for tree, name in module_copies(checkpoint, set(state) | set(keys)):
        tree[name] = {k: tree[name][k] for k in keys if k in tree[name]}
    checkpoint["state_dict"] = {k: state[k] for k in keys if k in state}
    checkpoint[CHECKPOINT_KEY] = checkpoint_section(module, config)


def restore_base_keys(checkpoint: dict[str, Any], module: nn.Module) -> int:
    """Before resuming training from an adapter-only checkpoint that holds copies of the module
    (`module_copies`, written with an averaging callback), add `module`'s base tensors (not copies:
    the frozen base is the same in every copy) to `state_dict` and to each copy, so that callbacks
    which load them strictly (`WeightAveraging`, `StochasticWeightAveraging`) find every key. Adapter
    keys are never added (a missing one stays an error). Returns the number of copies completed.

    Example:
        >>> from torch import nn
        >>> from lightning_lora import inject_lora
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
        >>> ckpt = {"state_dict": m.state_dict()}; make_adapter_only(ckpt, m)
        >>> ckpt["current_model_state"] = dict(ckpt["state_dict"])
        >>> restore_base_keys(ckpt, m), sorted(ckpt["current_model_state"]) == sorted(m.state_dict())
        (1, True)
    """
    own = module.state_dict()
    copies = module_copies(checkpoint, set(own))
    if not copies:
        return 0
    trained = set(saved_keys(module))
    base = {k: v for k, v in own.items() if k not in trained}
    for state in [checkpoint.get("state_dict"), *(tree[name] for tree, name in copies)]:
        if isinstance(state, dict):
            for key, value in base.items():
                state.setdefault(key, value)
    return len(copies)


def checkpoint_config(checkpoint: dict[str, Any], source: str = "the checkpoint") -> LoRAConfig:
    """The `LoRAConfig` stored in a checkpoint dict.

    Raises:
        LoRAError: the checkpoint has no LoRA section (it was not written by a LoRA run).
        AdapterFormatError: the section has another version or an invalid config.

    Example:
        >>> checkpoint_config({"lightning_lora": {"version": 1, "config": {"r": 4}}}).r
        4
    """
    meta = checkpoint.get(CHECKPOINT_KEY)
    if not isinstance(meta, dict) or "config" not in meta:
        raise LoRAError(f"{source} has no LoRA section ({CHECKPOINT_KEY!r}); it was not written by a LoRA run. "
                        "To start LoRA training from a full-model checkpoint, load its weights into the module "
                        "before fitting instead of passing it as ckpt_path.")
    version = meta.get("version")
    if version != CHECKPOINT_VERSION:
        raise AdapterFormatError(f"{source}: {CHECKPOINT_KEY} version {version!r} is not supported (expected "
                                 f"{CHECKPOINT_VERSION}); upgrade lightning-lora.")
    try:
        return LoRAConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as err:
        raise AdapterFormatError(f"{source}: the stored LoRA config is invalid ({err}).") from None


#: `LoRAConfig` fields that change how adapters train, not what trained adapters compute: a checkpoint is
#: evaluated (validate / test / predict, `load_from_checkpoint`) whatever their values
TRAINING_ONLY_FIELDS = ("dropout", "loraplus_lr_ratio", "loraplus_lr_embedding", "adapter_compute_dtype")


def check_checkpoint_config(checkpoint: dict[str, Any], config: LoRAConfig, source: str = "the checkpoint",
                            training: bool = True) -> None:
    """Raise a `LoRAError` that shows both configs when the checkpoint's LoRA config differs from `config`.

    Args:
        training: the checkpoint is loaded to train on (resume); False (evaluation) ignores the
            `TRAINING_ONLY_FIELDS`.

    Example:
        >>> ckpt = {"lightning_lora": {"version": 1, "config": LoRAConfig(r=4).to_dict()}}
        >>> check_checkpoint_config(ckpt, LoRAConfig(r=4))   # same: no error
        >>> check_checkpoint_config(ckpt, LoRAConfig(r=4, loraplus_lr_ratio=16), training=False)   # evaluation
    """
    saved = checkpoint_config(checkpoint, source)
    ignored = () if training else TRAINING_ONLY_FIELDS
    diff = [line for line in config.describe_differences(saved) if line.split(":", 1)[0] not in ignored]
    if diff:
        lines = "\n  ".join(diff)
        raise LoRAError(f"The LoRA config in {source} differs from this run's (this run's value != {source}'s):\n"
                        f"  {lines}\nthis run:   {config.to_dict()}\n{source}: {saved.to_dict()}\n"
                        "Resume with the same LoRA settings as the run that wrote the checkpoint.")


def check_adapter_keys(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "The checkpoint") -> None:
    """Check an adapter-only state dict against `model` before loading it: base keys may be absent,
    but every key LoRA trains must be present with the right shape.

    Raises:
        LoRAError: listing missing and mis-shaped adapter keys.

    Example:
        >>> from torch import nn
        >>> from lightning_lora import inject_lora
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
        >>> check_adapter_keys(m, {"q_proj.lora_A.weight": torch.zeros(2, 4)})
        Traceback (most recent call last):
        lightning_lora.errors.LoRAError: The checkpoint does not hold the adapters this model expects: missing adapter keys (1): q_proj.lora_B.weight. Was it written by a run with the same LoRA config (r, target_modules, rank_pattern)?
    """
    vocab = vocab_mismatch(model, state_dict)
    if vocab:
        raise LoRAError(f"{source} does not fit this model: {vocab}.")
    problems = state_dict_problems(lora_state_dict(model), state_dict, unexpected=False)
    if problems:
        raise LoRAError(f"{source} does not hold the adapters this model expects: " + " | ".join(problems) +
                        ". Was it written by a run with the same LoRA config (r, target_modules, rank_pattern)?")


@dataclass
class AdapterCheckpoint:
    """The content of an adapter-only checkpoint file.

    Attributes:
        config: the `LoRAConfig` of the run (of its trained adapter).
        state_dict: adapter tensors keyed relative to the network (the `model_prefix` removed), and as if the
            trained adapter were the network's only one (`...lora_adapters.<name>.` made `...`).
        model_prefix: dotted path of the network inside the LightningModule (`""`: the module itself).
        base_model_name_or_path: the base model recorded by the run, or None.
        task_type: PEFT task type recorded by the run, or None.
    """

    config: LoRAConfig
    state_dict: dict[str, torch.Tensor]
    model_prefix: str
    base_model_name_or_path: str | None
    task_type: str | None
    #: the trained adapter's name and the adapters it was trained beside (not in the file), when recorded
    adapter_name: str | None = None
    frozen_adapters: list[str] = field(default_factory=list)


def read_checkpoint(path: str | os.PathLike) -> AdapterCheckpoint:
    """Read an adapter-only Lightning checkpoint file (`torch.load(..., weights_only=True)`), or a
    distributed checkpoint directory written under FSDP (`read_sharded_checkpoint`).

    Raises:
        AdapterFormatError: missing, unreadable, or not written by a LoRA run (the message names the
            path and what is wrong).

    Example:
        >>> ckpt = read_checkpoint("checkpoints/last.ckpt")   # doctest: +SKIP
        >>> ckpt.config.r, ckpt.model_prefix                  # doctest: +SKIP
        (8, 'model')
    """
    path = Path(path)
    if is_sharded_checkpoint(path):
        ckpt = read_sharded_checkpoint(path)
    elif not path.is_file():
        raise AdapterFormatError(f"{path} does not exist or is not a file; expected an adapter-only Lightning "
                                 "checkpoint (.ckpt) written with the LoRA callback.")
    else:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
            raise AdapterFormatError(f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}: "
                                     f"{first_line(err)}); it may be truncated, or hold objects other than tensors "
                                     "and plain Python values.") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise AdapterFormatError(f"{path} is not a Lightning checkpoint (no 'state_dict' dict).")
    if not isinstance(ckpt.get(CHECKPOINT_KEY), dict):
        raise AdapterFormatError(f"{path} was not written with lightning-lora's LoRA callback (no {CHECKPOINT_KEY!r} "
                                 "entry); export a checkpoint of a run that used the LoRA callback.")
    config = checkpoint_config(ckpt, str(path))
    meta = ckpt[CHECKPOINT_KEY]
    prefix = meta.get("model_prefix") or ""
    if not isinstance(prefix, str):
        raise AdapterFormatError(f"{path}: model_prefix={prefix!r} is invalid; expected a dotted module path.")
    state: dict[str, torch.Tensor] = {}
    outside = []
    for key, value in ckpt["state_dict"].items():
        if prefix and not key.startswith(prefix + "."):
            outside.append(key)
            continue
        state[key[len(prefix) + 1:] if prefix else key] = value
    adapter, frozen = meta.get("adapter_name"), meta.get("frozen_adapters") or []
    if isinstance(adapter, str) and adapter:  # keyed as if it were the only adapter (`surgery.solo`)
        state = {k.replace(f".lora_adapters.{adapter}.", "."): v for k, v in state.items()}
    if outside:
        raise AdapterFormatError(f"{path}: state_dict keys ({len(outside)}) {listed(outside)} are outside the model at {prefix!r}; "
                                 "expected only adapter keys of that model.")
    if not any(is_lora_key(k) for k in state):
        raise AdapterFormatError(f"{path} holds no LoRA adapter weights (no '*.lora_A.weight' keys).")
    base, task = meta.get("base_model_name_or_path"), meta.get("task_type")
    return AdapterCheckpoint(config, state, prefix, base if isinstance(base, str) and base else None,
                             task if isinstance(task, str) and task else None,
                             adapter if isinstance(adapter, str) and adapter else None,
                             [n for n in frozen if isinstance(n, str)] if isinstance(frozen, list) else [])


#: the file of a distributed (sharded) Lightning checkpoint directory that holds everything but tensors
SHARDED_METADATA = "meta.pt"


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a distributed checkpoint directory (FSDP strategies: tensors written by every
    rank with `torch.distributed.checkpoint`, the rest in `meta.pt`).

    Example:
        >>> is_sharded_checkpoint("last.ckpt")
        False
    """
    path = Path(path)
    return path.is_dir() and (path / SHARDED_METADATA).is_file()


def read_sharded_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A distributed checkpoint directory as one checkpoint dict (`meta.pt` plus its `state_dict` and
    `optimizer_states`), read in this process without a process group. Meant for adapter-only
    checkpoints: every tensor of the directory is loaded into memory.

    Raises:
        AdapterFormatError: the directory cannot be read.

    Example:
        >>> ckpt = read_sharded_checkpoint("checkpoints/last.ckpt")   # doctest: +SKIP
        >>> sorted(ckpt["state_dict"])[:1]                            # doctest: +SKIP
        ['model.model.layers.0.self_attn.q_proj.lora_A.weight']
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    path = Path(path)
    try:
        meta = torch.load(path / SHARDED_METADATA, map_location="cpu", weights_only=True)
        tensors: dict[str, Any] = {}
        _load_state_dict(tensors, storage_reader=FileSystemReader(str(path)), planner=_EmptyStateDictLoadPlanner(),
                         no_dist=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as err:
        raise AdapterFormatError(f"{path} is not a readable distributed checkpoint ({type(err).__name__}: "
                                 f"{first_line(err)}).") from None
    if not isinstance(meta, dict):
        raise AdapterFormatError(f"{path / SHARDED_METADATA} is not a Lightning checkpoint's metadata.")
    ckpt = dict(meta)
    ckpt["state_dict"] = tensors.pop("state_dict", tensors.pop("model", {}))
    optimizers = sorted((k for k in tensors if k.startswith("optimizer_")), key=lambda k: int(k.split("_")[1]))
    if optimizers:
        ckpt["optimizer_states"] = [tensors[k] for k in optimizers]
    return ckpt


__all__ = ["AdapterCheckpoint", "CHECKPOINT_KEY", "CHECKPOINT_VERSION", "TRAINING_ONLY_FIELDS", "adapter_config",
           "check_adapter_keys", "check_checkpoint_adapters", "check_checkpoint_config", "checkpoint_config",
           "checkpoint_section", "is_sharded_checkpoint", "make_adapter_only", "module_copies", "read_checkpoint", "read_sharded_checkpoint", "restore_base_keys",
           "trained_adapter"]
