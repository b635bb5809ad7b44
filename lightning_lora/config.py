"""`LoRAConfig`: every knob of a LoRA run, validated on construction.

Example:
    >>> from lightning_lora import LoRAConfig
    >>> cfg = LoRAConfig(r=16, alpha=32, target_modules=["q_proj", "v_proj"])
    >>> cfg.scaling_for("model.layers.0.self_attn.q_proj")
    2.0
    >>> LoRAConfig.from_dict(cfg.to_dict()) == cfg
    True
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from lightning_lora.errors import LoRAConfigError
from lightning_lora.matching import name_matches, pattern_key  # noqa: F401 (name_matches re-exported)

ALL_LINEAR = "all-linear"
BIAS_CHOICES = ("none", "all", "lora_only")
INIT_CHOICES = ("gaussian", "kaiming")
#: `quantize_base` values (`lightning_lora.quantization`) and the inits that leave the base weights alone
QUANTIZE_BASE_CHOICES = ("nf4",)
QUANTIZE_BASE_MODULES_CHOICES = ("adapted", ALL_LINEAR)
QUANTIZE_SAFE_INITS = ("gaussian", "kaiming")
COMPUTE_DTYPE_CHOICES = ("auto", "base", "adapter")
#: initialisations that take A and B from the base weight and leave W - scaling * B A as the base (issue 17)
BASE_INIT_CHOICES = ("pissa", "pissa_niter_N", "olora")
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")
ADAPTER_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def _dtype_name(value: Any) -> str | None:
    """Accept `torch.float32`, `"float32"`, `"fp32"`, `"bf16"`, ... and return the canonical name."""
    if value is None:
        return None
    given = value
    if isinstance(value, torch.dtype):
        value = str(value).removeprefix("torch.")
    aliases = {"fp32": "float32", "fp64": "float64", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
    name = aliases.get(str(value), str(value))
    if name not in ADAPTER_DTYPES:
        raise LoRAConfigError(
            f"adapter_dtype={given!r} is not supported; expected one of {sorted(ADAPTER_DTYPES)} "
            "(or None to keep the base layer's dtype)."
        )
    return name


@dataclass
class LoRAConfig:
    """Configuration of low-rank adapters.

    Args:
        r: rank of the update `B @ A` (int > 0).
        alpha: scaling numerator; the update is scaled by `alpha / r` (or `alpha / sqrt(r)` with
            `use_rslora`).
        dropout: dropout probability on the adapter's input, `0 <= p < 1`.
        target_modules: list of module names matched as a suffix of the module path on `.`
            boundaries, one string taken as a regex that must match the whole path, or
            `"all-linear"` (every Linear / `Conv1D` except the output head and classifier).
        exclude_modules: modules never adapted, same matching as `target_modules`.
        bias: `"none"`, `"all"` (train every bias) or `"lora_only"` (biases of adapted layers).
        use_rslora: rank-stabilised scaling `alpha / sqrt(r)`.
        init: `"kaiming"` (kaiming-uniform A, as PEFT) or `"gaussian"` (A ~ N(0, 1/r), the paper):
            B is zero, so an injected model starts exactly equal to its base. `"pissa"` (A, B from the
            r principal singular vectors of W), `"pissa_niter_N"` (the same from a randomized SVD with
            N subspace iterations) or `"olora"` (A, B from a QR decomposition of W): the base weight
            becomes the residual `W - scaling * B A`, so the start equals the base within float
            rounding (see `lightning_lora.variants.pissa`).
        modules_to_save: whole modules (same matching) that train fully and are saved, e.g. a
            new classification head. A module whose weight is tied to another (an `lm_head` tied to
            the input embedding) trains an untied copy, as in PEFT; the other module is untouched.
        task_heads: also train and save the output head a task model adds and the base checkpoint
            lacks (sequence/token classification `score`/`classifier`, question answering
            `qa_outputs`), as PEFT does for those task types; False leaves it frozen.
        save_embedding_layers: carry the input and output embedding matrices in the adapter and in
            adapter-only checkpoints: `"auto"` (PEFT's rule) when the vocabulary differs from the
            base model's (added tokens + `resize_token_embeddings`), or True / False.
        rank_pattern: regex of a module path -> rank for those modules.
        alpha_pattern: regex of a module path -> alpha for those modules.
        adapter_dtype: dtype of A and B (`"float32"` by default, so adapters stay fp32 on a bf16
            base); `None` keeps the base layer's dtype.
        quantize_base: `"nf4"` stores the frozen base weights as 4-bit NormalFloat tensors (QLoRA;
            torchao, blocks of 64, double-quantised scales), dequantised on the fly in the compute
            dtype; `None` (default) keeps the base as it is. See `lightning_lora.quantization`.
        quantize_base_modules: which `nn.Linear` layers `quantize_base` stores in 4 bits.
            `"all-linear"` (the default with `quantize_base`, QLoRA's whole frozen base): every
            `nn.Linear` except the output head, `modules_to_save` and `exclude_modules`;
            `"adapted"`: the adapted layers only. `None` without `quantize_base`.
        adapter_compute_dtype: dtype the adapter products run in. `"auto"` (default): the base's dtype
            for a bfloat16 base (`bf16-true`) with wider adapters, as `bf16-mixed` autocast computes:
            tensor-core GEMMs and no fp32 copy of the input, while A, B, their gradients and the
            optimizer state stay in `adapter_dtype`; otherwise the adapters' dtype. `"base"`: the base's
            dtype whenever it is narrower (also float16). `"adapter"`: always the adapters' dtype (fp32
            products on a bf16 base).
        use_dora: DoRA (weight-decomposed LoRA, Liu et al. 2024): a trainable magnitude per output
            feature (`lora_magnitude_vector`) rescales the column-normalised `W + scaling * B A`
            (Linear and `Conv1D` targets; see `lightning_lora.variants.dora`).
        loraplus_lr_ratio: LoRA+ (Hayou et al. 2024): the `LoRA` callback splits the optimizer's
            parameter groups so that B (and 1-D trainable parameters: DoRA magnitudes, biases) learn at
            `ratio x` the group's learning rate (> 0; the paper suggests 16). None: off.
        loraplus_lr_embedding: with `loraplus_lr_ratio`, the learning rate of embedding adapters
            (PEFT's `create_loraplus_optimizer` default, 1e-6).
        target_parameters: parameters adapted directly, named by a suffix of their path on `.` boundaries
            (PEFT's rule, no regex), e.g. `["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]` for the
            fused expert stacks of MoE models: a 3-D (E, ...) parameter gets one rank-r delta per expert
            (`lightning_lora.layers.parameter`). Works next to `target_modules`, which may then be `[]`;
            `rank_pattern` / `alpha_pattern` match the parameter's path. Not with `dropout`, DoRA or
            PiSSA/OLoRA.

    Example:
        >>> LoRAConfig(r=4, target_modules="all-linear", dropout=0.05).r
        4
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    exclude_modules: list[str] | str | None = None
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    init: str = "kaiming"
    modules_to_save: list[str] | None = None
    task_heads: bool = True
    save_embedding_layers: bool | Literal["auto"] = "auto"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    adapter_dtype: str | None = "float32"
    quantize_base: str | None = None
    quantize_base_modules: Literal["adapted", "all-linear"] | None = None
    adapter_compute_dtype: Literal["auto", "base", "adapter"] = "auto"
    use_dora: bool = False
    loraplus_lr_ratio: float | None = None
    loraplus_lr_embedding: float = 1e-6
    target_parameters: list[str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise LoRAConfigError(f"r={self.r!r} is invalid; expected an integer > 0, e.g. r=8.")
        if (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0
                or not math.isfinite(self.alpha)):
            raise LoRAConfigError(f"alpha={self.alpha!r} is invalid; expected a finite number > 0, e.g. alpha=16.")
        self.alpha = float(self.alpha)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise LoRAConfigError(f"dropout={self.dropout!r} is invalid; expected 0 <= dropout < 1, e.g. 0.05.")
        self.dropout = float(self.dropout)
        self.target_modules = self._check_patterns("target_modules", self.target_modules, allow_all_linear=True)
        self._check_target_parameters()
        if (self.target_modules == [] and not self.target_parameters) or self.target_modules == "":
            raise LoRAConfigError("target_modules is empty; name at least one module, e.g. ['q_proj', 'v_proj'] or 'all-linear'.")
        self.exclude_modules = self._check_patterns("exclude_modules", self.exclude_modules)
        if self.bias not in BIAS_CHOICES:
            raise LoRAConfigError(f"bias={self.bias!r} is invalid; expected one of {', '.join(BIAS_CHOICES)}.")
        if not isinstance(self.use_rslora, bool):
            raise LoRAConfigError(f"use_rslora={self.use_rslora!r} is invalid; expected True or False.")
        if not isinstance(self.init, str) or not (self.init in INIT_CHOICES or self.init in ("pissa", "olora")
                                                  or _PISSA_NITER.fullmatch(self.init)):
            raise LoRAConfigError(f"init={self.init!r} is invalid; expected one of {', '.join(INIT_CHOICES)}, "
                                  f"{', '.join(BASE_INIT_CHOICES)} (N an integer >= 0, e.g. 'pissa_niter_4').")
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str):
                self.modules_to_save = [self.modules_to_save]
            self.modules_to_save = self._check_patterns("modules_to_save", list(self.modules_to_save))
        if not isinstance(self.task_heads, bool):
            raise LoRAConfigError(f"task_heads={self.task_heads!r} is invalid; expected True or False.")
        if self.save_embedding_layers not in (True, False, "auto"):
            raise LoRAConfigError(f"save_embedding_layers={self.save_embedding_layers!r} is invalid; expected "
                                  "'auto', True or False.")
        self.rank_pattern = self._check_pattern_dict("rank_pattern", self.rank_pattern, int)
        self.alpha_pattern = self._check_pattern_dict("alpha_pattern", self.alpha_pattern, float)
        self.adapter_dtype = _dtype_name(self.adapter_dtype)
        if self.adapter_compute_dtype not in COMPUTE_DTYPE_CHOICES:
            raise LoRAConfigError(f"adapter_compute_dtype={self.adapter_compute_dtype!r} is invalid; expected one of "
                                  f"{', '.join(COMPUTE_DTYPE_CHOICES)} ('auto': bf16 products on a bf16 base).")
        self._check_variants()
        self._check_quantization()
        self._check_parameter_combinations()

    def _check_target_parameters(self) -> None:
        """`target_parameters`: a list of parameter-path suffixes; not with what needs the adapter's input."""
        value = self.target_parameters
        if value is None:
            return
        if isinstance(value, str) or not isinstance(value, (list, tuple, set)):
            raise LoRAConfigError(f"target_parameters={value!r} is invalid; expected a list of parameter names such "
                                  "as ['mlp.experts.gate_up_proj', 'mlp.experts.down_proj'] (no regex, as PEFT).")
        bad = [v for v in value if not isinstance(v, str) or not v]
        if bad:
            raise LoRAConfigError(f"target_parameters contains {bad!r}; expected non-empty parameter names (strings).")
        self.target_parameters = list(value) or None

    def _check_parameter_combinations(self) -> None:
        """What `target_parameters` cannot be combined with (the adapter's input is never seen)."""
        if not self.target_parameters:
            return
        if self.dropout:
            raise LoRAConfigError(f"dropout={self.dropout} cannot apply to target_parameters (PEFT neither): the input "
                                  "of a raw parameter is not visible; set dropout=0.")
        if self.use_dora:
            raise LoRAConfigError("use_dora=True cannot be combined with target_parameters (PEFT neither): DoRA is "
                                  "implemented for Linear and Conv1D layers; drop use_dora or target_parameters.")
        if self.init not in INIT_CHOICES:
            raise LoRAConfigError(f"init={self.init!r} cannot be combined with target_parameters: PiSSA/OLoRA "
                                  "decompose a 2-D weight; use init='kaiming' or 'gaussian'.")

    def _check_quantization(self) -> None:
        if isinstance(self.quantize_base, str):
            self.quantize_base = self.quantize_base.lower()
        if self.quantize_base is not None and self.quantize_base not in QUANTIZE_BASE_CHOICES:
            raise LoRAConfigError(f"quantize_base={self.quantize_base!r} is invalid; expected one of "
                                  f"{', '.join(map(repr, QUANTIZE_BASE_CHOICES))} or None (keep the base as it is).")
        if self.quantize_base_modules is not None and self.quantize_base_modules not in QUANTIZE_BASE_MODULES_CHOICES:
            raise LoRAConfigError(f"quantize_base_modules={self.quantize_base_modules!r} is invalid; expected "
                                  f"{' or '.join(map(repr, QUANTIZE_BASE_MODULES_CHOICES))}.")
        if self.quantize_base is None:
            if self.quantize_base_modules == ALL_LINEAR:
                raise LoRAConfigError(f"quantize_base_modules={self.quantize_base_modules!r} needs quantize_base; set "
                                      "quantize_base='nf4' as well, or drop quantize_base_modules.")
            self.quantize_base_modules = None  # configs written before the default changed say "adapted"
        elif self.quantize_base_modules is None:
            self.quantize_base_modules = ALL_LINEAR  # QLoRA: the whole frozen base in 4 bits
        if self.quantize_base is not None and self.init not in QUANTIZE_SAFE_INITS:
            raise LoRAConfigError(f"init={self.init!r} cannot be combined with quantize_base={self.quantize_base!r}: "
                                  "that initialisation changes the base weights, which a quantized base cannot hold "
                                  f"exactly; use init={' or '.join(map(repr, QUANTIZE_SAFE_INITS))}, or drop quantize_base.")

    def _check_variants(self) -> None:
        """DoRA, LoRA+ and the base-changing initialisations (issue 17)."""
        if not isinstance(self.use_dora, bool):
            raise LoRAConfigError(f"use_dora={self.use_dora!r} is invalid; expected True or False.")
        ratio = self.loraplus_lr_ratio
        if ratio is not None:
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio <= 0:
                raise LoRAConfigError(f"loraplus_lr_ratio={ratio!r} is invalid; expected a finite number > 0 (B's "
                                      "learning rate is ratio x A's; the LoRA+ paper uses 16), or None to turn "
                                      "LoRA+ off.")
            self.loraplus_lr_ratio = float(ratio)
        emb = self.loraplus_lr_embedding
        if isinstance(emb, bool) or not isinstance(emb, (int, float)) or not math.isfinite(emb) or emb < 0:
            raise LoRAConfigError(f"loraplus_lr_embedding={emb!r} is invalid; expected a finite learning rate >= 0, "
                                  "e.g. 1e-6 (PEFT's default).")
        self.loraplus_lr_embedding = float(emb)

    @property
    def base_changing_init(self) -> bool:
        """Whether `init` replaces the base weights by a residual (PiSSA, OLoRA).

        Example:
            >>> LoRAConfig(init="pissa_niter_4").base_changing_init, LoRAConfig().base_changing_init
            (True, False)
        """
        return self.init not in INIT_CHOICES

    @staticmethod
    def _check_patterns(name: str, value: Any, allow_all_linear: bool = False) -> list[str] | str | None:
        if value is None:
            return None
        if isinstance(value, str):
            if value == ALL_LINEAR:
                if not allow_all_linear:
                    raise LoRAConfigError(f"{name}='all-linear' is only valid for target_modules.")
                return value
            try:
                re.compile(value)
            except re.error as err:
                raise LoRAConfigError(f"{name}={value!r} is not a valid regular expression ({err}); "
                                 "pass a list of module names such as ['q_proj', 'v_proj'] instead.") from None
            return value
        if isinstance(value, (list, tuple, set)):
            items = list(value)
            bad = [v for v in items if not isinstance(v, str) or not v]
            if bad:
                raise LoRAConfigError(f"{name} contains {bad!r}; expected non-empty module names (strings).")
            return items
        raise LoRAConfigError(f"{name}={value!r} is invalid; expected a list of module names or one regex string.")

    @staticmethod
    def _check_pattern_dict(name: str, value: Any, kind: type) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise LoRAConfigError(f"{name}={value!r} is invalid; expected a dict of module-name regex -> value.")
        out = {}
        for key, v in value.items():
            try:
                re.compile(key)
            except re.error as err:
                raise LoRAConfigError(f"{name} key {key!r} is not a valid regular expression ({err}).") from None
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and math.isfinite(v)
            if kind is int:
                ok = ok and float(v).is_integer()
            if not ok:
                raise LoRAConfigError(f"{name}[{key!r}]={v!r} is invalid; expected a {'positive integer' if kind is int else 'finite number > 0'}.")
            out[key] = kind(v)
        return out

    # ---------------------------------------------------------------- per-module values
    def rank_for(self, module_name: str) -> int:
        """Rank used for `module_name` (`rank_pattern` first, else `r`)."""
        key = pattern_key(module_name, self.rank_pattern)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        """Alpha used for `module_name` (`alpha_pattern` first, else `alpha`)."""
        key = pattern_key(module_name, self.alpha_pattern)
        return self.alpha_pattern[key] if key is not None else self.alpha

    def scaling_for(self, module_name: str) -> float:
        """`alpha / r`, or `alpha / sqrt(r)` with `use_rslora`, for `module_name`."""
        r, alpha = self.rank_for(module_name), self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    @property
    def torch_adapter_dtype(self) -> torch.dtype | None:
        """`adapter_dtype` as a `torch.dtype` (None: keep the base layer's dtype)."""
        return None if self.adapter_dtype is None else ADAPTER_DTYPES[self.adapter_dtype]

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; `LoRAConfig.from_dict(c.to_dict()) == c`."""
        out = dataclasses.asdict(self)
        for key in ("target_modules", "exclude_modules", "modules_to_save", "target_parameters"):
            if isinstance(out[key], (list, tuple)):
                out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoRAConfig:
        """Build a config from `to_dict()` output; an unknown key is an error that names it."""
        if not isinstance(data, dict):
            raise TypeError(f"LoRAConfig.from_dict expects a dict, got {type(data).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LoRAConfigError(f"Unknown LoRAConfig key(s) {unknown}; expected only: {', '.join(sorted(known))}.")
        return cls(**data)

    def describe_differences(self, other: LoRAConfig) -> list[str]:
        """Lines `field: self_value != other_value` for every field that differs."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [f"{k}: {mine[k]!r} != {theirs[k]!r}" for k in mine if mine[k] != theirs[k]]


def with_config_fields(func: Any) -> tuple[inspect.Signature, dict[str, Any]]:
    """`(signature, annotations)` for a function `f(self, *, own..., **config)` in which `**config` is
    spelled out as every `LoRAConfig` field (name, type, default), keyword-only, before the function's
    own keywords: so LightningCLI / jsonargparse validate those keys, and `LoRA(...)` cannot drift
    from `LoRAConfig`.

    Example:
        >>> def f(self, *, log: bool = True, **config): ...
        >>> list(with_config_fields(f)[0].parameters)[:3], list(with_config_fields(f)[0].parameters)[-1]
        (['self', 'r', 'alpha'], 'log')
    """
    own = inspect.signature(func)
    hints = typing.get_type_hints(LoRAConfig)
    own_hints = typing.get_type_hints(func)
    params = [p for n, p in own.parameters.items() if p.kind is not inspect.Parameter.KEYWORD_ONLY
              and p.kind is not inspect.Parameter.VAR_KEYWORD]
    for f in dataclasses.fields(LoRAConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=hints[f.name]))
    params += [p.replace(annotation=own_hints.get(p.name, p.annotation)) for p in own.parameters.values()
               if p.kind is inspect.Parameter.KEYWORD_ONLY]
    annotations = {**{f.name: hints[f.name] for f in dataclasses.fields(LoRAConfig)},
                   **{k: v for k, v in own_hints.items() if k not in ("config",)}}
    return inspect.Signature(params, return_annotation=None), annotations
