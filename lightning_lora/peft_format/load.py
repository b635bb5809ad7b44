"""Reading PEFT adapters (written by PEFT or by us) and adapter-only checkpoints into a model: `load_adapter`,
`read_adapter_config`, `peft_to_state_dict`, `lora_config_from_peft`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_lora.checkpoint import (
    read_checkpoint,
)
from lightning_lora.config import ALL_LINEAR, LoRAConfig
from lightning_lora.errors import (
    AdapterFormatError,
    LoRAError,
    UnsupportedAdapterError,
    first_line,
)
from lightning_lora.layers.parameter import peft_parameter_paths
from lightning_lora.matching import (
    modules_to_save_matches,
    peft_targets,
)
from lightning_lora.peft_format.keys import (
    _BASE_MUTATING_INITS,
    _HARMLESS_KEYS,
    _SAFE_INITS,
    _TRAINING_ONLY_FEATURES,
    _TRAINING_ONLY_INITS,
    _TRANSLATED_KEYS,
    _UNSUPPORTED_FEATURES,
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    ADAPTER_WEIGHTS_NAME_BIN,
    _base_module_names,
    _join,
    _peft_all_linear,
    from_peft_key,
    mha_out_proj_doubled,
)
from lightning_lora.surgery import (
    adapter_names,
    check_adapter_name,
    delete_adapter,
    find_network,
    find_target_modules,
    find_target_parameters,
    inject_and_load,
    inject_lora,
    is_lora_key,
    load_lora_state_dict,
    lora_layers,
    lora_states,
    set_adapter,
    solo,
)


# ====================================================================== PEFT -> ours
def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The `adapter_config.json` of a PEFT adapter directory, checked to be a LoRA adapter we can load.

    Raises:
        AdapterFormatError: the file is missing or not valid JSON.
        UnsupportedAdapterError: another `peft_type`, or a LoRA feature lightning-lora does not
            implement (DoRA, layer replication, ...); the message names it.

    Example:
        >>> read_adapter_config("out/adapter")["r"]   # doctest: +SKIP
        8
    """
    directory = Path(directory)
    path = directory / ADAPTER_CONFIG_NAME
    if not directory.is_dir():
        raise AdapterFormatError(f"{directory} is not a directory; expected a PEFT adapter directory holding "
                                 f"{ADAPTER_CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME}.")
    if not path.is_file():
        raise AdapterFormatError(f"{path} is missing; a PEFT adapter directory needs {ADAPTER_CONFIG_NAME} next to "
                                 f"{ADAPTER_WEIGHTS_NAME} (write both with save_adapter or PEFT's save_pretrained).")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterFormatError(f"{path} is not valid JSON ({err}); re-export the adapter.") from None
    if not isinstance(cfg, dict):
        raise AdapterFormatError(f"{path} holds a {type(cfg).__name__}, expected a JSON object.")
    _check_supported(cfg, path)
    return cfg


def _is_default(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, (dict, list, tuple, str)) and len(value) == 0)


def _check_supported(cfg: dict[str, Any], path: Path) -> None:
    peft_type = cfg.get("peft_type")
    if peft_type != "LORA":
        raise UnsupportedAdapterError(f"{path}: peft_type={peft_type!r} is not supported; lightning-lora reads LoRA "
                                      "adapters only (peft_type 'LORA').")
    for key, what in _UNSUPPORTED_FEATURES.items():
        if not _is_default(cfg.get(key)):
            raise UnsupportedAdapterError(f"{path}: {key}={cfg[key]!r} ({what}) is not supported by lightning-lora; "
                                          "load this adapter with PEFT, or train one without it.")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str):
        low = init.lower()
        if low.startswith(_BASE_MUTATING_INITS):
            raise UnsupportedAdapterError(
                f"{path}: init_lora_weights={init!r} is not supported: that initialisation changes the base "
                "weights, so the adapter is only correct on the modified base. Convert it with PEFT's "
                "path_initial_model_for_weight_conversion, or merge it with PEFT.")
        if low not in _SAFE_INITS:
            raise UnsupportedAdapterError(f"{path}: init_lora_weights={init!r} is not supported; expected true, false "
                                          f"or one of {', '.join(_SAFE_INITS)}.")
    elif not isinstance(init, bool):
        raise AdapterFormatError(f"{path}: init_lora_weights={init!r} is invalid; expected true, false or a name.")
    known = _TRANSLATED_KEYS | _HARMLESS_KEYS | set(_UNSUPPORTED_FEATURES) | set(_TRAINING_ONLY_FEATURES)
    unknown = sorted(k for k in cfg if k not in known and not _is_default(cfg[k]))
    if unknown:
        listed = ", ".join(f"{k}={cfg[k]!r}" for k in unknown)
        raise UnsupportedAdapterError(f"{path}: unknown LoRA option(s) {listed}; lightning-lora does not implement "
                                      "them, so it cannot load this adapter faithfully.")
    if cfg.get("target_modules") is None and not cfg.get("target_parameters"):
        raise UnsupportedAdapterError(f"{path}: target_modules is null (PEFT's per-architecture default); write the "
                                      "module names into adapter_config.json, e.g. [\"q_proj\", \"v_proj\"].")


def _check_trainable(cfg: dict[str, Any], path: Path) -> None:
    """Options whose forward is plain LoRA but whose training is not (VeLoRA, MiCA): refused for training."""
    init = cfg.get("init_lora_weights", True)
    found = [(key, cfg[key], what) for key, what in _TRAINING_ONLY_FEATURES.items() if not _is_default(cfg.get(key))]
    if isinstance(init, str) and init.lower() in _TRAINING_ONLY_INITS:
        found.append(("init_lora_weights", init, _TRAINING_ONLY_INITS[init.lower()]))
    if found:
        key, value, what = found[0]
        raise UnsupportedAdapterError(f"{path}: {key}={value!r} ({what}) trains differently from plain LoRA, which "
                                      "lightning-lora does not implement; load it with trainable=False for "
                                      "inference, or go on training it with PEFT.")


def _read_tensors(directory: Path) -> tuple[dict[str, torch.Tensor], Path]:
    st_path = directory / ADAPTER_WEIGHTS_NAME
    bin_path = directory / ADAPTER_WEIGHTS_NAME_BIN
    if st_path.is_file():
        from safetensors.torch import load_file

        try:
            return load_file(str(st_path), device="cpu"), st_path
        except Exception as err:  # SafetensorError, OSError, ...
            raise AdapterFormatError(f"{st_path} is corrupt or truncated ({type(err).__name__}: "
                                     f"{first_line(err)}); re-export the adapter.") from None
    if bin_path.is_file():
        try:
            state = torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise AdapterFormatError(f"{bin_path} is not a readable PyTorch state dict ({type(err).__name__}: "
                                     f"{first_line(err)}); re-export the adapter.") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise AdapterFormatError(f"{bin_path} does not hold a dict of tensors.")
        return state, bin_path
    raise AdapterFormatError(f"{st_path} is missing; a PEFT adapter directory needs {ADAPTER_WEIGHTS_NAME} next to "
                             f"{ADAPTER_CONFIG_NAME}.")


def _check_tensor_keys(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Keys no lightning-lora adapter can hold (our own initial PiSSA/OLoRA adapters never reach a PEFT file)."""
    inits = [k for k in tensors if k.endswith((".lora_init_A", ".lora_init_B"))]
    if inits:
        raise AdapterFormatError(f"{path} holds initial-adapter tensors ({inits[0]}, ...), which PEFT files never "
                                 "hold; re-export the adapter with save_adapter.")


def peft_to_state_dict(directory: str | os.PathLike, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a PEFT adapter directory under our keys (relative to the network), with `prefix`.

    With `prefix="model"` the keys are those an adapter-only checkpoint of a LightningModule holding
    the model at `self.model` has (`model.model.layers.0.self_attn.q_proj.lora_A.weight`). Full
    embedding matrices that PEFT saves next to embedding adapters are included as `<module>.weight`.

    Example:
        >>> sd = peft_to_state_dict("out/adapter", prefix="model")   # doctest: +SKIP
        >>> next(iter(sd))                                            # doctest: +SKIP
        'model.model.layers.0.self_attn.q_proj.lora_A.weight'
    """
    directory = Path(directory)
    read_adapter_config(directory)
    tensors, path = _read_tensors(directory)
    _check_tensor_keys(tensors, path)
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        new = from_peft_key(key)
        out[f"{prefix}.{new}" if prefix else new] = value
    return out


def lora_config_from_peft(cfg: dict[str, Any], network: nn.Module | None = None) -> LoRAConfig:
    """Our `LoRAConfig` for a PEFT `adapter_config.json` dict.

    With `network` (the base transformers model), the modules PEFT would adapt are computed with
    PEFT's own rules (`all-linear`, `layers_to_transform`, its `modules_to_save` matching); when our
    matching of the JSON's `target_modules` would pick other modules, the config names the modules
    explicitly (full paths), so both pick exactly the same layers.

    Raises:
        UnsupportedAdapterError: options that cannot be expressed without `network`
            (`layers_to_transform`), or PEFT would adapt nothing.

    Example:
        >>> lora_config_from_peft({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}).alpha
        8.0
    """
    targets = cfg.get("target_modules")
    parameters = list(cfg.get("target_parameters") or []) or None
    if targets is None and parameters:  # PEFT: no module targets next to target_parameters
        targets = []
    exclude = cfg.get("exclude_modules")
    if isinstance(targets, (set, tuple)):
        targets = sorted(targets)
    if isinstance(exclude, (set, tuple)):
        exclude = sorted(exclude)
    task_type = cfg.get("task_type")
    modules_to_save = list(dict.fromkeys(cfg.get("modules_to_save") or [])) or None
    init = cfg.get("init_lora_weights", True)
    layers_to_transform, layers_pattern = cfg.get("layers_to_transform"), cfg.get("layers_pattern")
    kwargs: dict[str, Any] = dict(
        r=cfg.get("r", 8), alpha=cfg.get("lora_alpha", 8), dropout=cfg.get("lora_dropout", 0.0) or 0.0,
        bias=cfg.get("bias", "none"), use_rslora=bool(cfg.get("use_rslora", False)),
        use_dora=bool(cfg.get("use_dora", False)),
        init="gaussian" if isinstance(init, str) and init.lower() == "gaussian" else "kaiming",
        rank_pattern=cfg.get("rank_pattern") or {}, alpha_pattern=cfg.get("alpha_pattern") or {},
        target_parameters=parameters,
    )
    if network is None:
        if not _is_default(layers_to_transform):
            raise UnsupportedAdapterError("layers_to_transform can only be translated with the base model at hand; "
                                          "use load_adapter(model, directory).")
        return LoRAConfig(target_modules=targets, exclude_modules=exclude or None,
                          modules_to_save=modules_to_save, **kwargs)

    names = _base_module_names(network)
    if modules_to_save:
        # PEFT adds "classifier"/"score" for SEQ_CLS and silently skips names that match nothing
        modules_to_save = [m for m in modules_to_save if modules_to_save_matches(names, [m], rule="peft")] or None
    peft_saved = modules_to_save_matches(names, modules_to_save, rule="peft")
    if set(modules_to_save_matches(names, modules_to_save)) != set(peft_saved):
        modules_to_save = peft_saved or None
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        selected = _peft_all_linear(network, task_type)
        selected = peft_targets(selected, selected, exclude, modules_to_save)
    else:
        selected = peft_targets(names, targets, exclude, modules_to_save, layers_to_transform, layers_pattern)
    if not selected and not (parameters and not targets):
        raise AdapterFormatError(f"target_modules={targets!r} (exclude_modules={exclude!r}) matches no module of "
                                 f"this {type(network).__name__}; the adapter was made for another architecture.")
    candidate = None
    if not (isinstance(targets, str) and targets.lower() == ALL_LINEAR) and _is_default(layers_to_transform):
        candidate = LoRAConfig(target_modules=targets, exclude_modules=exclude or None,
                               modules_to_save=modules_to_save, **kwargs)
        try:
            if find_target_modules(network, candidate) != selected:
                candidate = None
        except LoRAError:
            candidate = None
    if candidate is None:
        candidate = LoRAConfig(target_modules=selected, modules_to_save=modules_to_save, **kwargs)
    return candidate


def _inject_and_load(model: nn.Module, network: nn.Module, prefix: str, config: LoRAConfig,
                     state: dict[str, torch.Tensor], source: Path, trainable: bool, config_prefix: str = "",
                     adapter_name: str | None = None, hotswap: bool = False) -> list[str]:
    present = any(True for _ in lora_layers(network))
    if hotswap:
        return _hotswap(network, prefix, config, state, source, adapter_name)
    if present and adapter_name is None:
        raise LoRAError(f"This {type(network).__name__} already has LoRA adapters ({adapter_names(network)}); pass "
                        f"adapter_name= to load {source} beside them, or load it into a fresh base model, or call "
                        "merge_and_unload(model) or unload(model) first.")
    try:
        if present:
            names = _add_and_load(network, config, state, config_prefix, adapter_name, trainable)
        else:
            names = inject_and_load(network, config, state, prefix=config_prefix, trainable=trainable)
            if adapter_name is not None:
                lora_states(network)[0][1].adapter_name = adapter_name
                for _, layer in lora_layers(network):
                    layer.adapter_name = adapter_name
    except AdapterFormatError:
        raise
    except LoRAError as err:
        raise AdapterFormatError(f"{source}: {err}") from None
    return [_join(prefix, n) for n in names]


def _add_and_load(network: nn.Module, config: LoRAConfig, state: dict[str, torch.Tensor], config_prefix: str,
                  adapter_name: str, trainable: bool) -> list[str]:
    """Add adapter `adapter_name` beside the network's adapters and load it; like PEFT's `load_adapter`, it does
    not run until `set_adapter` (nor train, unless `trainable`). On any error it is removed again."""
    record = lora_states(network)[0][1]
    active, trainable_names = record.active, record.trainable
    state = _without_base_copies(network, state, adapter_name)
    names = inject_lora(network, config, prefix=config_prefix, adapter_name=adapter_name)
    try:
        load_lora_state_dict(network, state, adapter_name=adapter_name)
    except BaseException:
        delete_adapter(network, adapter_name)
        record.active, record.trainable = active, trainable_names
        raise
    active = active if active is not None else [record.adapter_name]
    set_adapter(network, active, trainable=(trainable_names if trainable_names is not None else active)
                + ([adapter_name] if trainable else []))
    return names


def _adapter_folder(path: Path, adapter_name: str | None) -> Path:
    """The folder of adapter `adapter_name` in a PEFT directory: `path/<adapter_name>/` when it exists (PEFT's
    layout of several adapters), else `path` itself.

    Raises:
        AdapterFormatError: `path` holds adapters in subfolders and none under this name (or no name was given and
            `path` holds no adapter at its top): the adapters it holds are named.
    """
    if adapter_name is not None and (path / adapter_name / ADAPTER_CONFIG_NAME).is_file():
        return path / adapter_name
    subfolders = sorted(p.name for p in path.iterdir() if (p / ADAPTER_CONFIG_NAME).is_file()) if path.is_dir() else []
    if not subfolders:
        return path
    top = (path / ADAPTER_CONFIG_NAME).is_file()
    if adapter_name in (None, "default") and top:
        return path
    held = (["'default' (top level)"] if top else []) + [repr(n) for n in subfolders]
    wanted = "no adapter_name" if adapter_name is None else f"adapter_name={adapter_name!r}"
    raise AdapterFormatError(f"{path} holds several adapters ({', '.join(held)}) and {wanted} is not one of them; pass "
                             f"adapter_name= one of those names (each adapter but 'default' is in a subfolder of its "
                             "name), or the path of the adapter's own folder.")


def _attention_out_proj_b(network: nn.Module, key: str) -> bool:
    """Whether `key` is the `lora_B` of the out_proj of an `nn.MultiheadAttention` of `network`."""
    suffix = ".out_proj.lora_B.weight"
    if not key.endswith(suffix):
        return False
    try:
        return isinstance(network.get_submodule(key[: -len(suffix)]), nn.MultiheadAttention)
    except AttributeError:
        return False


def _without_base_copies(network: nn.Module, state: dict[str, torch.Tensor], adapter_name: str) -> dict[str, torch.Tensor]:
    """`state` without the base tensors an adapter file may carry (PEFT writes `lm_head.weight` / the embeddings with
    `save_embedding_layers`) when they equal the model's own: a second adapter cannot change the base the others
    run on.

    Raises:
        LoRAError: such a tensor differs from the model's (a resized or retrained embedding).
    """
    own = network.state_dict()
    carried = {k: v for k, v in state.items() if not is_lora_key(k) and k in own}
    differ = [k for k, v in carried.items() if v.shape != own[k].shape or not torch.equal(v.to(own[k].dtype), own[k])]
    if differ:
        raise LoRAError(f"adapter {adapter_name!r} carries base tensors that differ from this model's ({differ[0]}, ...): "
                        "a second adapter cannot change the base the other adapters run on; load it into a fresh "
                        "base model instead.")
    return {k: v for k, v in state.items() if k not in carried}


def _hotswap_target(network: nn.Module, adapter_name: str | None) -> None:
    if adapter_name is None or not lora_states(network) or adapter_name not in adapter_names(network):
        known = adapter_names(network) if lora_states(network) else []
        raise LoRAError(f"hotswap=True replaces the weights of an adapter already loaded; adapter_name={adapter_name!r} "
                        f"is not one (this model has {known}). Load it first without hotswap.")


def _hotswap(network: nn.Module, prefix: str, config: LoRAConfig, state: dict[str, torch.Tensor], source: Path,
             adapter_name: str | None) -> list[str]:
    """Copy the weights of `state` into the existing adapter `adapter_name`, in place (the same tensors: a compiled
    model keeps its graphs), after checking every key and shape; its scaling becomes the file's."""
    _hotswap_target(network, adapter_name)
    if any(layer.merged for _, layer in lora_layers(network)):
        raise LoRAError(f"hotswap of adapter {adapter_name!r} while adapters are merged into the base would leave the "
                        "old delta in the weights; unmerge_adapter(model) first.")
    record = lora_states(network)[0][1]
    held = record if adapter_name == record.adapter_name else record.others[adapter_name]
    if config.use_rslora != held.config.use_rslora:
        raise AdapterFormatError(f"{source}: use_rslora={config.use_rslora}, adapter {adapter_name!r} has "
                                 f"use_rslora={held.config.use_rslora}; hotswap needs the same scaling rule.")
    try:
        with solo(network, adapter_name):
            load_lora_state_dict(network, state)
            for name, layer in lora_layers(network):
                full = _join(held.prefix, name)
                layer.lora_alpha = config.alpha_for(full)
                layer.scaling = layer.lora_alpha / (layer.r ** 0.5 if layer.use_rslora else layer.r)
            names = [n for n, _ in lora_layers(network)]
    except LoRAError as err:
        raise AdapterFormatError(f"{source}: {err} (hotswap needs an adapter of the same shapes)") from None
    held.config = dataclasses.replace(held.config, alpha=config.alpha, alpha_pattern=dict(config.alpha_pattern))
    return [_join(prefix, n) for n in names]




def load_adapter(model: nn.Module, path: str | os.PathLike, trainable: bool = False,
                 quantize_base: str | None = None, adapter_name: str | None = None, hotswap: bool = False) -> list[str]:
    """Inject adapters into a base model and load their weights from a PEFT directory or a checkpoint.

    `path` is either a PEFT LoRA adapter directory (written by `save_adapter` or by PEFT's
    `save_pretrained`) or an adapter-only Lightning checkpoint (`.ckpt` file written with the
    `LoRA` callback). The config is translated (`lora_alpha`, `lora_dropout`, `use_rslora`,
    `rank_pattern`/`alpha_pattern`, `modules_to_save`, `target_modules` list or regex, `bias`),
    adapters are injected with `inject_lora`, and the tensors are loaded strictly (every key must fit;
    PEFT spellings such as `lora_A.default.weight` and `lora_embedding_A` are understood). On any
    error the model is left as it was.

    Args:
        model: the base transformers model, or a module holding one (keys relative to that model).
        path: PEFT adapter directory or adapter-only `.ckpt` file.
        trainable: leave the adapters (and biases / modules_to_save per the config) trainable;
            by default every parameter of the model gets `requires_grad=False`. The train/eval
            mode of the model is not changed.
        quantize_base: `"nf4"` stores the base in NF4 first (as `LoRAConfig.quantize_base`: every
            linear layer but the output head and `modules_to_save`, or what a `.ckpt`'s config
            says in `quantize_base_modules`), e.g. to run a QLoRA adapter that PEFT trained on a
            bitsandbytes 4-bit base; default: as the adapter's own config says (a `.ckpt` of a
            QLoRA run quantizes, a PEFT directory does not). A model quantized with bitsandbytes
            needs nothing: its layers take the adapters as they are.
        adapter_name: the adapter's name (default "default"). On a model that has adapters, the adapter is
            added beside them under this name (required then); as PEFT's `load_adapter` it does not run until
            `set_adapter` and trains only with `trainable=True`. A PEFT multi-adapter directory holds the
            others in subfolders: `path/<adapter_name>/` is read when it exists.
        hotswap: copy the file's weights into the existing adapter `adapter_name` in place (same shapes; its
            scaling becomes the file's): a `torch.compile`d model runs the new adapter without recompiling
            when the scaling is unchanged. PEFT's `hotswap_adapter`.

    Returns:
        The names of the adapted modules, relative to `model`.

    Raises:
        AdapterFormatError: missing or corrupt files, keys or shapes that do not fit the model.
        UnsupportedAdapterError: DoRA, another peft_type, layer replication, ... (named in the message).

    Example:
        >>> from lightning_lora.hub import load_causal_lm
        >>> base = load_causal_lm("smollm2-135m-instruct")   # doctest: +SKIP
        >>> load_adapter(base, "out/adapter")[:1]            # doctest: +SKIP
        ['model.layers.0.self_attn.q_proj']
    """
    path = Path(path)
    if adapter_name is not None:
        check_adapter_name(adapter_name)
    if hotswap:  # the name first: a missing adapter is the problem, whatever the path holds
        _hotswap_target(find_network(model)[1], adapter_name)
    path = _adapter_folder(path, adapter_name)
    if path.is_file():
        return _load_checkpoint_adapter(model, path, trainable, quantize_base, adapter_name, hotswap)
    if not path.exists():
        raise AdapterFormatError(f"{path} does not exist; expected a PEFT adapter directory ({ADAPTER_CONFIG_NAME} + "
                                 f"{ADAPTER_WEIGHTS_NAME}) or an adapter-only .ckpt file.")
    cfg = read_adapter_config(path)
    if trainable:
        _check_trainable(cfg, path / ADAPTER_CONFIG_NAME)
    tensors, weights_path = _read_tensors(path)
    _check_tensor_keys(tensors, weights_path)
    prefix, network = find_network(model)
    try:
        config = lora_config_from_peft(cfg, network)
    except AdapterFormatError as err:
        raise AdapterFormatError(f"{path / ADAPTER_CONFIG_NAME}: {err}") from None
    except ValueError as err:  # a value LoRAConfig rejects (r=0, bias='x', ...)
        raise AdapterFormatError(f"{path / ADAPTER_CONFIG_NAME}: {err}") from None
    if quantize_base is not None:
        config = dataclasses.replace(config, quantize_base=quantize_base)
    state = {from_peft_key(k): v for k, v in tensors.items()}
    if mha_out_proj_doubled(cfg):  # PEFT < 0.22 applied an attention's out_proj delta twice: PEFT >= 0.22's rule
        state = {k: 2 * v if _attention_out_proj_b(network, k) else v for k, v in state.items()}
    if len(state) != len(tensors):
        raise AdapterFormatError(f"{weights_path} holds the same tensor under two spellings; re-export the adapter.")
    if config.target_parameters:
        state = _parameter_keys_from_peft(state, network, config, path)
    magnitudes = [k for k in state if k.endswith(".lora_magnitude_vector")]
    if bool(magnitudes) != config.use_dora:
        held = f"holds DoRA magnitude vectors ({magnitudes[0]}, ...)" if magnitudes else "holds no DoRA magnitude vectors"
        raise AdapterFormatError(f"{weights_path} {held} but {path / ADAPTER_CONFIG_NAME} says use_dora="
                                 f"{config.use_dora}; the two files do not belong together. Re-export the adapter.")
    return _inject_and_load(model, network, prefix, config, state, weights_path, trainable,
                            adapter_name=adapter_name, hotswap=hotswap)


def _parameter_keys_from_peft(state: dict[str, torch.Tensor], network: nn.Module, config: LoRAConfig,
                              path: Path) -> dict[str, torch.Tensor]:
    """PEFT's keys of `target_parameters` adapters (`<owner>[.base_layer...].lora_A.weight`, nested once per
    parameter of the owner targeted after it) -> ours (`<owner>.lora.<parameter>.lora_A.weight`)."""
    try:
        modules = find_target_modules(network, config)
        ours = {peft: layer for layer, peft in
                peft_parameter_paths(find_target_parameters(network, config, modules=modules)).items()}
    except LoRAError as err:
        raise AdapterFormatError(f"{path / ADAPTER_CONFIG_NAME}: {err}") from None
    out = {}
    for key, value in state.items():
        owner, dot, rest = key.partition(".lora_")
        out[f"{ours[owner]}.lora_{rest}" if dot and owner in ours else key] = value
    return out


def _load_checkpoint_adapter(model: nn.Module, path: Path, trainable: bool, quantize_base: str | None = None,
                             adapter_name: str | None = None, hotswap: bool = False) -> list[str]:
    ckpt = read_checkpoint(path)
    prefix, network = find_network(model)
    config = ckpt.config if quantize_base is None else dataclasses.replace(ckpt.config, quantize_base=quantize_base)
    return _inject_and_load(model, network, prefix, config, ckpt.state_dict, path, trainable,
                            config_prefix=ckpt.model_prefix, adapter_name=adapter_name, hotswap=hotswap)
