"""The PEFT on-disk format's names: file names, key prefix, config keys we translate or refuse, and the
translation of tensor keys between our layers and PEFT's files.

Example:
    >>> from_peft_key('base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight')
    'model.layers.0.self_attn.q_proj.lora_A.weight'
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from lightning_lora.layers import HFConv1D, LoRALayer
from lightning_lora.matching import (
    is_inside,
    pattern_key,
)
from lightning_lora.surgery import (
    _without_wrappers,
    lora_layers,
)
from lightning_lora.variants import VARIANTS

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_WEIGHTS_NAME_BIN = "adapter_model.bin"
ADAPTER_CONFIG_NAME = "adapter_config.json"
#: prefix of every key in a PEFT adapter file (PeftModel.base_model.model)
PEFT_PREFIX = "base_model.model."


#: adapter_config.json keys we translate (everything else is checked by `_check_supported`)
_TRANSLATED_KEYS = {"peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "bias",
                    "use_rslora", "modules_to_save", "rank_pattern", "alpha_pattern", "init_lora_weights",
                    "layers_to_transform", "layers_pattern", "use_dora", "target_parameters"}
#: keys that never change what a loaded adapter computes (bookkeeping, or handled by the layer type)
_HARMLESS_KEYS = {"task_type", "base_model_name_or_path", "revision", "inference_mode", "peft_version", "auto_mapping",
                  "fan_in_fan_out", "megatron_core", "qalora_group_size", "ensure_weight_tying", "runtime_config",
                  # ignored by PEFT unless init_lora_weights asks for them (checked separately)
                  "loftq_config", "eva_config", "corda_config", "astra_config"}
#: features we do not implement, with what they do (any non-default value is an error)
_UNSUPPORTED_FEATURES = {
    "layer_replication": "layer replication (a deeper model built from repeated base layers)",
    "lora_bias": "a trainable bias on lora_B",
    "trainable_token_indices": "trainable token indices (TrainableTokens on the embedding)",
    "use_qalora": "QA-LoRA (pooled adapter input)",
    "alora_invocation_tokens": "activated LoRA (aLoRA, adapter active only after invocation tokens)",
    "megatron_config": "Megatron parallel layers",
    "use_bdlora": "block-diagonal LoRA (BD-LoRA)",
    "arrow_config": "Arrow routing between adapters",
    "kasa_config": "KaSA (singular-value adaptation of the base weight)",
    "monteclora_config": "MonteCLoRA (Monte Carlo sampled adapters)",
    "lora_ga_config": "LoRA-GA initialisation (changes the base weights)",
}
#: init_lora_weights values whose adapters only work on a modified base model
_BASE_MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "astra")
_SAFE_INITS = ("gaussian", "eva", "orthogonal", "mica", "nora")
#: options whose forward is plain LoRA but whose training is not: such an adapter loads for inference, and
#: `load_adapter(..., trainable=True)` refuses it (training it here would train differently from PEFT)
_TRAINING_ONLY_FEATURES = {
    "velora_config": "VeLoRA (a memory-saving backward pass of lora_A)",
}
_TRAINING_ONLY_INITS = {"mica": "MiCA (lora_B frozen during training)"}
#: the PEFT release whose file semantics we write (`peft_version` in adapter_config.json): from 0.22.0 on, the
#: out_proj adapter of an `nn.MultiheadAttention` is applied once (PEFT < 0.22 applied it twice, and PEFT >= 0.22
#: doubles `lora_B` of such files when it loads them: `mha_out_proj_doubled`)
PEFT_VERSION_WRITTEN = "0.22.0"
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
    # parameter adapters (target_parameters) sit in their host's `lora` container, which PEFT's tree does not have
    hidden = [_without_wrappers(n).rpartition(".")[0] for n, m in network.named_modules()
              if isinstance(m, LoRALayer) and m.peft_layer_type == "param"]
    for name, module in network.named_modules():
        name = _without_wrappers(name)  # FSDP1 / checkpoint wrappers: the wrapped module's own name
        if not name or any(name.startswith(p + ".") for p in inside) or is_inside(name, hidden):
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
    layer_cls: type[LoRALayer]  # the adapter class: it answers for its PEFT kind, orientation and tensor names
    r: int
    alpha: float
    peft_path: str | None = None  # PEFT's module path where it differs from ours (target_parameters: base_layer.)


def _layer_infos(network: nn.Module) -> dict[str, _LayerInfo]:
    """The adapter layers PEFT's config names (an adapter layer inside another one, the `out_proj` of an adapted
    `nn.MultiheadAttention`, is its parent's: the parent's `peft_tensor_names` name its tensors)."""
    infos: dict[str, _LayerInfo] = {}
    for name, layer in lora_layers(network):
        name = _without_wrappers(name)
        if not any(name.startswith(outer + ".") for outer in infos):
            peft_path = layer.peft_module_path(name)
            infos[name] = _LayerInfo(type(layer), layer.r, layer.lora_alpha, peft_path if peft_path != name else None)
    return infos


#: variant tensor name -> its key suffix in PEFT's files (DoRA's magnitude keeps its name)
_VARIANT_PEFT_KEYS = {t.name: t.peft_key for cls in VARIANTS
                      for t in cls.from_config(**cls.example).extra_tensors(1, 1, 1) if t.peft_key is not None}


def _to_peft_key(key: str, layers: dict[str, _LayerInfo]) -> str:
    """Our key (relative to the network) -> PEFT's key in adapter_model.safetensors."""
    owner, _, param = key.rpartition(".")
    if param in _VARIANT_PEFT_KEYS:  # a variant's tensor (DoRA: the same key in PEFT's files)
        return f"{PEFT_PREFIX}{owner}.{_VARIANT_PEFT_KEYS[param]}"
    for ours in ("lora_A.weight", "lora_B.weight"):
        name = key[: -len(ours) - 1]
        if key.endswith("." + ours) and name in layers:  # the layer type names A and B in PEFT's files
            return f"{PEFT_PREFIX}{layers[name].peft_path or name}.{layers[name].layer_cls.peft_tensor_names()[ours]}"
    for name, info in layers.items():  # a tensor of an adapter layer's child (a MultiheadAttention's out_proj)
        rest = key[len(name) + 1:] if key.startswith(name + ".") else ""
        if "." in rest and rest in info.layer_cls.peft_tensor_names():
            return f"{PEFT_PREFIX}{name}.{info.layer_cls.peft_tensor_names()[rest]}"
    if owner in layers:  # a base parameter of an adapted layer (a trained bias): PEFT's layer wraps it as base_layer
        return f"{PEFT_PREFIX}{owner}.base_layer.{param}"
    return PEFT_PREFIX + key


_LORA_KEY = re.compile(r"^(?P<owner>.*)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_LORA_EMBEDDING_KEY = re.compile(r"^(?P<owner>.*)\.lora_embedding_(?P<ab>[AB])(?:\.[^.]+)?$")
_MAGNITUDE_KEY = re.compile(r"^(?P<owner>.*)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$")


def from_peft_key(key: str) -> str:
    """A PEFT adapter key -> our key relative to the network.

    Accepts `base_model.model.` or no prefix, `lora_A.weight` or `lora_A.<adapter>.weight`,
    `lora_embedding_A` (-> `lora_A.weight`), and `<module>.base_layer.<param>` (-> `<module>.<param>`), also
    nested (`<mha>.base_layer.out_proj.lora_A.weight` -> `<mha>.out_proj.lora_A.weight`).

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
        if m:  # an adapter inside a wrapped module (`<mha>.base_layer.out_proj.lora_A`) is the inner module's
            return f"{_INNER_BASE_LAYER.sub('', m.group('owner'))}.lora_{m.group('ab')}.weight"
    return _INNER_BASE_LAYER.sub("", key)


#: PEFT's `.base_layer` components (its wrapper layers hold the base module there), in the middle of a key or before
#: its last component
_INNER_BASE_LAYER = re.compile(r"\.base_layer(?=\.)")


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def mha_out_proj_doubled(cfg: dict) -> bool:
    """Whether an adapter file's out_proj adapters of `nn.MultiheadAttention` count twice, as PEFT >= 0.22 decides
    when it loads one (`LoraModel._remap_adapter_state_dict_for_load`): PEFT < 0.22 applied the out_proj delta
    twice, so a file without `peft_version` (older than PEFT 0.18), or of a release before 0.22.0 (a dev build from
    0.21.1 on has the fix), gets its out_proj `lora_B` doubled to keep what it computed.

    Example:
        >>> mha_out_proj_doubled({"peft_version": "0.21.2"}), mha_out_proj_doubled({"peft_version": "0.22.0"})
        (True, False)
        >>> mha_out_proj_doubled({}), mha_out_proj_doubled({"peft_version": "0.21.3.dev0@abc"})
        (True, False)
    """
    version = cfg.get("peft_version")
    if not isinstance(version, str):
        return True
    text = version.partition("@")[0]
    found = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if found is None:
        return True
    release = tuple(int(p or 0) for p in found.groups())
    return release < (0, 21, 1) or ("dev" not in text and release < (0, 22, 0))
