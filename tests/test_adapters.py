"""Issue 23, several adapters per model: acceptance tests against real PEFT (0.21) on a tiny Llama built in code.

Two adapters with different ranks, alphas and targets: "default" (r=4, alpha 8, q/v) and "fr" (r=2, alpha 6, q/k/o).
PEFT builds them (`get_peft_model` + `add_adapter`, every A and B random, `randomize_peft`) and our model gets the
very same tensors through `load_lora_state_dict(model, sd, adapter_name=...)`; every number is then compared with
PEFT's: logits per adapter and with both active, files and keys, mixed batches (forward and `generate`), the
gradients of a mixed training batch, `add_weighted_adapter`, delete, merge, disable and hot swap.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_llama
from peft_parity import assert_close_dicts, randomize_peft
from safetensors.torch import load_file

from lightning_lora import (
    LoRAConfig,
    LoRAError,
    active_adapters,
    adapter_names,
    add_weighted_adapter,
    delete_adapter,
    disable_lora,
    inject_lora,
    load_adapter,
    load_lora_state_dict,
    lora_state_dict,
    merge_adapter,
    merge_and_unload,
    mixed_batch,
    save_adapter,
    set_adapter,
    unmerge_adapter,
    unmerge_and_reinject,
)
from lightning_lora.surgery import adapter_keys, lora_layers

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.utils import get_peft_model_state_dict
    from peft.utils.hotswap import hotswap_adapter

pytestmark = pytest.mark.filterwarnings("ignore")

ATOL = 1e-5
#: four rows of eight tokens (the tiny Llama's vocabulary has 128 ids; 0 is its pad id)
IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 11, 4],
                    [3, 8, 2, 9, 1, 1, 6, 5],
                    [7, 7, 3, 12, 4, 9, 2, 1],
                    [2, 4, 6, 8, 10, 12, 14, 16]])
#: name -> (r, alpha, target_modules), in injection order
SPECS: dict[str, tuple[int, float, tuple[str, ...]]] = {
    "default": (4, 8, ("q_proj", "v_proj")),
    "fr": (2, 6, ("q_proj", "k_proj", "o_proj")),
}
#: the same two with one rank (PEFT's linear / ties / dare_* combinations need equal ranks)
SAME_R: dict[str, tuple[int, float, tuple[str, ...]]] = {
    "default": (4, 8, ("q_proj", "v_proj")),
    "fr": (4, 4, ("q_proj", "k_proj", "o_proj")),
}
MIXED = ["default", "fr", "__base__", "default"]


def ours_config(r: int, alpha: float, targets: tuple[str, ...], **kwargs) -> LoRAConfig:
    return LoRAConfig(r=r, alpha=alpha, dropout=0.0, target_modules=list(targets), **kwargs)


def peft_config(r: int, alpha: float, targets: tuple[str, ...]) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets))


def make_peft(specs=SPECS, seed: int = 1) -> PeftModel:
    """PEFT's model with the adapters of `specs` (the first one through get_peft_model), every A and B random."""
    names = list(specs)
    pm = get_peft_model(make_tiny_llama(), peft_config(*specs[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        pm.add_adapter(name, peft_config(*specs[name]))
    randomize_peft(pm, seed=seed)
    return pm.eval()


def peft_adapter(pm: PeftModel, name: str) -> dict[str, torch.Tensor]:
    """One PEFT adapter's tensors with the keys our model has when it carries only that adapter."""
    prefix = "base_model.model."
    return {k[len(prefix):]: v.detach().clone() for k, v in get_peft_model_state_dict(pm, adapter_name=name).items()}


def make_ours(pm: PeftModel, specs=SPECS, float64: bool = False) -> torch.nn.Module:
    """Our model with the adapters of `specs` injected in order and PEFT's tensors loaded into each
    (`float64`: base and adapters in float64; by default the adapters are float32, `adapter_dtype`)."""
    model = make_tiny_llama().double() if float64 else make_tiny_llama()
    for name, spec in specs.items():
        inject_lora(model, ours_config(*spec, adapter_dtype=None if float64 else "float32"), adapter_name=name)
        load_lora_state_dict(model, peft_adapter(pm, name), adapter_name=name)
    return model


def logits(model: torch.nn.Module, ids: torch.Tensor = IDS, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, **kwargs).logits


def close(ours: torch.Tensor, theirs: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(ours, theirs, atol=atol, rtol=0)


def trainable_names(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def lora_keys(i_layers, modules, infix: str = "") -> set[str]:
    return {f"model.layers.{i}.self_attn.{m}.{infix}lora_{ab}.weight" for i in i_layers for m in modules for ab in "AB"}


def peft_file_keys(modules) -> set[str]:
    return {"base_model.model." + k for k in lora_keys(range(2), modules)}


def pm_set(pm: PeftModel, active) -> None:
    pm.base_model.set_adapter(active)


# ------------------------------------------------------------------------------------------------ 1. logits
def test_each_adapter_and_both_active_equal_peft():
    pm = make_peft()
    model = make_ours(pm)
    assert adapter_names(model) == ["default", "fr"]
    assert active_adapters(model) == ["default", "fr"]  # the added adapter joins the active ones ...
    # ... and is the only trainable one: per layer q 2*(64+64) + k 2*(64+32) + o 2*(64+64)
    assert len(trainable_names(model)) == 12
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * (256 + 192 + 256)
    base = logits(make_tiny_llama())
    results = {}
    for active in ("default", "fr", ["default", "fr"]):
        set_adapter(model, active)
        pm_set(pm, active)
        expected_active = [active] if isinstance(active, str) else active
        assert active_adapters(model) == expected_active
        assert pm.base_model.active_adapters == expected_active
        ours = logits(model)
        close(ours, logits(pm))
        assert not torch.allclose(ours, base, atol=1e-3)
        results[str(active)] = ours
        # only the active adapters are trainable, as in PEFT
        assert trainable_names(model) and all(".lora_" in n for n in trainable_names(model))
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_peft = sum(p.numel() for n, p in pm.named_parameters() if p.requires_grad)
        assert n_trainable == n_peft, (active, n_trainable, n_peft)
    assert not torch.allclose(results["default"], results["fr"], atol=1e-3)
    assert not torch.allclose(results["['default', 'fr']"], results["default"], atol=1e-3)


# ------------------------------------------------------------------------------------------------ 2. files
def test_save_two_adapters_writes_peft_layout_and_peft_loads_it(tmp_path):
    pm = make_peft()
    model = make_ours(pm)
    out = save_adapter(model, tmp_path / "ours")
    pm.save_pretrained(str(tmp_path / "peft"))

    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors", "fr"]
    assert sorted(os.listdir(out / "fr")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert sorted(set(os.listdir(tmp_path / "peft")) - {"README.md"}) == sorted(os.listdir(out))
    assert sorted(os.listdir(tmp_path / "peft" / "fr")) == sorted(os.listdir(out / "fr"))
    for sub, name in (("", "default"), ("fr", "fr")):
        ours = load_file(str(out / sub / "adapter_model.safetensors"))
        theirs = load_file(str(tmp_path / "peft" / sub / "adapter_model.safetensors"))
        assert set(ours) == peft_file_keys(SPECS[name][2])  # PEFT's names, no adapter name inside
        assert_close_dicts(ours, theirs, atol=0)
        cfg = json.loads((out / sub / "adapter_config.json").read_text())
        assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], sorted(cfg["target_modules"])) == (
            "LORA", SPECS[name][0], SPECS[name][1], sorted(SPECS[name][2]))

    loaded = PeftModel.from_pretrained(make_tiny_llama(), str(out))
    loaded.load_adapter(str(out / "fr"), adapter_name="fr")
    loaded.eval()
    for active in ("default", "fr", ["default", "fr"]):
        set_adapter(model, active)
        pm_set(loaded, active)
        close(logits(loaded), logits(model))

    # selected_adapters: only fr, in its subfolder (PEFT's save_pretrained(selected_adapters=["fr"]))
    only_fr = save_adapter(model, tmp_path / "only_fr", selected_adapters=["fr"])
    assert sorted(os.listdir(only_fr)) == ["fr"]
    assert set(load_file(str(only_fr / "fr" / "adapter_model.safetensors"))) == peft_file_keys(SPECS["fr"][2])


def test_load_peft_multi_adapter_directory(tmp_path):
    pm = make_peft()
    pm.save_pretrained(str(tmp_path / "peft"))
    model = make_tiny_llama()
    load_adapter(model, tmp_path / "peft")
    assert adapter_names(model) == ["default"]
    load_adapter(model, tmp_path / "peft", adapter_name="fr")  # reads peft/fr/
    assert adapter_names(model) == ["default", "fr"]
    for name in ("default", "fr"):
        assert_close_dicts(lora_state_dict(model, adapter_name=name), peft_adapter(pm, name), atol=0)
    for active in ("default", "fr", ["default", "fr"]):
        set_adapter(model, active)
        pm_set(pm, active)
        close(logits(model), logits(pm))
    # a model with adapters needs the new adapter's name
    with pytest.raises(LoRAError):
        load_adapter(model, tmp_path / "peft")
    assert adapter_names(model) == ["default", "fr"]


def test_single_named_adapter_goes_to_its_subfolder_as_in_peft(tmp_path):
    pm = get_peft_model(make_tiny_llama(), peft_config(*SPECS["fr"]), adapter_name="fr")
    randomize_peft(pm)
    pm.eval().save_pretrained(str(tmp_path / "peft"))
    model = make_tiny_llama()
    inject_lora(model, ours_config(*SPECS["fr"]), adapter_name="fr")
    load_lora_state_dict(model, peft_adapter(pm, "fr"), adapter_name="fr")
    assert adapter_names(model) == ["fr"]
    out = save_adapter(model, tmp_path / "ours")
    assert sorted(os.listdir(out)) == sorted(set(os.listdir(tmp_path / "peft")) - {"README.md"}) == ["fr"]
    assert_close_dicts(load_file(str(out / "fr" / "adapter_model.safetensors")),
                       load_file(str(tmp_path / "peft" / "fr" / "adapter_model.safetensors")), atol=0)
    again = make_tiny_llama()
    load_adapter(again, tmp_path / "peft", adapter_name="fr")  # reads peft/fr/
    assert adapter_names(again) == ["fr"]
    close(logits(again), logits(pm))


# ------------------------------------------------------------------------------------------------ 3. keys
def test_state_dict_keys_first_adapter_unchanged_second_named():
    model = make_tiny_llama()
    inject_lora(model, ours_config(*SPECS["default"]))
    default_keys = lora_keys(range(2), ("q_proj", "v_proj"))
    assert set(lora_state_dict(model)) == default_keys  # one adapter: today's keys
    default_values = {k: v.clone() for k, v in lora_state_dict(model).items()}

    inject_lora(model, ours_config(*SPECS["fr"]), adapter_name="fr")
    keys = {k for k in model.state_dict() if "lora_" in k}
    # q_proj holds both: default keeps today's keys, fr is at lora_adapters.fr; k/o hold fr only (first of the layer)
    fr_named = lora_keys(range(2), ("q_proj",), infix="lora_adapters.fr.")
    assert keys == default_keys | fr_named | lora_keys(range(2), ("k_proj", "o_proj"))
    assert all("lora_adapters.fr." in k for k in keys - default_keys - lora_keys(range(2), ("k_proj", "o_proj")))

    fr_only = make_tiny_llama()
    inject_lora(fr_only, ours_config(*SPECS["fr"]), adapter_name="fr")
    fr_sd = lora_state_dict(model, adapter_name="fr")
    assert set(fr_sd) == set(lora_state_dict(fr_only)) == lora_keys(range(2), ("q_proj", "k_proj", "o_proj"))
    full = model.state_dict()
    for i in range(2):
        for ab in "AB":
            q = f"model.layers.{i}.self_attn.q_proj.lora_{ab}.weight"
            assert torch.equal(fr_sd[q], full[f"model.layers.{i}.self_attn.q_proj.lora_adapters.fr.lora_{ab}.weight"])
    default_sd = lora_state_dict(model, adapter_name="default")
    assert set(default_sd) == default_keys
    for k, v in default_sd.items():
        assert torch.equal(v, default_values[k])

    # round trip of one adapter through its unnamed keys
    new = {k: torch.randn_like(v) for k, v in fr_sd.items()}
    load_lora_state_dict(model, new, adapter_name="fr")
    assert_close_dicts(lora_state_dict(model, adapter_name="fr"), new, atol=0)
    assert_close_dicts(lora_state_dict(model, adapter_name="default"), default_values, atol=0)


# ------------------------------------------------------------------------------------------------ 4. mixed batch
def test_mixed_batch_rows_equal_single_adapters_and_peft():
    pm = make_peft()
    model = make_ours(pm)
    per = {}
    for name in ("default", "fr"):
        set_adapter(model, name)
        per[name] = logits(model)
    with disable_lora(model):
        per["__base__"] = logits(model)
    set_adapter(model, "fr")  # a mixed batch does not depend on the active adapters
    with mixed_batch(model, MIXED):
        mixed = logits(model)
    for i, name in enumerate(MIXED):
        close(mixed[i], per[name][i])
    close(mixed, logits(pm, adapter_names=MIXED))
    close(logits(model), per["fr"], atol=0)  # after the block: the active adapter again

    gen_kwargs = {"attention_mask": torch.ones_like(IDS), "do_sample": False, "max_new_tokens": 4, "pad_token_id": 0}
    with torch.no_grad(), mixed_batch(model, MIXED):
        ours = model.generate(IDS, **gen_kwargs)
    with torch.no_grad():
        theirs = pm.generate(input_ids=IDS, adapter_names=MIXED, **gen_kwargs)
    assert ours.shape == (4, 12)
    assert torch.equal(ours, theirs), (ours, theirs)
    alone = {}
    for name in ("default", "fr"):
        set_adapter(model, name)
        with torch.no_grad():
            alone[name] = model.generate(IDS, **gen_kwargs)
    with torch.no_grad(), disable_lora(model):
        alone["__base__"] = model.generate(IDS, **gen_kwargs)
    for i, name in enumerate(MIXED):
        assert torch.equal(ours[i], alone[name][i]), (i, name)
    beams = {**gen_kwargs, "num_beams": 2, "num_return_sequences": 2}  # 8 rows: each name on its 2 beams (PEFT)
    with torch.no_grad(), mixed_batch(model, MIXED, rows_per_name=2):
        ours = model.generate(IDS, **beams)
    with torch.no_grad():
        theirs = pm.generate(input_ids=IDS, adapter_names=MIXED, **beams)
    assert ours.shape == (8, 12)
    assert torch.equal(ours, theirs), (ours, theirs)


def test_mixed_batch_wrong_count_and_unknown_name():
    pm = make_peft()
    model = make_ours(pm)
    before = logits(model)
    with pytest.raises(LoRAError) as err, mixed_batch(model, ["default", "fr", "fr"]):
        logits(model)
    message = str(err.value)
    assert re.search(r"\b3\b", message) and re.search(r"\b4\b", message), message
    with pytest.raises(LoRAError, match="xx_unknown"), mixed_batch(model, ["default", "xx_unknown", "__base__", "fr"]):
        logits(model)
    # nothing is left behind: the active adapters run again, and a right mixed batch works
    close(logits(model), before, atol=0)
    with mixed_batch(model, MIXED):
        close(logits(model), logits(pm, adapter_names=MIXED))


# ------------------------------------------------------------------------------------------------ 5. training
def test_mixed_batch_training_gradients_equal_each_adapter_alone():
    torch.manual_seed(0)
    ids = torch.randint(1, 128, (5, 8))
    labels = torch.randint(1, 128, (5, 8))
    rows = ["fr", "default", "__base__", "fr", "default"]
    model = make_ours(make_peft(), float64=True).train()
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    trainable = {}
    for name in ("default", "fr"):
        set_adapter(model, name)
        trainable[name] = trainable_names(model)
        assert trainable[name] and all(".lora_" in n for n in trainable[name])
    assert not trainable["default"] & trainable["fr"]
    set_adapter(model, ["default", "fr"])
    assert trainable_names(model) == trainable["default"] | trainable["fr"]
    reference = copy.deepcopy(model)

    def loss_of(m: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = m(x).logits
        return F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="sum")

    with mixed_batch(model, rows):
        loss = loss_of(model, ids, labels)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())

    total = torch.zeros((), dtype=torch.float64)
    for name in ("default", "fr"):
        alone = copy.deepcopy(reference)
        set_adapter(alone, name)
        picked = [i for i, r in enumerate(rows) if r == name]
        part = loss_of(alone, ids[picked], labels[picked])
        part.backward()
        total += part.detach()
        for n in trainable[name]:
            torch.testing.assert_close(grads[n], alone.get_parameter(n).grad, atol=1e-6, rtol=0, msg=n)
    with torch.no_grad(), disable_lora(reference):
        total += loss_of(reference, ids[[2]], labels[[2]])
    close(loss.detach(), total, atol=1e-8)


# ------------------------------------------------------------------------------------------------ 6. combine
@pytest.mark.parametrize("combination_type", ["linear", "cat", "svd", "ties", "dare_linear", "dare_ties",
                                              "magnitude_prune", "ties_svd", "dare_linear_svd", "dare_ties_svd",
                                              "magnitude_prune_svd"])
def test_add_weighted_adapter_equals_peft(tmp_path, combination_type):
    specs = SPECS if combination_type == "cat" or combination_type.endswith("svd") else SAME_R
    pm = make_peft(specs)
    model = make_ours(pm, specs)
    set_adapter(model, "default")
    kwargs = {} if combination_type in ("linear", "cat", "svd") else {"density": 0.5}
    torch.manual_seed(123)
    pm.add_weighted_adapter(["default", "fr"], [0.6, -0.9], "new", combination_type=combination_type, **kwargs)
    torch.manual_seed(123)
    add_weighted_adapter(model, ["default", "fr"], [0.6, -0.9], "new", combination_type=combination_type, **kwargs)
    assert adapter_names(model) == ["default", "fr", "new"]
    assert active_adapters(model) == ["default"]  # added, not active (as PEFT)

    ours, theirs = lora_state_dict(model, adapter_name="new"), peft_adapter(pm, "new")
    assert set(ours) == lora_keys(range(2), ("q_proj", "k_proj", "v_proj", "o_proj"))
    rank = 6 if combination_type == "cat" else 4  # cat: 4 + 2; *svd: the largest rank; the others: the common one
    assert ours["model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (rank, 64)
    assert_close_dicts(ours, theirs, atol=1e-4)
    set_adapter(model, "new")
    pm.set_adapter("new")
    close(logits(model), logits(pm), atol=1e-4)
    saved = json.loads((save_adapter(model, tmp_path / "new", selected_adapters=["new"]) / "new" /
                        "adapter_config.json").read_text())
    their_cfg = pm.peft_config["new"]
    assert (saved["r"], saved["lora_alpha"]) == (their_cfg.r, their_cfg.lora_alpha) == (rank, rank)


# ------------------------------------------------------------------------------------------------ 7. delete, errors
def test_delete_adapter_and_name_errors():
    pm = make_peft()
    model = make_ours(pm)
    keys_before = set(model.state_dict())
    with pytest.raises(LoRAError) as err:
        set_adapter(model, "xx_unknown")
    assert all(word in str(err.value) for word in ("xx_unknown", "default", "fr")), str(err.value)
    with pytest.raises(LoRAError, match="xx_unknown"):
        set_adapter(model, ["default", "xx_unknown"])
    assert active_adapters(model) == ["default", "fr"]
    with pytest.raises(LoRAError, match="fr"):
        inject_lora(model, ours_config(*SPECS["fr"]), adapter_name="fr")
    with pytest.raises(LoRAError, match="default"):
        inject_lora(model, ours_config(*SPECS["default"]))
    with pytest.raises(LoRAError):  # a known limit for a second adapter
        inject_lora(model, LoRAConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]), adapter_name="de")
    assert adapter_names(model) == ["default", "fr"] and set(model.state_dict()) == keys_before

    set_adapter(model, "default")
    default_logits = logits(model)
    only_default = make_tiny_llama()
    inject_lora(only_default, ours_config(*SPECS["default"]))
    set_adapter(model, ["default", "fr"])
    delete_adapter(model, "fr")
    pm.delete_adapter("fr")
    assert adapter_names(model) == ["default"] and active_adapters(model) == ["default"]
    assert set(model.state_dict()) == set(only_default.state_dict())
    assert not any("fr" in name.split(".") for name, _ in model.named_modules())
    assert set(lora_state_dict(model)) == lora_keys(range(2), ("q_proj", "v_proj"))
    close(logits(model), default_logits, atol=0)
    close(logits(model), logits(pm))
    with pytest.raises(LoRAError, match="fr"):
        delete_adapter(model, "fr")
    with pytest.raises(LoRAError):
        delete_adapter(model, "default")  # the last one: unload / merge_and_unload
    assert adapter_names(model) == ["default"]


def test_delete_first_adapter_keeps_the_second():
    pm = make_peft()
    model = make_ours(pm)
    set_adapter(model, "fr")
    fr_logits, fr_sd = logits(model), lora_state_dict(model, adapter_name="fr")
    delete_adapter(model, "default")
    assert adapter_names(model) == ["fr"] and active_adapters(model) == ["fr"]
    assert not any(".default." in k for k in model.state_dict())
    assert_close_dicts(lora_state_dict(model, adapter_name="fr"), fr_sd, atol=0)
    close(logits(model), fr_logits)


# ------------------------------------------------------------------------------------------------ 8. merge
@pytest.mark.parametrize("active", ["fr", ["default", "fr"]])
def test_merge_and_unload_merges_active_adapters_only(active):
    pm = make_peft()
    model = make_ours(pm)
    base = make_tiny_llama()
    set_adapter(model, active)
    pm_set(pm, active)
    expected = logits(model)
    merged = merge_and_unload(model)
    assert set(merged.state_dict()) == set(base.state_dict())
    assert {n: type(m) for n, m in merged.named_modules()} == {n: type(m) for n, m in base.named_modules()}
    close(logits(merged), expected)
    peft_merged = pm.merge_and_unload()
    assert_close_dicts(merged.state_dict(), peft_merged.state_dict())
    close(logits(merged), logits(peft_merged))


# ------------------------------------------------------------------------------------------------ 9. disable
def test_disable_lora_runs_the_base_with_two_adapters():
    pm = make_peft()
    model = make_ours(pm)
    pm_set(pm, ["default", "fr"])
    base = logits(make_tiny_llama())
    both = logits(model)
    close(both, logits(pm))
    with disable_lora(model):
        close(logits(model), base, atol=0)
    with pm.disable_adapter():
        close(logits(pm), base)
    close(logits(model), both, atol=0)
    assert active_adapters(model) == ["default", "fr"]


# ------------------------------------------------------------------------------------------------ 10. hot swap
@pytest.fixture
def two_dirs(tmp_path):
    """Two PEFT directories with the same adapters (default at the root, fr/) and different weights."""
    for seed in (1, 2):
        make_peft(seed=seed).save_pretrained(str(tmp_path / f"d{seed}"))
    return tmp_path / "d1", tmp_path / "d2"


def test_hotswap_copies_weights_in_place(two_dirs):
    d1, d2 = two_dirs
    model = make_tiny_llama()
    load_adapter(model, d1)
    load_adapter(model, d1, adapter_name="fr")
    set_adapter(model, ["default", "fr"])
    ids_before = {n: id(p) for n, p in model.named_parameters()}
    before = logits(model)
    fr_before = lora_state_dict(model, adapter_name="fr")

    load_adapter(model, d2, adapter_name="default", hotswap=True)
    assert {n: id(p) for n, p in model.named_parameters()} == ids_before
    assert adapter_names(model) == ["default", "fr"] and active_adapters(model) == ["default", "fr"]
    fresh = make_tiny_llama()
    load_adapter(fresh, d2)
    assert_close_dicts(lora_state_dict(model, adapter_name="default"), lora_state_dict(fresh), atol=0)
    assert_close_dicts(lora_state_dict(model, adapter_name="fr"), fr_before, atol=0)  # fr untouched
    assert not torch.allclose(logits(model), before, atol=1e-3)

    load_adapter(model, d2, adapter_name="fr", hotswap=True)  # reads d2/fr
    assert {n: id(p) for n, p in model.named_parameters()} == ids_before
    load_adapter(fresh, d2, adapter_name="fr")
    set_adapter(fresh, ["default", "fr"])
    close(logits(model), logits(fresh), atol=0)

    # PEFT's hotswap_adapter gives the same model
    pm = PeftModel.from_pretrained(make_tiny_llama(), str(d1)).eval()
    hotswap_adapter(pm, str(d2), adapter_name="default")
    set_adapter(model, "default")
    close(logits(model), logits(pm))

    with pytest.raises(LoRAError, match="xx_unknown"):
        load_adapter(model, d1, adapter_name="xx_unknown", hotswap=True)
    assert adapter_names(model) == ["default", "fr"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LoRAError):  # fr's file (r=2 on q/k/o) does not fit default (r=4 on q/v)
        load_adapter(model, d1 / "fr", adapter_name="default", hotswap=True)
    assert_close_dicts(model.state_dict(), before, atol=0)


def test_hotswap_does_not_recompile(two_dirs):
    d1, d2 = two_dirs
    model = make_tiny_llama()
    load_adapter(model, d1)
    expected_new = make_tiny_llama()
    load_adapter(expected_new, d2)
    old, new = logits(model), logits(expected_new)

    graphs: list = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend=counting_backend)
        close(logits(compiled), old)
        compiled_graphs = len(graphs)
        assert compiled_graphs > 0
        close(logits(compiled), old)
        assert len(graphs) == compiled_graphs
        load_adapter(model, d2, adapter_name="default", hotswap=True)
        swapped = logits(compiled)
        assert len(graphs) == compiled_graphs  # no recompilation
        close(swapped, new)
        assert not torch.allclose(swapped, old, atol=1e-3)
    finally:
        torch._dynamo.reset()


def test_merge_adapter_and_unmerge_with_two_dora_adapters_round_trip():
    """merge_adapter folds both active DoRA adapters in (outputs unchanged) and unmerge_adapter puts the base back
    within rounding: each adapter's norm at merge time is kept on its own slot."""
    torch.manual_seed(0)
    model = make_tiny_llama()
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True))
    inject_lora(model, LoRAConfig(r=2, alpha=6, target_modules=["q_proj"], use_dora=True), adapter_name="fr")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                p.add_(torch.randn_like(p) * 0.1)
    set_adapter(model, ["default", "fr"])
    weight = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    before = logits(model)
    merge_adapter(model)
    close(logits(model), before, atol=1e-5)
    unmerge_adapter(model)
    close(logits(model), before, atol=1e-5)
    assert (model.model.layers[0].self_attn.q_proj.weight - weight).abs().max() < 1e-6


def test_merge_and_unload_keep_then_unmerge_and_reinject_with_two_adapters():
    """A kept merge of several adapters is undone whole: the same names, keys, active and trainable adapters, and
    outputs within rounding (DoRA's norms at merge time kept per adapter)."""
    torch.manual_seed(0)
    model = make_tiny_llama()
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True))
    inject_lora(model, LoRAConfig(r=2, alpha=6, target_modules=["q_proj", "k_proj"]), adapter_name="fr")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                p.add_(torch.randn_like(p) * 0.1)
    set_adapter(model, ["fr", "default"], trainable=["fr"])
    before, keys = logits(model), sorted(model.state_dict())
    merged = logits(merge_and_unload(model, keep=True))
    close(merged, before, atol=1e-5)
    unmerge_and_reinject(model)
    assert adapter_names(model) == ["default", "fr"] and active_adapters(model) == ["fr", "default"]
    assert sorted(model.state_dict()) == keys
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        n for n in adapter_keys(model, "fr")]
    close(logits(model), before, atol=1e-5)


def _two_linear_model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Sequential()
    m.add_module("q_proj", torch.nn.Linear(4, 4))
    m.add_module("v_proj", torch.nn.Linear(4, 4))
    inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]), adapter_name="fr")
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_()
    return m


def test_merge_and_unmerge_where_no_active_adapter_is_held_leave_the_weight():
    """v_proj holds only "default"; with "fr" active it merges nothing, and unmerging subtracts nothing."""
    m = _two_linear_model()
    w0 = m.v_proj.weight.detach().clone()
    set_adapter(m, "fr")
    merge_adapter(m)
    assert torch.equal(m.v_proj.weight, w0)
    unmerge_adapter(m)
    assert torch.equal(m.v_proj.weight, w0)


def test_one_adapter_layers_follow_set_adapter_and_refuse_mixed_rows():
    torch.manual_seed(0)
    m = torch.nn.Module()
    m.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    m.lin = torch.nn.Linear(8, 8)
    x = torch.randn(2, 3, 8)
    base = m.attn(x, x, x)[0].detach()
    inject_lora(m, LoRAConfig(r=2, target_modules=["attn", "lin"]))
    inject_lora(m, LoRAConfig(r=2, target_modules=["lin"]), adapter_name="fr")
    with torch.no_grad():
        m.attn.lora_B.weight.fill_(1.0)
    assert not torch.allclose(m.attn(x, x, x)[0], base)
    set_adapter(m, "fr")  # attn holds "default" only: it runs its base
    torch.testing.assert_close(m.attn(x, x, x)[0], base)
    with pytest.raises(LoRAError, match=r"mixed_batch cannot give rows different adapters in attn "
                                        r"\(LoRAMultiheadAttention\)"), mixed_batch(m, ["default", "fr"]):
        pass


def test_deleting_the_only_active_adapter_activates_the_first_as_peft():
    m = _two_linear_model()
    set_adapter(m, "fr")
    with pytest.warns(UserWarning, match="'fr' was the only active adapter; 'default' is active now"):
        delete_adapter(m, "fr")
    assert active_adapters(m) == ["default"] and m.q_proj.lora_A.weight.requires_grad


@pytest.mark.parametrize("name", ["", "a.b", "__base__", 3])
def test_invalid_adapter_names_are_refused_before_anything_changes(name):
    m = _two_linear_model()
    keys = sorted(m.state_dict())
    with pytest.raises(LoRAError, match=r"adapter_name=.* is invalid; expected a non-empty name without dots"):
        inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]), adapter_name=name)
    with pytest.raises(LoRAError, match="is invalid"):
        add_weighted_adapter(m, ["default", "fr"], [1.0, 1.0], name, combination_type="cat")
    assert sorted(m.state_dict()) == keys and adapter_names(m) == ["default", "fr"]


def test_merged_models_refuse_set_adapter_new_adapters_and_hotswap(tmp_path):
    m = _two_linear_model()
    save_adapter(m, tmp_path / "a")
    merge_adapter(m)
    with pytest.raises(LoRAError, match=r"cannot set the active adapters to \['fr'\] while \['default', 'fr'\] are "
                                        r"merged into the base; unmerge_adapter\(model\) first"):
        set_adapter(m, "fr")
    with pytest.raises(LoRAError, match="cannot add adapter 'de' while adapters are merged"):
        inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]), adapter_name="de")
    with pytest.raises(LoRAError, match="hotswap of adapter 'fr' while adapters are merged"):
        load_adapter(m, tmp_path / "a", adapter_name="fr", hotswap=True)


def test_hotswap_takes_the_files_alpha_and_save_writes_it(tmp_path):
    m = _two_linear_model()
    other = _two_linear_model()
    with torch.no_grad():
        other.q_proj.lora_adapters.fr.lora_B.weight.mul_(3.0)
    delete_adapter(other, "default")  # "fr" alone: saved at tmp/b/fr
    other.lora_state.config = dataclasses.replace(other.lora_state.config, alpha=32.0)
    for _, layer in lora_layers(other):
        layer.lora_alpha, layer.scaling = 32.0, 16.0
    save_adapter(other, tmp_path / "b")
    load_adapter(m, tmp_path / "b", adapter_name="fr", hotswap=True)
    assert m.q_proj.lora_adapters.fr.scaling == 16.0
    save_adapter(m, tmp_path / "c")
    assert json.loads((tmp_path / "c" / "fr" / "adapter_config.json").read_text())["lora_alpha"] == 32.0


def test_a_second_adapter_beside_target_parameters_is_refused():
    class Experts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4, 8, 6))

        def forward(self, x):
            return torch.bmm(x, self.w.transpose(1, 2))

    m = torch.nn.Module()
    m.experts, m.q_proj = Experts(), torch.nn.Linear(6, 6)
    inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"], target_parameters=["experts.w"]))
    with pytest.raises(LoRAError, match=r"adapter 'fr' cannot be added: the model's adapters include "
                                        r"target_parameters adapters \(experts.lora.w, ...\)"):
        inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]), adapter_name="fr")
    assert type(m.experts).__name__ == "LoRAParameterHost" and adapter_names(m) == ["default"]


def test_mixed_batch_counts_names_strictly():
    """As PEFT: one name per row (times rows_per_name): a list that only divides the batch is refused."""
    m = _two_linear_model()
    for names, rows, per in ((["default", "fr"], 4, 1), (["fr"], 3, 1), (["default", "fr"], 6, 2)):
        with pytest.raises(LoRAError, match=rf"given {len(names) * per} adapter names \(rows_per_name included\) "
                                            rf"for a batch of {rows} rows"), mixed_batch(m, names, rows_per_name=per):
            m(torch.ones(rows, 4))
    with pytest.raises(LoRAError, match="mixed_batch expects one adapter name per row, got the string 'fr'"):
        with mixed_batch(m, "fr"):
            pass


def test_load_adapter_names_the_adapters_a_directory_holds(tmp_path):
    m = _two_linear_model()
    save_adapter(m, tmp_path / "two")
    fresh = torch.nn.Sequential()
    fresh.add_module("q_proj", torch.nn.Linear(4, 4))
    fresh.add_module("v_proj", torch.nn.Linear(4, 4))
    load_adapter(fresh, tmp_path / "two")
    with pytest.raises(LoRAError, match=r"holds several adapters \('default' \(top level\), 'fr'\) and "
                                        r"adapter_name='frr' is not one of them"):
        load_adapter(fresh, tmp_path / "two", adapter_name="frr")
    assert adapter_names(fresh) == ["default"]
    delete_adapter(m, "default")
    save_adapter(m, tmp_path / "only-fr")
    with pytest.raises(LoRAError, match=r"holds several adapters \('fr'\) and no adapter_name is not one of them"):
        load_adapter(fresh, tmp_path / "only-fr")
    with pytest.raises(LoRAError, match=r"hotswap=True replaces the weights of an adapter already loaded; "
                                        r"adapter_name='es' is not one"):
        load_adapter(fresh, tmp_path / "nowhere", adapter_name="es", hotswap=True)


def test_a_peft_adapter_carrying_the_head_loads_as_a_second_adapter(tmp_path):
    """PEFT writes lm_head.weight into an adapter that targets lm_head; equal to the model's, it is not a change."""
    pm = get_peft_model(make_tiny_llama(), LoraConfig(r=4, target_modules=["gate_proj", "lm_head"]))
    randomize_peft(pm, seed=3)
    pm.save_pretrained(tmp_path / "head", save_embedding_layers=True)
    assert "base_model.model.lm_head.base_layer.weight" in load_file(tmp_path / "head" / "adapter_model.safetensors")
    model = make_tiny_llama()
    inject_lora(model, LoRAConfig(r=4, target_modules=["q_proj"]))
    load_adapter(model, tmp_path / "head", adapter_name="b")
    set_adapter(model, "b")
    pm.eval()
    close(logits(model), logits(pm))
