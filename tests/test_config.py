"""`LoRAConfig`: validation (error types and messages), per-module values, (de)serialisation, matching."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_lora import LoRAConfig
from lightning_lora.config import name_matches, pattern_key

# ---------------------------------------------------------------------------------------------- defaults


def test_defaults_and_to_dict_exact():
    cfg = LoRAConfig()
    assert cfg.to_dict() == {
        "r": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"], "exclude_modules": None,
        "bias": "none", "use_rslora": False, "init": "kaiming", "modules_to_save": None, "task_heads": True,
        "save_embedding_layers": "auto", "rank_pattern": {},
        "alpha_pattern": {}, "adapter_dtype": "float32", "quantize_base": None, "quantize_base_modules": None,
        "adapter_compute_dtype": "auto", "use_dora": False, "loraplus_lr_ratio": None, "loraplus_lr_embedding": 1e-6,
        "target_parameters": None,
    }
    assert cfg.torch_adapter_dtype is torch.float32
    # the docstring example
    assert LoRAConfig(r=16, alpha=32).scaling_for("model.layers.0.self_attn.q_proj") == 2.0


def test_normalisation_of_accepted_inputs():
    cfg = LoRAConfig(alpha=32, dropout=0, target_modules=("q_proj", "k_proj"), modules_to_save="score",
                     rank_pattern={"q_proj": 4.0}, alpha_pattern={"k_proj": 3}, adapter_dtype=torch.bfloat16)
    assert type(cfg.alpha) is float and cfg.alpha == 32.0
    assert type(cfg.dropout) is float
    assert cfg.target_modules == ["q_proj", "k_proj"]
    assert cfg.modules_to_save == ["score"]
    assert cfg.rank_pattern == {"q_proj": 4} and type(cfg.rank_pattern["q_proj"]) is int
    assert cfg.alpha_pattern == {"k_proj": 3.0} and type(cfg.alpha_pattern["k_proj"]) is float
    assert cfg.adapter_dtype == "bfloat16" and cfg.torch_adapter_dtype is torch.bfloat16


@pytest.mark.parametrize(("given_dtype", "name", "torch_dtype"), [
    ("fp32", "float32", torch.float32), ("bf16", "bfloat16", torch.bfloat16), ("half", "float16", torch.float16),
    (torch.float64, "float64", torch.float64), ("float16", "float16", torch.float16), (None, None, None),
])
def test_adapter_dtype_aliases(given_dtype, name, torch_dtype):
    cfg = LoRAConfig(adapter_dtype=given_dtype)
    assert cfg.adapter_dtype == name
    assert cfg.torch_adapter_dtype is torch_dtype


# ---------------------------------------------------------------------------------------------- bad inputs

BAD_CONFIGS = [
    # (kwargs, substrings the message must contain)
    ({"r": 0}, ["r=0", "integer > 0"]),
    ({"r": -4}, ["r=-4", "integer > 0"]),
    ({"r": "8"}, ["r='8'", "integer > 0"]),
    ({"r": 8.0}, ["r=8.0", "integer > 0"]),
    ({"r": True}, ["r=True", "integer > 0"]),
    ({"alpha": 0}, ["alpha=0", "> 0"]),
    ({"alpha": -1.0}, ["alpha=-1.0", "> 0"]),
    ({"alpha": float("nan")}, ["alpha=nan", "> 0"]),
    ({"alpha": float("inf")}, ["alpha=inf", "finite"]),
    ({"alpha": "16"}, ["alpha='16'"]),
    ({"dropout": 1.0}, ["dropout=1.0", "0 <= dropout < 1"]),
    ({"dropout": -0.1}, ["dropout=-0.1", "0 <= dropout < 1"]),
    ({"bias": "some"}, ["bias='some'", "none, all, lora_only"]),
    ({"init": "xavier"}, ["init='xavier'", "gaussian, kaiming"]),
    ({"use_rslora": "yes"}, ["use_rslora='yes'", "True or False"]),
    ({"target_modules": "q_proj(["}, ["target_modules='q_proj(['", "not a valid regular expression"]),
    ({"exclude_modules": "*bad"}, ["exclude_modules='*bad'", "not a valid regular expression"]),
    ({"target_modules": []}, ["target_modules is empty", "'all-linear'"]),
    ({"target_modules": ""}, ["target_modules is empty"]),
    ({"target_modules": ["q_proj", ""]}, ["target_modules contains ['']", "non-empty module names"]),
    ({"target_modules": ["q_proj", 3]}, ["target_modules contains [3]"]),
    ({"target_modules": 5}, ["target_modules=5", "list of module names"]),
    ({"exclude_modules": "all-linear"}, ["exclude_modules='all-linear'", "only valid for target_modules"]),
    ({"modules_to_save": ["score", ""]}, ["modules_to_save contains ['']"]),
    ({"rank_pattern": {"q_proj": 0}}, ["rank_pattern['q_proj']=0", "positive integer"]),
    ({"rank_pattern": {"q_proj": 2.5}}, ["rank_pattern['q_proj']=2.5", "positive integer"]),
    ({"rank_pattern": {"q_proj": "4"}}, ["rank_pattern['q_proj']='4'", "positive integer"]),
    ({"rank_pattern": {"q_proj": True}}, ["rank_pattern['q_proj']=True"]),
    ({"rank_pattern": {"(q": 4}}, ["rank_pattern key '(q'", "not a valid regular expression"]),
    ({"rank_pattern": ["q_proj"]}, ["rank_pattern=['q_proj']", "dict"]),
    ({"alpha_pattern": {"v_proj": -2}}, ["alpha_pattern['v_proj']=-2", "number > 0"]),
    ({"alpha_pattern": {"v_proj": float("inf")}}, ["alpha_pattern['v_proj']=inf", "finite number > 0"]),
    ({"adapter_dtype": "int8"}, ["adapter_dtype='int8'", "not supported", "bfloat16", "float32"]),
    ({"adapter_dtype": torch.int64}, ["adapter_dtype=torch.int64", "not supported"]),
    ({"adapter_compute_dtype": "bf16"}, ["adapter_compute_dtype='bf16' is invalid", "auto, base, adapter"]),
]


@pytest.mark.parametrize(("kwargs", "fragments"), BAD_CONFIGS, ids=[repr(k) for k, _ in BAD_CONFIGS])
def test_bad_config_raises_value_error_with_message(kwargs, fragments):
    with pytest.raises(ValueError) as info:
        LoRAConfig(**kwargs)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_from_dict_unknown_key_is_named():
    data = LoRAConfig().to_dict()
    data["lora_rank"] = 8
    data["zz_extra"] = 1
    with pytest.raises(ValueError, match=r"Unknown LoRAConfig key\(s\) \['lora_rank', 'zz_extra'\]") as info:
        LoRAConfig.from_dict(data)
    assert "target_modules" in str(info.value)  # lists the valid keys


def test_from_dict_rejects_non_dict_and_validates_values():
    with pytest.raises(TypeError, match="expects a dict, got list"):
        LoRAConfig.from_dict([("r", 8)])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="r=0"):
        LoRAConfig.from_dict({"r": 0})


# ---------------------------------------------------------------------------------------------- round trip

_names = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True)
_name_lists = st.lists(_names, min_size=1, max_size=4)
_regexes = st.sampled_from([r".*\.(q|v)_proj", r"model\.layers\.[0-9]+\.mlp\..*", r".*attn.*"])
_positive_floats = st.floats(min_value=1e-6, max_value=1e6, allow_nan=False, allow_infinity=False)

valid_configs = st.builds(
    LoRAConfig,
    r=st.integers(1, 512),
    alpha=_positive_floats,
    dropout=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
    target_modules=st.one_of(_name_lists, _regexes, st.just("all-linear")),
    exclude_modules=st.one_of(st.none(), _name_lists, _regexes),
    bias=st.sampled_from(["none", "all", "lora_only"]),
    use_rslora=st.booleans(),
    init=st.sampled_from(["gaussian", "kaiming"]),
    modules_to_save=st.one_of(st.none(), _name_lists),
    rank_pattern=st.dictionaries(_names, st.integers(1, 128), max_size=3),
    alpha_pattern=st.dictionaries(_names, _positive_floats, max_size=3),
    adapter_dtype=st.sampled_from([None, "float32", "bfloat16", "float16", "float64", "bf16", torch.float32]),
    adapter_compute_dtype=st.sampled_from(["auto", "base", "adapter"]),
)


@settings(max_examples=60, deadline=None)
@given(valid_configs)
def test_to_dict_from_dict_round_trip_through_json(cfg):
    data = cfg.to_dict()
    back = LoRAConfig.from_dict(json.loads(json.dumps(data, allow_nan=False)))
    assert back == cfg
    assert back.to_dict() == data
    assert cfg.describe_differences(back) == []
    # to_dict is a copy, not a view of the config
    data["rank_pattern"]["zzz"] = 1
    assert "zzz" not in cfg.rank_pattern


def test_describe_differences_lists_changed_fields():
    a = LoRAConfig(r=8, target_modules=["q_proj"])
    b = LoRAConfig(r=16, target_modules=["q_proj"], bias="all")
    assert a.describe_differences(b) == ["r: 8 != 16", "bias: 'none' != 'all'"]


# ---------------------------------------------------------------------------------------------- matching


@pytest.mark.parametrize(("name", "patterns", "expected"), [
    ("a.q_proj", ["q_proj"], True),
    ("q_proj", ["q_proj"], True),
    ("a.xq_proj", ["q_proj"], False),
    ("a.q_proj.lora_A", ["q_proj"], False),
    ("model.layers.0.self_attn.q_proj", ["self_attn.q_proj"], True),
    ("model.layers.0.self_attn.q_proj", ["attn.q_proj"], False),
    ("model.layers.0.self_attn.q_proj", ("k_proj", "q_proj"), True),
    ("model.layers.0.self_attn.q_proj", r".*\.0\..*proj", True),
    ("model.layers.0.self_attn.q_proj", r"q_proj", False),          # a regex string must match the whole path
    ("model.layers.0.self_attn.q_proj", r"model\.layers\.0", False),  # ... not a prefix of it
    ("model.layers.10.self_attn.q_proj", r".*\.1\..*", False),
    ("model.layers.0.self_attn.q_proj", None, False),
])
def test_name_matches(name, patterns, expected):
    assert name_matches(name, patterns) is expected


def test_rank_and_alpha_pattern_per_module_values():
    cfg = LoRAConfig(r=8, alpha=16, rank_pattern={"q_proj": 4, r"layers\.1\.self_attn\.v_proj": 2},
                     alpha_pattern={"v_proj": 8})
    q0, v0, v1, k0 = (f"model.layers.{i}.self_attn.{p}" for i, p in [(0, "q_proj"), (0, "v_proj"), (1, "v_proj"), (0, "k_proj")])
    assert [cfg.rank_for(n) for n in (q0, v0, v1, k0)] == [4, 8, 2, 8]
    assert [cfg.alpha_for(n) for n in (q0, v0, v1, k0)] == [16.0, 8.0, 8.0, 16.0]
    assert [cfg.scaling_for(n) for n in (q0, v0, v1, k0)] == [4.0, 1.0, 4.0, 2.0]
    # pattern keys match at the end of the path on a "." boundary, as in PEFT
    assert cfg.rank_for("model.layers.0.self_attn.xq_proj") == 8
    assert cfg.rank_for("model.layers.0.self_attn.q_proj.inner") == 8
    rs = LoRAConfig(r=16, alpha=8, use_rslora=True, rank_pattern={"q_proj": 4})
    assert rs.scaling_for("a.q_proj") == 8 / math.sqrt(4)
    assert rs.scaling_for("a.k_proj") == 8 / math.sqrt(16)


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
                                  "model.layers.11.mlp.up_proj", "xq_proj", "transformer.h.1.attn.c_attn"])
def test_pattern_key_agrees_with_peft(name):
    from peft.utils.other import get_pattern_key

    keys = ["q_proj", r"layers\.1\..*v_proj", r"1\.mlp\.up_proj", "c_attn"]
    ours = pattern_key(name, dict.fromkeys(keys, 1))
    theirs = get_pattern_key(keys, name)  # PEFT returns the name itself when nothing matches
    assert ours == (theirs if theirs in keys else None)
