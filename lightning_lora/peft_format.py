"""Read and write adapters in the Hugging Face PEFT on-disk format, and convert adapter-only checkpoints.

A PEFT LoRA adapter is a directory with two files:

* `adapter_model.safetensors` (metadata `{"format": "pt"}`): the adapter tensors under the prefix
  `base_model.model.`, e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.
  Embedding adapters are `<module>.lora_embedding_A` / `<module>.lora_embedding_B` (no `.weight`),
  the bias of an adapted layer is `<module>.base_layer.bias`, and a module in `modules_to_save` is
  stored under its own name (`base_model.model.score.weight`).
* `adapter_config.json`: `peft_type: "LORA"`, `r`, `lora_alpha`, `target_modules`, ... .

`save_adapter` writes that format from a model with lightning-lora adapters, so
`peft.PeftModel.from_pretrained(base, directory)` loads it with no missing or unexpected keys;
`load_adapter` reads it (written by PEFT or by us) into a base model. `checkpoint_to_peft` turns an
adapter-only Lightning checkpoint into such a directory. Nothing here imports Lightning or PEFT.

Example:
    >>> from lightning_lora import LoRAConfig, inject_lora
    >>> from lightning_lora.peft_format import save_adapter, load_adapter
    >>> _ = inject_lora(model, LoRAConfig(r=8, target_modules=["q_proj", "v_proj"]))   # doctest: +SKIP
    >>> save_adapter(model, "out/adapter")                                              # doctest: +SKIP
    >>> names = load_adapter(fresh_base_model, "out/adapter")                            # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_lora._io import atomic_directory, check_output_dir
from lightning_lora.checkpoint import (
    CHECKPOINT_KEY,
    CHECKPOINT_VERSION,
    AdapterCheckpoint,
    read_checkpoint,
)
from lightning_lora.config import ALL_LINEAR, LoRAConfig
from lightning_lora.errors import (
    AdapterFormatError,
    LoRAError,
    UnsupportedAdapterError,
    first_line,
)
from lightning_lora.init import converted_alpha, skip_base_init, to_plain_lora
from lightning_lora.layers import HFConv1D, LoRAConv1D, LoRAEmbedding, LoRALayer
from lightning_lora.matching import (
    modules_to_save_matches,
    name_matches,
    outermost,
    pattern_key,
    peft_selects,
    peft_targets,
)
from lightning_lora.surgery import (
    TASK_HEADS,
    _without_wrappers,
    compute_trainable_keys,
    embedding_keys,
    find_network,
    find_target_modules,
    infer_task_type,
    inject_and_load,
    inject_lora,
    is_lora_key,
    lora_layers,
    lora_state_dict,
    lora_states,
)

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_WEIGHTS_NAME_BIN = "adapter_model.bin"
ADAPTER_CONFIG_NAME = "adapter_config.json"
#: prefix of every key in a PEFT adapter file (PeftModel.base_model.model)
PEFT_PREFIX = "base_model.model."


#: adapter_config.json keys we translate (everything else is checked by `_check_supported`)
_TRANSLATED_KEYS = {"peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "bias",
                    "use_rslora", "modules_to_save", "rank_pattern", "alpha_pattern", "init_lora_weights",
                    "layers_to_transform", "layers_pattern", "use_dora"}
#: keys that never change what a loaded adapter computes (bookkeeping, or handled by the layer type)
_HARMLESS_KEYS = {"task_type", "base_model_name_or_path", "revision", "inference_mode", "peft_version", "auto_mapping",
                  "fan_in_fan_out", "megatron_core", "qalora_group_size", "ensure_weight_tying", "runtime_config",
                  # VeLoRA only swaps the backward pass of lora_A; the forward is plain LoRA
                  "velora_config",
                  # ignored by PEFT unless init_lora_weights asks for them (checked separately)
                  "loftq_config", "eva_config", "corda_config"}
#: features we do not implement, with what they do (any non-default value is an error)
_UNSUPPORTED_FEATURES = {
    "layer_replication": "layer replication (a deeper model built from repeated base layers)",
    "lora_bias": "a trainable bias on lora_B",
    "trainable_token_indices": "trainable token indices (TrainableTokens on the embedding)",
    "use_qalora": "QA-LoRA (pooled adapter input)",
    "target_parameters": "LoRA on raw parameters (target_parameters, e.g. MoE experts)",
    "alora_invocation_tokens": "activated LoRA (aLoRA, adapter active only after invocation tokens)",
    "megatron_config": "Megatron parallel layers",
    "use_bdlora": "block-diagonal LoRA (BD-LoRA)",
    "arrow_config": "Arrow routing between adapters",
    "kasa_config": "KaSA (singular-value adaptation of the base weight)",
    "monteclora_config": "MonteCLoRA (Monte Carlo sampled adapters)",
    "lora_ga_config": "LoRA-GA initialisation (changes the base weights)",
}
#: init_lora_weights values whose adapters only work on a modified base model
_BASE_MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
_SAFE_INITS = ("gaussian", "eva", "orthogonal", "mica")
#: name components that may be an embedding (only used when the base architecture is unknown)
_EMBEDDING_HINTS = ("emb", "wte", "wpe", "shared")


# ====================================================================== helpers: model structure
def _pretrained_model_class() -> type | None:
    try:
        from transformers import PreTrainedModel
    except Exception:  # pragma: no cover
        return None
    return PreTrainedModel


def _base_module_names(network: nn.Module) -> list[str]:
    """Module names of the network as the base model has them (the insides of adapter layers left out)."""
    names: list[str] = []
    inside: list[str] = []
    for name, module in network.named_modules():
        name = _without_wrappers(name)  # FSDP1 / checkpoint wrappers: the wrapped module's own name
        if not name or any(name.startswith(p + ".") for p in inside):
            continue
        names.append(name)
        if isinstance(module, LoRALayer):
            inside.append(name)
    return list(dict.fromkeys(names))


def _peft_all_linear(network: nn.Module, task_type: str | None) -> list[str]:
    """PEFT's expansion of `target_modules="all-linear"`: every Linear/Conv1D except the output layer."""
    linear = (nn.Linear,) + ((HFConv1D,) if HFConv1D is not None else ())
    names = list(dict.fromkeys(_without_wrappers(n) for n, m in network.named_modules() if n and isinstance(m, linear)))
    exclude: set[str] = set()
    cls = _pretrained_model_class()
    if cls is not None and isinstance(network, cls):
        out = network.get_output_embeddings()
        if out is not None:
            exclude.update(_without_wrappers(n) for n, m in network.named_modules() if m is out)
        elif task_type == "SEQ_CLS":
            for head in ("score", "classifier"):
                if getattr(network, head, None) is not None:
                    exclude.add(head)
                    break
    return [n for n in names if n not in exclude]


def _peft_pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    key = pattern_key(name, patterns) if patterns else None
    return patterns[key] if key is not None else default


def _json_number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


# ====================================================================== ours -> PEFT
@dataclass
class _LayerInfo:
    kind: str  # "linear", "conv1d" or "embedding"
    r: int
    alpha: float


def _layer_infos(network: nn.Module) -> dict[str, _LayerInfo]:
    infos = {}
    for name, layer in lora_layers(network):
        kind = ("embedding" if isinstance(layer, LoRAEmbedding)
                else "conv1d" if isinstance(layer, LoRAConv1D) else "linear")
        infos[_without_wrappers(name)] = _LayerInfo(kind, layer.r, layer.lora_alpha)
    return infos


def _to_peft_key(key: str, layers: dict[str, _LayerInfo]) -> str:
    """Our key (relative to the network) -> PEFT's key in adapter_model.safetensors."""
    owner, _, param = key.rpartition(".")
    if param == "lora_magnitude_vector":  # DoRA: the same key in PEFT's files
        return PEFT_PREFIX + key
    for ab in ("A", "B"):
        suffix = f".lora_{ab}.weight"
        if key.endswith(suffix) and key[: -len(suffix)] in layers:
            name = key[: -len(suffix)]
            if layers[name].kind == "embedding":
                return f"{PEFT_PREFIX}{name}.lora_embedding_{ab}"
            return PEFT_PREFIX + key
    if owner in layers:  # a base parameter of an adapted layer (a trained bias): PEFT's layer wraps it as base_layer
        return f"{PEFT_PREFIX}{owner}.base_layer.{param}"
    return PEFT_PREFIX + key


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
        f"Cannot describe the adapted modules {adapted[:6]}{' ...' if len(adapted) > 6 else ''} with PEFT's "
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
    targets, exclude = _choose_targets(config, layers, tree, modules_to_save)
    rank_pattern, alpha_pattern = _choose_patterns(config, layers)
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
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
        "fan_in_fan_out": any(i.kind == "conv1d" for i in layers.values()),
        "init_lora_weights": "gaussian" if config.init == "gaussian" else True,
        "use_dora": config.use_dora,
        "lora_bias": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "layer_replication": None,
    }


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
        new_layers[name] = _LayerInfo(info.kind, 2 * info.r, converted_alpha(info.alpha, config.use_rslora))
    plain = dataclasses.replace(
        config, init="kaiming", r=2 * config.r, alpha=converted_alpha(config.alpha, config.use_rslora),
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: converted_alpha(v, config.use_rslora) for k, v in config.alpha_pattern.items()})
    return out, new_layers, plain


def _write_peft_dir(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], cfg: dict[str, Any],
                    overwrite: bool) -> Path:
    from safetensors.torch import save_file

    prepared = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        save_file(prepared, str(tmp / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        # read back what was written before it is renamed into place: a write that went wrong never lands
        written, _ = _read_tensors(tmp)
        if written.keys() != prepared.keys() or not all(_same_bytes(written[k], v) for k, v in prepared.items()) \
                or read_adapter_config(tmp) != cfg:
            raise AdapterFormatError(f"{directory}: the adapter read back differs from what was written; nothing "
                                     "was written. Check the disk (space, permissions) and try again.")
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
        raise AdapterFormatError(f"Adapter layers {outside[:4]} are outside the transformers model at {prefix!r}; "
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
                 base_model_name_or_path: str | None = None, overwrite: bool = False) -> Path:
    """Write the adapters of `model` as a PEFT LoRA adapter directory.

    Writes `adapter_model.safetensors` (metadata `{"format": "pt"}`) and `adapter_config.json`,
    which `peft.PeftModel.from_pretrained(base_model, directory)` loads with no missing or unexpected
    keys. The directory is written atomically (a temporary directory next to it, then a rename).

    Args:
        model: the network the adapters were injected into (a transformers model), or any module
            that contains one (e.g. a LightningModule with the model at `self.model`); keys are then
            relative to that inner model, as PEFT expects.
        directory: output directory.
        config: the `LoRAConfig` used for injection; default: the one `inject_lora` stored on `model`.
        base_model_name_or_path: written to the JSON; default `model.name_or_path` (None when empty).
        overwrite: replace an existing non-empty `directory` (atomically).

    Returns:
        The output directory.

    Raises:
        FileExistsError: `directory` exists and is not empty, and `overwrite` is False.
        LoRAError: `model` has no adapters.

    Example:
        >>> from lightning_lora import LoRAConfig, inject_lora
        >>> _ = inject_lora(model, LoRAConfig(r=8, target_modules=["q_proj", "v_proj"]))   # doctest: +SKIP
        >>> save_adapter(model, "out/adapter")                                              # doctest: +SKIP
        PosixPath('out/adapter')
    """
    tensors, cfg = to_peft(model, config=config, base_model_name_or_path=base_model_name_or_path)
    return _write_peft_dir(directory, tensors, cfg, overwrite)


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
    unknown = sorted(k for k in cfg if k not in _TRANSLATED_KEYS | _HARMLESS_KEYS | set(_UNSUPPORTED_FEATURES)
                     and not _is_default(cfg[k]))
    if unknown:
        listed = ", ".join(f"{k}={cfg[k]!r}" for k in unknown)
        raise UnsupportedAdapterError(f"{path}: unknown LoRA option(s) {listed}; lightning-lora does not implement "
                                      "them, so it cannot load this adapter faithfully.")
    if cfg.get("target_modules") is None:
        raise UnsupportedAdapterError(f"{path}: target_modules is null (PEFT's per-architecture default); write the "
                                      "module names into adapter_config.json, e.g. [\"q_proj\", \"v_proj\"].")


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


_LORA_KEY = re.compile(r"^(?P<owner>.*)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_LORA_EMBEDDING_KEY = re.compile(r"^(?P<owner>.*)\.lora_embedding_(?P<ab>[AB])(?:\.[^.]+)?$")
_MAGNITUDE_KEY = re.compile(r"^(?P<owner>.*)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$")


def from_peft_key(key: str) -> str:
    """A PEFT adapter key -> our key relative to the network.

    Accepts `base_model.model.` or no prefix, `lora_A.weight` or `lora_A.<adapter>.weight`,
    `lora_embedding_A` (-> `lora_A.weight`), and `<module>.base_layer.<param>` (-> `<module>.<param>`).

    Example:
        >>> from_peft_key("base_model.model.model.embed_tokens.lora_embedding_A")
        'model.embed_tokens.lora_A.weight'
        >>> from_peft_key("model.layers.0.self_attn.q_proj.lora_B.default.weight")
        'model.layers.0.self_attn.q_proj.lora_B.weight'
    """
    key = key.removeprefix(PEFT_PREFIX)
    m = _MAGNITUDE_KEY.match(key)
    if m:  # DoRA: `lora_magnitude_vector` on disk, `lora_magnitude_vector.<adapter>.weight` in PEFT's memory
        return f"{m.group('owner')}.lora_magnitude_vector"
    for pattern in (_LORA_KEY, _LORA_EMBEDDING_KEY):
        m = pattern.match(key)
        if m:
            return f"{m.group('owner')}.lora_{m.group('ab')}.weight"
    return re.sub(r"\.base_layer\.([^.]+)$", r".\1", key)


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
    if not selected:
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


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _inject_and_load(model: nn.Module, network: nn.Module, prefix: str, config: LoRAConfig,
                     state: dict[str, torch.Tensor], source: Path, trainable: bool, config_prefix: str = "") -> list[str]:
    if any(True for _ in lora_layers(network)):
        raise LoRAError(f"This {type(network).__name__} already has LoRA adapters; load {source} into a fresh base "
                        "model, or call merge_and_unload(model) or unload(model) first.")
    try:
        names = inject_and_load(network, config, state, prefix=config_prefix, trainable=trainable)
    except AdapterFormatError:
        raise
    except LoRAError as err:
        raise AdapterFormatError(f"{source}: {err}") from None
    return [_join(prefix, n) for n in names]


def load_adapter(model: nn.Module, path: str | os.PathLike, trainable: bool = False,
                 quantize_base: str | None = None) -> list[str]:
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
        quantize_base: `"nf4"` stores the adapted layers of the base in NF4 first (as
            `LoRAConfig.quantize_base`), e.g. to run a QLoRA adapter that PEFT trained on a
            bitsandbytes 4-bit base; default: as the adapter's own config says (a `.ckpt` of a
            QLoRA run quantizes, a PEFT directory does not). A model quantized with bitsandbytes
            needs nothing: its layers take the adapters as they are.

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
    if path.is_file():
        return _load_checkpoint_adapter(model, path, trainable, quantize_base)
    if not path.exists():
        raise AdapterFormatError(f"{path} does not exist; expected a PEFT adapter directory ({ADAPTER_CONFIG_NAME} + "
                                 f"{ADAPTER_WEIGHTS_NAME}) or an adapter-only .ckpt file.")
    cfg = read_adapter_config(path)
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
    if len(state) != len(tensors):
        raise AdapterFormatError(f"{weights_path} holds the same tensor under two spellings; re-export the adapter.")
    magnitudes = [k for k in state if k.endswith(".lora_magnitude_vector")]
    if bool(magnitudes) != config.use_dora:
        held = f"holds DoRA magnitude vectors ({magnitudes[0]}, ...)" if magnitudes else "holds no DoRA magnitude vectors"
        raise AdapterFormatError(f"{weights_path} {held} but {path / ADAPTER_CONFIG_NAME} says use_dora="
                                 f"{config.use_dora}; the two files do not belong together. Re-export the adapter.")
    return _inject_and_load(model, network, prefix, config, state, weights_path, trainable)


def _load_checkpoint_adapter(model: nn.Module, path: Path, trainable: bool, quantize_base: str | None = None) -> list[str]:
    ckpt = read_checkpoint(path)
    prefix, network = find_network(model)
    config = ckpt.config if quantize_base is None else dataclasses.replace(ckpt.config, quantize_base=quantize_base)
    return _inject_and_load(model, network, prefix, config, ckpt.state_dict, path, trainable,
                            config_prefix=ckpt.model_prefix)


def _checkpoint_layers(ckpt: AdapterCheckpoint,
                       base: str | None) -> tuple[dict[str, _LayerInfo], list[str] | None, str, list[str]]:
    """Layer kinds/ranks/alphas of the checkpoint, from the base architecture when it is available offline.

    Returns `(layers, module_tree_or_None, how, fully_trained_modules)`.
    """
    state = ckpt.state_dict
    adapted = [k[: -len(".lora_A.weight")] for k in state if k.endswith(".lora_A.weight")]
    if base is not None:
        try:
            from lightning_lora.hub import meta_model

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
    layers = {}
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
        layers[name] = _LayerInfo("linear", int(state[f"{name}.lora_A.weight"].shape[0]), ckpt.config.alpha_for(full))
    # fully trained modules from the keys: the config's modules_to_save and task heads that are present
    names = {k.rpartition(".")[0] for k in state if not is_lora_key(k)}
    wanted = list(ckpt.config.modules_to_save or []) + [h for heads in TASK_HEADS.values() for h in heads]
    saved = outermost(n for n in names if any(name_matches(n, [w]) for w in wanted)) if ckpt.config.task_heads or \
        ckpt.config.modules_to_save else []
    return layers, None, "adapter keys", saved


def checkpoint_to_peft(ckpt_path: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False,
                       base_model_name_or_path: str | None = None) -> Path:
    """Convert an adapter-only Lightning checkpoint into a PEFT LoRA adapter directory.

    When the base model (argument, else the one recorded in the checkpoint) is available offline
    (a local directory, the local HF cache, or the bundled `smollm2-135m-instruct`), its
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


__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "AdapterCheckpoint",
    "AdapterFormatError",
    "CHECKPOINT_KEY",
    "CHECKPOINT_VERSION",
    "PEFT_PREFIX",
    "UnsupportedAdapterError",
    "atomic_directory",
    "check_output_dir",
    "checkpoint_to_peft",
    "find_network",
    "from_peft_key",
    "infer_task_type",
    "load_adapter",
    "lora_config_from_peft",
    "peft_to_state_dict",
    "read_adapter_config",
    "read_checkpoint",
    "save_adapter",
    "to_peft",
]
