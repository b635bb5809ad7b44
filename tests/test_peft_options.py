"""Issue 22: PEFT 0.21 options we do not implement are never dropped silently.

Every field of `peft.LoraConfig` is listed below as translated, harmless (cannot change what a loaded adapter
computes or how it trains) or refused. A PEFT adapter that asks for a refused option, and a `LoRAConfig` / `LoRA`
callback that asks for one, is a clear error naming it, never a plain-LoRA run that trains differently.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch
from conftest import make_tiny_llama

from lightning_lora import LoRA, LoRAConfig, LoRAError, load_adapter

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from peft import LoraConfig, PeftModel, get_peft_model

IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))

#: fields whose value we translate (the loaded adapter computes and trains as PEFT's)
TRANSLATED = {"peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "bias",
              "use_rslora", "modules_to_save", "rank_pattern", "alpha_pattern", "init_lora_weights",
              "layers_to_transform", "layers_pattern", "use_dora", "target_parameters"}
#: bookkeeping, or only read by PEFT when another (checked) option asks for it
HARMLESS = {"task_type", "base_model_name_or_path", "revision", "inference_mode", "peft_version", "auto_mapping",
            "fan_in_fan_out", "megatron_core", "qalora_group_size", "runtime_config", "ensure_weight_tying",
            "loftq_config", "eva_config", "corda_config", "astra_config"}
#: refused whenever set, with a value that asks for the feature
REFUSED = {
    "lora_bias": True,
    "kasa_config": {"beta": 0.0001, "gamma": 0.001},
    "use_qalora": True,
    "alora_invocation_tokens": [3, 4],
    "use_bdlora": {"target_modules_bd_a": ["q_proj"], "target_modules_bd_b": ["v_proj"], "nblocks": 2},
    "arrow_config": {"top_k": 3, "router_temperature": 1.0},
    "monteclora_config": {"num_samples": 4},
    "lora_ga_config": {"direction": "ArB2r", "scale": "stable", "stable_gamma": 16},
    "layer_replication": [[0, 2], [1, 2]],
    "trainable_token_indices": [1, 2],
    "megatron_config": {"tensor_model_parallel_size": 2},
}
#: the forward is plain LoRA, but training is not (VeLoRA swaps lora_A's backward, MiCA freezes B):
#: loading for inference is fine, loading to train is refused
TRAINING_ONLY = {"velora_config": {"num_groups": 64, "scale": 1.0, "init_type": "batch_average"}}
#: init_lora_weights values: base-changing inits and variants are refused, init-only values load
REFUSED_INITS = ["pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga", "astra"]
TRAINING_ONLY_INITS = ["mica"]
LOADABLE_INITS = [True, False, "gaussian", "eva", "orthogonal", "nora"]


def test_every_peft_lora_option_is_classified():
    """A new PEFT option fails here until it is translated, declared harmless or refused."""
    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    listed = TRANSLATED | HARMLESS | set(REFUSED) | set(TRAINING_ONLY)
    assert fields - listed == set(), f"unclassified PEFT options: {sorted(fields - listed)}"
    assert not (TRANSLATED & HARMLESS) and not (set(REFUSED) & (TRANSLATED | HARMLESS))


def test_every_init_value_is_classified():
    field = next(f for f in dataclasses.fields(LoraConfig) if f.name == "init_lora_weights")
    assert "mica" in field.metadata["lora_variants"]
    import typing

    literal = [a for a in typing.get_args(typing.get_type_hints(LoraConfig)["init_lora_weights"])
               if typing.get_origin(a) is typing.Literal]
    names = {v for lit in literal for v in typing.get_args(lit)}
    names.discard("pissa_niter_[number of iters]")
    assert names <= set(REFUSED_INITS) | set(TRAINING_ONLY_INITS) | set(LOADABLE_INITS)


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory):
    """A plain PEFT adapter on the tiny Llama (q_proj, v_proj), with non-zero B; and its logits."""
    directory = tmp_path_factory.mktemp("peft") / "plain"
    torch.manual_seed(0)
    pm = get_peft_model(make_tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    pm.save_pretrained(str(directory))
    return directory


def edited(peft_dir, tmp_path, **changes):
    target = tmp_path / "edited"
    target.mkdir()
    for f in peft_dir.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((target / "adapter_config.json").read_text())
    cfg.update(changes)
    (target / "adapter_config.json").write_text(json.dumps(cfg))
    return target


def assert_refused(directory, key: str, trainable: bool) -> None:
    base = make_tiny_llama()
    with torch.no_grad():
        reference = base(IDS).logits
    with pytest.raises(LoRAError, match=key):
        load_adapter(base, directory, trainable=trainable)
    assert not any(".lora_" in k for k in base.state_dict())
    with torch.no_grad():
        assert torch.equal(base(IDS).logits, reference)


@pytest.mark.parametrize("key", sorted(REFUSED))
@pytest.mark.parametrize("trainable", [False, True])
def test_refused_option_in_adapter_config(peft_dir, tmp_path, key, trainable):
    assert_refused(edited(peft_dir, tmp_path, **{key: REFUSED[key]}), key, trainable)


@pytest.mark.parametrize("init", REFUSED_INITS)
def test_refused_init_in_adapter_config(peft_dir, tmp_path, init):
    assert_refused(edited(peft_dir, tmp_path, init_lora_weights=init), init, trainable=False)


@pytest.mark.parametrize("key, value", [(k, v) for k, v in TRAINING_ONLY.items()]
                         + [("init_lora_weights", v) for v in TRAINING_ONLY_INITS])
def test_training_only_option_loads_for_inference_and_refuses_training(peft_dir, tmp_path, key, value):
    directory = edited(peft_dir, tmp_path, **{key: value})
    model = make_tiny_llama()
    load_adapter(model, directory)
    pm = PeftModel.from_pretrained(make_tiny_llama(), str(peft_dir)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, pm(IDS).logits, atol=1e-5, rtol=0)
    assert_refused(directory, key if key != "init_lora_weights" else value, trainable=True)


@pytest.mark.parametrize("init", LOADABLE_INITS)
@pytest.mark.parametrize("trainable", [False, True])
def test_init_only_values_load_and_equal_peft(peft_dir, tmp_path, init, trainable):
    """The init of a saved adapter is history: its tensors are in the file; loading (also to go on training) is
    what PEFT's `PeftModel.from_pretrained(..., is_trainable=True)` does."""
    model = make_tiny_llama()
    load_adapter(model, edited(peft_dir, tmp_path, init_lora_weights=init), trainable=trainable)
    pm = PeftModel.from_pretrained(make_tiny_llama(), str(peft_dir)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, pm(IDS).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["corda", "loftq", "lora_ga", "astra"] + TRAINING_ONLY_INITS
                         + ["eva", "orthogonal", "nora", "true"])
def test_lora_config_refuses_inits_we_do_not_implement(init):
    with pytest.raises(LoRAError, match=init):
        LoRAConfig(init=init)


@pytest.mark.parametrize("key", sorted(set(REFUSED) | set(TRAINING_ONLY)))
def test_lora_config_and_callback_refuse_peft_options(key):
    value = {**REFUSED, **TRAINING_ONLY}[key]
    with pytest.raises(LoRAError, match=key):
        LoRAConfig.from_dict({**LoRAConfig().to_dict(), key: value})
    with pytest.raises((LoRAError, TypeError), match=key):
        LoRA(**{key: value})
