"""Writing PEFT adapters: `save_adapter` / `to_peft` from a model with adapters, and `checkpoint_to_peft` from an
adapter-only Lightning checkpoint; every directory is read back before it lands.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_lora._io import atomic_directory, check_output_dir
from lightning_lora.checkpoint import (
    AdapterCheckpoint,
    read_checkpoint,
)
from lightning_lora.config import ALL_LINEAR, LoRAConfig
from lightning_lora.errors import (
    AdapterFormatError,
    LoRAError,
    listed,
)
from lightning_lora.hub import meta_model
from lightning_lora.layers import LoRALinear
from lightning_lora.layers.parameter import parameter_path
from lightning_lora.matching import (
    modules_to_save_matches,
    name_matches,
    outermost,
    peft_selects,
    peft_targets,
)
from lightning_lora.peft_format.keys import (
    _EMBEDDING_HINTS,
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    PEFT_VERSION_WRITTEN,
    _base_module_names,
    _join,
    _json_number,
    _layer_infos,
    _LayerInfo,
    _peft_pattern_value,
    _to_peft_key,
)
from lightning_lora.peft_format.load import (
    _read_tensors,
    read_adapter_config,
)
from lightning_lora.surgery import (
    TASK_HEADS,
    adapter_names,
    compute_trainable_keys,
    embedding_keys,
    find_network,
    infer_task_type,
    inject_lora,
    is_lora_key,
    lora_layers,
    lora_state_dict,
    lora_states,
    solo,
)
from lightning_lora.variants.pissa import converted_alpha, skip_base_init, to_plain_lora


def _choose_targets(config: LoRAConfig, layers: dict[str, _LayerInfo], tree: list[str] | None,
                    modules_to_save: list[str] | None) -> tuple[list[str] | str, list[str] | str | None]:
    """`(target_modules, exclude_modules)` for the JSON such that PEFT adapts exactly `layers`.

    With the module tree known, each candidate is checked with PEFT's own matching rule: the config's
    own targets, then the deduplicated last name components (`q_proj`, `v_proj`), then full names.
    """
    adapted = list(layers)
    suffixes = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in adapted))
    candidates: list[tuple[list[str] | str, list[str] | str | None]] = []
    if config.target_modules != ALL_LINEAR:
        candidates.append((config.target_modules, config.exclude_modules))
    candidates += [(suffixes, config.exclude_modules), (suffixes, None), (adapted, None)]
    for targets, exclude in candidates:
        if tree is not None:
            if set(peft_targets(tree, targets, exclude, modules_to_save)) == set(adapted):
                return targets, exclude
        elif targets is config.target_modules or targets is adapted:
            # no module tree (architecture unknown): PEFT and we match a list / regex the same way
            if all(peft_selects(n, targets, exclude, modules_to_save) for n in adapted):
                return targets, exclude
    raise AdapterFormatError(
        f"Cannot describe the adapted modules {listed(adapted)} with PEFT's "
        "target_modules: a module in modules_to_save contains an adapted layer, which PEFT does not allow. "
        "Remove it from modules_to_save or from target_modules.")


def _choose_patterns(config: LoRAConfig, layers: dict[str, _LayerInfo]) -> tuple[dict, dict]:
    """rank_pattern / alpha_pattern that give every layer its actual rank and alpha under PEFT's rule."""
    def fits(rp: dict, ap: dict) -> bool:
        return all(_peft_pattern_value(rp, n, config.r) == info.r
                   and math.isclose(_peft_pattern_value(ap, n, config.alpha), info.alpha, rel_tol=1e-9)
                   for n, info in layers.items())

    rank_pattern = dict(config.rank_pattern)
    alpha_pattern = {k: _json_number(v) for k, v in config.alpha_pattern.items()}
    if fits(rank_pattern, alpha_pattern):
        return rank_pattern, alpha_pattern
    rank_pattern = {re.escape(n): i.r for n, i in layers.items() if i.r != config.r}
    alpha_pattern = {re.escape(n): _json_number(i.alpha) for n, i in layers.items() if i.alpha != config.alpha}
    if fits(rank_pattern, alpha_pattern):
        return rank_pattern, alpha_pattern
    raise AdapterFormatError("Cannot describe the per-layer ranks/alphas with PEFT's rank_pattern/alpha_pattern "
                             f"(layers: { {n: (i.r, i.alpha) for n, i in list(layers.items())[:6]} }).")


def _peft_modules_to_save(config: LoRAConfig, saved: list[str], tree: list[str] | None) -> list[str] | None:
    """`modules_to_save` for the JSON such that PEFT wraps exactly the `saved` modules: the config's
    entries plus the last name of each task head, else the full paths."""
    if not saved:
        return None
    own = list(config.modules_to_save or [])
    names = own + [s.rsplit(".", 1)[-1] for s in saved if not any(name_matches(s, [m]) for m in own)]
    for candidate in (list(dict.fromkeys(names)), saved):
        if tree is None or set(modules_to_save_matches(tree, candidate, rule="peft")) == set(saved):
            return candidate
    raise AdapterFormatError(f"Cannot describe the fully trained modules {saved} with PEFT's modules_to_save.")


def _peft_config_dict(config: LoRAConfig, layers: dict[str, _LayerInfo], tree: list[str] | None,
                      task_type: str | None, base_model_name_or_path: str | None,
                      saved: list[str] | None = None) -> dict[str, Any]:
    modules_to_save: list[str] | None = list(dict.fromkeys(config.modules_to_save)) if config.modules_to_save else None
    if saved is not None:
        modules_to_save = _peft_modules_to_save(config, saved, tree)
    elif modules_to_save and tree is not None:
        ours = modules_to_save_matches(tree, modules_to_save)
        if set(modules_to_save_matches(tree, modules_to_save, rule="peft")) != set(ours):
            modules_to_save = ours
            if set(modules_to_save_matches(tree, modules_to_save, rule="peft")) != set(ours):
                raise AdapterFormatError(f"Cannot describe modules_to_save={config.modules_to_save!r} "
                                         f"(modules {ours}) in PEFT's format.")
    params = {parameter_path(n): i for n, i in layers.items() if i.layer_cls.peft_layer_type == "param"}
    layers = {n: i for n, i in layers.items() if i.layer_cls.peft_layer_type != "param"}
    targets, exclude = _choose_targets(config, layers, tree, modules_to_save) if layers or not params else ([], None)
    rank_pattern, alpha_pattern = _choose_patterns(config, {**layers, **params})  # PEFT: a parameter's own path
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "peft_version": PEFT_VERSION_WRITTEN,  # PEFT >= 0.22's semantics (out_proj of an attention counted once)
        "inference_mode": True,
        "r": config.r,
        "lora_alpha": _json_number(config.alpha),
        "lora_dropout": config.dropout,
        "target_modules": targets,
        "exclude_modules": exclude,
        "bias": config.bias,
        "use_rslora": config.use_rslora,
        "modules_to_save": modules_to_save,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "fan_in_fan_out": any(i.layer_cls.fan_in_fan_out for i in layers.values()),
        "init_lora_weights": "gaussian" if config.init == "gaussian" else True,
        "use_dora": config.use_dora,
        "lora_bias": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "layer_replication": None,
        **({"target_parameters": _choose_parameters(config, list(params))} if params else {}),
    }


def _choose_parameters(config: LoRAConfig, adapted: list[str]) -> list[str]:
    """`target_parameters` for the JSON: the config's own entries when PEFT's rule (the same as ours) selects
    every adapted parameter with them, else the adapted parameters' paths."""
    own = list(config.target_parameters or [])
    if own and all(peft_selects(p, own, None, None) for p in adapted):
        return own
    return adapted


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (NaN included), dtype and shape."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)))


def _plain_lora_from_base_init(tensors: dict[str, torch.Tensor], layers: dict[str, _LayerInfo],
                               config: LoRAConfig) -> tuple[dict[str, torch.Tensor], dict[str, _LayerInfo], LoRAConfig]:
    """PiSSA / OLoRA adapters as a plain LoRA delta against the original base weights (PEFT's
    `path_initial_model_for_weight_conversion`): every layer with initial adapters `lora_init_A/B`
    gets `[A; A0]`, `[B, -B0]` at rank 2r with the alpha that keeps its scaling; the config doubles
    r / rank_pattern, converts alpha / alpha_pattern and says `init="kaiming"`. Keys relative to the network.
    """
    if not config.base_changing_init:
        return tensors, layers, config
    out = dict(tensors)
    new_layers = dict(layers)
    for name, info in layers.items():
        a0, b0 = out.pop(f"{name}.lora_init_A", None), out.pop(f"{name}.lora_init_B", None)
        if a0 is None or b0 is None:
            raise AdapterFormatError(f"{name} was trained with init={config.init!r} but its initial adapters "
                                     f"({name}.lora_init_A / lora_init_B) are missing, so it cannot be converted "
                                     "to an adapter for the original base model.")
        a, b = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
        out[a], out[b] = to_plain_lora(out[a], out[b], a0, b0)
        new_layers[name] = _LayerInfo(info.layer_cls, 2 * info.r, converted_alpha(info.alpha, config.use_rslora))
    plain = dataclasses.replace(
        config, init="kaiming", r=2 * config.r, alpha=converted_alpha(config.alpha, config.use_rslora),
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: converted_alpha(v, config.use_rslora) for k, v in config.alpha_pattern.items()})
    return out, new_layers, plain


def _write_peft_files(tmp: Path, tensors: dict[str, torch.Tensor], cfg: dict[str, Any], directory: Path) -> None:
    """Write one adapter's two files into `tmp` and read them back (a write that went wrong never lands)."""
    from safetensors.torch import save_file

    tmp.mkdir(exist_ok=True)
    prepared = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(prepared, str(tmp / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    (tmp / ADAPTER_CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    written, _ = _read_tensors(tmp)
    if written.keys() != prepared.keys() or not all(_same_bytes(written[k], v) for k, v in prepared.items()) \
            or read_adapter_config(tmp) != cfg:
        raise AdapterFormatError(f"{directory}: the adapter read back differs from what was written; nothing "
                                 "was written. Check the disk (space, permissions) and try again.")


def _write_peft_dir(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], cfg: dict[str, Any],
                    overwrite: bool) -> Path:
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        _write_peft_files(tmp, tensors, cfg, Path(directory))
    return Path(directory)


def to_peft(model: nn.Module, config: LoRAConfig | None = None,
            base_model_name_or_path: str | None = None,
            adapter_state: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The PEFT tensors (keys `base_model.model.*`) and `adapter_config.json` dict for `model`, in memory.

    `save_adapter` writes exactly these; see it for the arguments. `adapter_state` (keys as
    `lora_state_dict(model)`'s) replaces reading the model's state dict: the adapters gathered from a
    sharded model (`lightning_lora.fsdp`).

    Example:
        >>> tensors, cfg = to_peft(model)   # doctest: +SKIP
        >>> cfg["peft_type"], next(iter(tensors)).startswith("base_model.model.")   # doctest: +SKIP
        ('LORA', True)
    """
    prefix, network = find_network(model)
    layers = _layer_infos(network)
    if not layers:
        raise LoRAError("This model has no LoRA adapters; call inject_lora(model, LoRAConfig(...)) first.")
    outside = [n for n, _ in lora_layers(model) if prefix and not n.startswith(prefix + ".")]
    if outside:
        raise AdapterFormatError(f"Adapter layers {listed(outside)} are outside the transformers model at {prefix!r}; "
                                 "the PEFT format can only describe adapters inside one model.")
    states = lora_states(model)
    if states:
        config = config if config is not None else states[0][1].config
        state = lora_state_dict(model) if adapter_state is None else dict(adapter_state)
    elif config is not None:  # adapter layers without a record: the given config picks the saved keys
        full = network.state_dict()
        state = {_join(prefix, k): full[k] for k in compute_trainable_keys(network, config)}
    else:
        raise LoRAError("This model's adapters have no LoRAConfig record; pass config= (the config used for "
                        "injection).")
    rslora = {layer.use_rslora for _, layer in lora_layers(network)}
    if rslora != {config.use_rslora}:
        raise AdapterFormatError(f"config.use_rslora={config.use_rslora} does not match the adapter layers "
                                 f"(use_rslora per layer: {sorted(rslora)}); pass the config used for injection.")
    rel: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if prefix and not key.startswith(prefix + "."):
            raise AdapterFormatError(f"Trainable key {key!r} is outside the transformers model at {prefix!r}; the "
                                     "PEFT format can only hold what is inside that model.")
        rel[key[len(prefix) + 1:] if prefix else key] = value
    base = base_model_name_or_path or getattr(network, "name_or_path", None) or None
    saved = [m[len(prefix) + 1:] if prefix else m for path, st in states for m in (_join(path, x) for x in st.modules_to_save)]
    rel, layers, config = _plain_lora_from_base_init(rel, layers, config)
    cfg = _peft_config_dict(config, layers, _base_module_names(network), infer_task_type(network), base,
                            saved if states else None)
    tensors = {_to_peft_key(k, layers): v for k, v in rel.items()}
    return tensors, cfg


def save_adapter(model: nn.Module, directory: str | os.PathLike, config: LoRAConfig | None = None,
                 base_model_name_or_path: str | None = None, overwrite: bool = False,
                 selected_adapters: list[str] | None = None) -> Path:
    """Write the adapters of `model` as a PEFT LoRA adapter directory.

    Writes `adapter_model.safetensors` (metadata `{"format": "pt"}`) and `adapter_config.json`,
    which `peft.PeftModel.from_pretrained(base_model, directory)` loads with no missing or unexpected
    keys. The directory is written atomically (a temporary directory next to it, then a rename).
    Named adapters are written in PEFT's layout (`PeftModel.save_pretrained`): the adapter named "default"
    at the top, every other one (even alone) in a subfolder of its name, each with its two files and
    the keys it would have alone (`peft.PeftModel.load_adapter(f"{directory}/fr", "fr")` reads it).

    Args:
        model: the network the adapters were injected into (a transformers model), or any module
            that contains one (e.g. a LightningModule with the model at `self.model`); keys are then
            relative to that inner model, as PEFT expects.
        directory: output directory.
        config: the `LoRAConfig` used for injection; default: the one `inject_lora` stored on `model`.
        base_model_name_or_path: written to the JSON; default `model.name_or_path` (None when empty).
        overwrite: replace an existing non-empty `directory` (atomically).
        selected_adapters: the adapters to write (default: all of them; PEFT's name).

    Returns:
        The output directory.

    Raises:
        FileExistsError: `directory` exists and is not empty, and `overwrite` is False.
        LoRAError: `model` has no adapters; an unknown name in `selected_adapters`; `config` with several.

    Example:
        >>> from lightning_lora import LoRAConfig, inject_lora
        >>> _ = inject_lora(model, LoRAConfig(r=8, target_modules=["q_proj", "v_proj"]))   # doctest: +SKIP
        >>> save_adapter(model, "out/adapter")                                              # doctest: +SKIP
        PosixPath('out/adapter')
    """
    states = lora_states(model)
    several = selected_adapters is not None or any(st.others or st.adapter_name != "default" for _, st in states)
    if not several:
        tensors, cfg = to_peft(model, config=config, base_model_name_or_path=base_model_name_or_path)
        return _write_peft_dir(directory, tensors, cfg, overwrite)
    if config is not None:
        raise LoRAError("config= describes one adapter; a model with several adapters writes each with its own "
                        "config (leave config out, or choose one adapter with selected_adapters=[name]).")
    names = adapter_names(model) if selected_adapters is None else list(selected_adapters)
    written = []
    for name in names:
        with solo(model, name):
            written.append((name, *to_peft(model, base_model_name_or_path=base_model_name_or_path)))
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        for name, tensors, cfg in written:
            _write_peft_files(tmp if name == "default" else tmp / name, tensors, cfg, Path(directory))
    return Path(directory)


def _checkpoint_layers(ckpt: AdapterCheckpoint,
                       base: str | None) -> tuple[dict[str, _LayerInfo], list[str] | None, str, list[str]]:
    """Layer kinds/ranks/alphas of the checkpoint, from the base architecture when its config can be had.

    Returns `(layers, module_tree_or_None, how, fully_trained_modules)`.
    """
    state = ckpt.state_dict
    adapted = [k[: -len(".lora_A.weight")] for k in state if k.endswith(".lora_A.weight")]
    if base is not None:
        try:
            network = meta_model(base, ckpt.task_type)
            # the layer kinds and shapes are those of the dense base: no need to quantize it
            # meta tensors: PiSSA/OLoRA initial adapters come from the checkpoint
            with skip_base_init():
                inject_lora(network, dataclasses.replace(ckpt.config, quantize_base=None,
                                                         quantize_base_modules="adapted"), prefix=ckpt.model_prefix)
            emb = set(embedding_keys(network))  # carried embedding rows may be of a resized vocabulary
            expected = {k: tuple(v.shape) for k, v in lora_state_dict(network).items()}
            fits = ({k for k in expected if k not in emb} == {k for k in state if k not in emb}
                    and all(expected[k] == tuple(state[k].shape) for k in expected if is_lora_key(k)))
        except Exception:
            fits = False
        if fits:
            return (_layer_infos(network), _base_module_names(network), f"architecture of {base}",
                    list(network.lora_state.modules_to_save))
        warnings.warn(f"The checkpoint's adapters do not fit the architecture of {base!r} (or it is not available "
                      "offline); converting from the adapter keys alone.", stacklevel=3)
    if ckpt.config.target_parameters:
        raise AdapterFormatError("The checkpoint's target_parameters adapters can only be converted with the base "
                                 "model's architecture (PEFT nests them per module); pass base_model_name_or_path "
                                 "(--base-model) naming a local model directory.")
    layers = {}
    nested = [n for n in adapted if any(n.startswith(outer + ".") for outer in adapted)]
    if nested:  # e.g. an nn.MultiheadAttention's out_proj: PEFT keeps it inside its parent's base_layer
        raise AdapterFormatError(
            f"The adapted module {nested[0]!r} sits inside another adapted module (an nn.MultiheadAttention's "
            "out_proj?), which PEFT stores differently; converting it needs the base model's architecture: pass "
            "base_model_name_or_path (--base-model) naming a local model directory.")
    for name in adapted:
        parts = name.lower().split(".")
        if any(h in p for p in parts for h in _EMBEDDING_HINTS):
            raise AdapterFormatError(
                f"Cannot tell whether the adapted module {name!r} is an embedding (PEFT stores those differently) "
                "without the base model's architecture; pass base_model_name_or_path (--base-model) naming a local "
                "model directory or the bundled model.")
        if f"{name}.lora_B.weight" not in state:
            raise AdapterFormatError(f"The checkpoint has {name}.lora_A.weight but no {name}.lora_B.weight.")
        full = f"{ckpt.model_prefix}.{name}" if ckpt.model_prefix else name  # the config saw LightningModule paths
        layers[name] = _LayerInfo(LoRALinear, int(state[f"{name}.lora_A.weight"].shape[0]), ckpt.config.alpha_for(full))
    # fully trained modules from the keys: the config's modules_to_save and task heads that are present
    names = {k.rpartition(".")[0] for k in state if not is_lora_key(k)}
    wanted = list(ckpt.config.modules_to_save or []) + [h for heads in TASK_HEADS.values() for h in heads]
    saved = outermost(n for n in names if any(name_matches(n, [w]) for w in wanted)) if ckpt.config.task_heads or \
        ckpt.config.modules_to_save else []
    return layers, None, "adapter keys", saved


def checkpoint_to_peft(ckpt_path: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False,
                       base_model_name_or_path: str | None = None) -> Path:
    """Convert an adapter-only Lightning checkpoint into a PEFT LoRA adapter directory.

    When the base model's config (argument, else the one recorded in the checkpoint) can be had
    (a local directory, the bundled `smollm2-135m-instruct`, or a hub id's config.json: cached or
    fetched, `hub.meta_model`), its
    architecture is built on the meta device (no weights are read) to tell embeddings and GPT-2
    `Conv1D` layers apart and to check every adapter shape. Without it, every adapted layer is taken
    to be a Linear layer, and a module whose name suggests an embedding is an error that asks for
    the base model.

    Args:
        ckpt_path: the `.ckpt` file.
        out_dir: output directory (written atomically).
        overwrite: replace an existing non-empty `out_dir`.
        base_model_name_or_path: written to `adapter_config.json` (default: the checkpoint's).

    Returns:
        `out_dir`.

    Example:
        >>> checkpoint_to_peft("checkpoints/last.ckpt", "out/adapter")   # doctest: +SKIP
        PosixPath('out/adapter')
    """
    out = Path(out_dir)
    check_output_dir(out.expanduser().absolute(), overwrite)
    ckpt = read_checkpoint(ckpt_path)
    base = base_model_name_or_path or ckpt.base_model_name_or_path
    layers, tree, _, saved = _checkpoint_layers(ckpt, base)
    state, layers, config = _plain_lora_from_base_init(ckpt.state_dict, layers, ckpt.config)
    cfg = _peft_config_dict(config, layers, tree, ckpt.task_type, base, saved)
    tensors = {_to_peft_key(k, layers): v for k, v in state.items()}
    return _write_peft_dir(out, tensors, cfg, overwrite)
