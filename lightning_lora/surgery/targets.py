"""What an injection touches: the modules that get adapters (`target_modules`, `exclude_modules`,
"all-linear" without output heads), the modules trained whole (`modules_to_save` and task heads), the
state-dict keys training changes, the embedding matrices carried for a resized vocabulary, and the
subtrees the callback leaves alone.

Example:
    >>> from torch import nn
    >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4)); m.add_module("lm_head", nn.Linear(4, 8))
    >>> find_target_modules(m, LoRAConfig(target_modules="all-linear"))
    ['q_proj']
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from torch import nn

from lightning_lora.config import ALL_LINEAR, LoRAConfig
from lightning_lora.errors import LoRAError
from lightning_lora.layers import (
    WEIGHT_READING_PARENTS,
    HFConv1D,
    LoRALayer,
    adapter_class_for,
    refusal_reason,
    unsupported_target_error,
)
from lightning_lora.matching import is_inside, modules_to_save_matches, name_matches, outermost, suffix_summary
from lightning_lora.surgery._paths import _join
from lightning_lora.surgery.state import is_lora_key
from lightning_lora.surgery.transformers_lookup import (
    base_vocab_size,
    embedding_keys,
    output_head_names,
    task_head_names,
    vocab_rows,
)


def _linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (HFConv1D is not None and isinstance(module, HFConv1D))


def _all_linear_hit(module: nn.Module, parent: nn.Module) -> bool:
    """Whether "all-linear" adapts `module`: a Linear-like layer, or a module that reads its Linear children's
    weights itself (`nn.MultiheadAttention`: adapted as a whole, never its `out_proj` alone)."""
    if isinstance(module, WEIGHT_READING_PARENTS):
        return adapter_class_for(module) is not None
    return _linear_like(module) and not isinstance(parent, WEIGHT_READING_PARENTS)


def _refusal_fix(name: str, module: nn.Module, parent: nn.Module) -> str | None:
    """What to do instead of adapting a refused module: the attention module that reads its weight, when there is
    one that can be adapted (`out_proj` of an `nn.MultiheadAttention`); exclude a refused attention module."""
    if isinstance(module, WEIGHT_READING_PARENTS):
        return "Exclude it (exclude_modules) or name other modules."
    owner = name.rpartition(".")[0].rpartition(".")[2]
    if owner and isinstance(parent, WEIGHT_READING_PARENTS) and refusal_reason(parent) is None:
        return (f"Target the {type(parent).__name__} itself, which adapts both its projections: "
                f"target_modules=[{owner!r}].")
    return None


def _modules_to_save(model: nn.Module, config: LoRAConfig, prefix: str = "", skip: Sequence[str] = ()) -> list[str]:
    heads = task_head_names(model, skip) if config.task_heads else []
    if not config.modules_to_save:
        return heads
    names = [n for n, _ in model.named_modules() if n and not is_inside(n, skip)]
    top = [n[len(prefix) + 1:] if prefix else n
           for n in modules_to_save_matches([_join(prefix, n) for n in names], config.modules_to_save)]
    missing = [s for s in config.modules_to_save if not any(name_matches(_join(prefix, n), [s]) for n in top)]
    if missing:
        raise LoRAError(f"modules_to_save={config.modules_to_save!r}: {missing!r} matched no module; modules in "
                        f"this model end with: {suffix_summary(names)}.")
    return outermost(top + [h for h in heads if h not in top])


def find_target_modules(model: nn.Module, config: LoRAConfig, prefix: str = "",
                        skip: Sequence[str] = ()) -> list[str]:
    """Paths (relative to `model`) of the modules `config` adapts, in `named_modules()` order.

    Args:
        model: any module.
        config: the `LoRAConfig`.
        prefix: match names as if `model` sat at this path (e.g. `"model"` inside a LightningModule).
        skip: subtrees (paths relative to `model`) never searched.

    Raises:
        LoRAError: when the model already has adapters, nothing matches (the message lists the
            model's Linear-like modules), or a matched module's type cannot take an adapter.

    Example:
        >>> from torch import nn
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> find_target_modules(m, LoRAConfig(target_modules=["q_proj"]))
        ['q_proj']
    """
    named = [(n, m) for n, m in model.named_modules() if n and not is_inside(n, skip)]
    if isinstance(model, LoRALayer) or any(isinstance(m, LoRALayer) for _, m in named):
        raise LoRAError("This model already has LoRA adapters; injecting twice is not supported. "
                        "Call merge_and_unload(model) or unload(model) first, or load the adapters into a fresh "
                        "base model.")
    targets = config.target_modules
    heads = output_head_names(model) if targets == ALL_LINEAR else set()
    saved = _modules_to_save(model, config, prefix, skip)
    chosen: list[str] = []
    for name, module in named:
        full = _join(prefix, name)
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        hit = (_all_linear_hit(module, parent) and name not in heads) if targets == ALL_LINEAR else \
            name_matches(full, targets)
        if not hit or name_matches(full, config.exclude_modules) or is_inside(name, saved):
            continue  # modules_to_save are trained fully and saved instead
        if any(name.startswith(c + ".") for c in chosen):
            continue  # inside a module that is already adapted
        if adapter_class_for(module) is None or refusal_reason(module, parent) is not None:
            inner = [n for n, m in named if n.startswith(name + ".") and _linear_like(m)]
            raise unsupported_target_error(name, module, targets, suffix_summary(inner, 6), parent,
                                           _refusal_fix(name, module, parent))
        chosen.append(name)
    if not chosen and not (config.target_parameters and targets == []):  # target_modules=[]: parameters only
        linear = [n for n, m in named if _linear_like(m)]
        raise LoRAError(f"target_modules={targets!r} matched no module; Linear modules in this model end with: "
                        f"{suffix_summary(linear) or '(none)'}. Pass some of these names, a regex matching "
                        "whole module paths, or 'all-linear'.")
    return chosen


def find_target_parameters(model: nn.Module, config: LoRAConfig, prefix: str = "", skip: Sequence[str] = (),
                           modules: Sequence[str] = ()) -> list[tuple[str, str]]:
    """`(owner path, parameter name)` of every parameter `config.target_parameters` adapts (PEFT's rule: the
    path `<module>.<name>` equals an entry or ends with `.<entry>`), in `named_modules()` order and, per module,
    in its registration order (the order PEFT nests them in).

    Args:
        model, config, prefix, skip: as `find_target_modules`.
        modules: the modules `target_modules` adapts (a parameter of one of them is refused).

    Raises:
        LoRAError: nothing matches (the message lists the 3-D parameters), a matched parameter is not 2-D or 3-D,
            belongs to the top-level module, to a module adapted by `target_modules` or to `modules_to_save`.

    Example:
        >>> from torch import nn
        >>> m = nn.Sequential(nn.Linear(4, 4))
        >>> find_target_parameters(m, LoRAConfig(target_modules=[], target_parameters=["0.weight"]))
        [('0', 'weight')]
    """
    targets = config.target_parameters
    if not targets:
        return []
    saved = _modules_to_save(model, config, prefix, skip)
    found: list[tuple[str, str]] = []
    candidates: list[str] = []
    for name, module in model.named_modules():
        if is_inside(name, skip):
            continue
        for pname, param in module._parameters.items():
            if param is None:
                continue
            path = _join(name, pname)
            if param.dim() == 3:
                candidates.append(path)
            if not name_matches(_join(prefix, path), targets):
                continue
            if param.dim() not in (2, 3):
                raise LoRAError(f"target_parameters={targets!r} matched {path!r}, which is {param.dim()}-D; "
                                "target_parameters takes 2-D or 3-D weights (MoE expert stacks, projection weights). "
                                "Name those instead.")
            if not name:
                raise LoRAError(f"target_parameters={targets!r} matched {path!r} of the top-level module, which "
                                "cannot be replaced in place (PEFT neither); call inject_lora on a module holding it.")
            if is_inside(name, modules) or any(is_inside(m, [name]) for m in modules):
                raise LoRAError(f"target_parameters={targets!r} matched {path!r}, but its module {name!r} is also "
                                "adapted through target_modules; a module cannot take both target_modules and "
                                "target_parameters adapters. Exclude it from one of them.")
            if is_inside(name, saved):
                raise LoRAError(f"target_parameters={targets!r} matched {path!r} inside modules_to_save {saved!r}, "
                                "which train whole; remove it from one of them.")
            found.append((name, pname))
    if not found:
        raise LoRAError(f"target_parameters={targets!r} matched no parameter; 3-D parameters in this model end "
                        f"with: {', '.join(dict.fromkeys('.'.join(c.split('.')[-2:]) for c in candidates)) or '(none)'}. Name parameters by a suffix of their path, "
                        "e.g. 'mlp.experts.gate_up_proj'.")
    return found


def _is_trainable_key(model: nn.Module, key: str, config: LoRAConfig, saved: Sequence[str]) -> bool:
    """Whether a state-dict key is trained and saved: adapters, `modules_to_save`, biases per `config.bias`."""
    if is_lora_key(key) or is_inside(key.rpartition(".")[0], saved):
        return True
    if key.endswith(".bias") or key == "bias":
        if config.bias == "all":
            return True
        if config.bias == "lora_only":
            owner = key.rpartition(".")[0]
            with contextlib.suppress(AttributeError):
                return isinstance(model.get_submodule(owner) if owner else model, LoRALayer)
    return False


def compute_trainable_keys(model: nn.Module, config: LoRAConfig, prefix: str = "", skip: Sequence[str] = ()) -> list[str]:
    """The state-dict keys of an injected `model` that training with `config` changes (adapters,
    `modules_to_save`, biases per `config.bias`), in state-dict order. `inject_lora` records them in
    `LoRAState.trainable_keys`; this computes them for adapters that have no record.

    Example:
        >>> from lightning_lora import inject_lora
        >>> from torch import nn
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"], bias="all"))
        >>> compute_trainable_keys(m, LoRAConfig(r=2, target_modules=["q_proj"], bias="all"))
        ['q_proj.bias', 'q_proj.lora_A.weight', 'q_proj.lora_B.weight']
    """
    saved = _modules_to_save(model, config, prefix, skip)
    # a skipped subtree the user trains (any parameter with requires_grad) is trained and saved whole
    trained = [s for s in skip if any(p.requires_grad for p in model.get_submodule(s).parameters())]
    return [k for k in model.state_dict(keep_vars=True)
            if is_inside(k.rpartition(".")[0], trained)
            or (not is_inside(k, skip) and _is_trainable_key(model, k, config, saved))]


def _carried_embedding_keys(model: nn.Module, config: LoRAConfig, skip: Sequence[str]) -> list[str]:
    if config.save_embedding_layers is False:
        return []
    if config.save_embedding_layers is True:
        return embedding_keys(model, skip)
    rows, base = vocab_rows(model), base_vocab_size(model)
    return embedding_keys(model, skip) if rows is not None and base is not None and rows != base else []


def networks_to_skip(pl_module: nn.Module, networks: list[str] | None) -> list[str]:
    """The subtrees of `pl_module` the callback leaves alone.

    With `networks` (paths inside the module), everything outside them; otherwise the direct children
    whose parameters were all frozen before setup (a teacher), when another child has trainable ones.

    Raises:
        LoRAError: a path in `networks` that is not a submodule.

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
                raise LoRAError(f"networks={networks!r}: {path!r} is not a submodule of "
                                      f"{type(pl_module).__name__}; its submodules are: {children}.") from None
        return outermost(n for n, _ in pl_module.named_modules()
                         if n and not any(n == p or n.startswith(p + ".") or p.startswith(n + ".") for p in networks))
    children = [(n, [p.requires_grad for p in c.parameters()]) for n, c in pl_module.named_children()]
    if not any(any(flags) for _, flags in children):
        return []
    return [n for n, flags in children if flags and not any(flags)]
