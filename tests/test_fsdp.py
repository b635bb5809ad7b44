"""LoRA under FSDP (`lightning_lora.fsdp`): Lightning's ModelParallelStrategy (FSDP2) on 2 CPU processes
(gloo), FSDP1's auto-wrap policy, adapter-only sharded and consolidated checkpoints, fit-end export.

The multi-process runs are few and shared (module-scoped fixtures), each a subprocess script:
`tests/fsdp_script.py` (a Trainer run) and `tests/fsdp_checks_script.py` (refusals and FSDP1 without a
Trainer). Every run trains a tiny Llama with a bf16 base and fp32 adapters.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama
from safetensors.torch import load_file

from lightning_lora import (
    LoRA,
    LoRAConfig,
    inject_lora,
    load_lora_state_dict,
    lora_parameters,
    merge_and_unload,
)
from lightning_lora.checkpoint import (
    CHECKPOINT_KEY,
    is_sharded_checkpoint,
    read_checkpoint,
    read_sharded_checkpoint,
)
from lightning_lora.errors import LoRAConfigError, LoRAError
from lightning_lora.fsdp import (
    FSDPOptions,
    clean_name,
    consolidate_checkpoint,
    decoder_layers,
    fsdp1_auto_wrap_policy,
    injecting_with,
    shard_lora_model,
)
from lightning_lora.strategies import prepare_fsdp1, strategy_kind
from lightning_lora.surgery import has_lora, is_lora_key

TESTS = Path(__file__).parent
ROOT = TESTS.parent
ADAPTER_KEYS = sorted(f"model.model.layers.{i}.self_attn.{m}.lora_{ab}.weight"
                      for i in (0, 1) for m in ("q_proj", "v_proj") for ab in "AB")
STEP_DIRS = ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt", "epoch=1-step=3.ckpt", "epoch=1-step=4.ckpt"]


def _run(script: str, *args: str, timeout: float = 420) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=f"{TESTS}{os.pathsep}{ROOT}", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, str(TESTS / script), *args], env=env, capture_output=True, text=True,
                         timeout=timeout, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res


def _facts(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory) -> Path:
    """FSDP2: 4 steps, a distributed checkpoint every step, adapters in their layers' units (`auto`),
    gradients clipped to norm 0.1 (below theirs: clipping acts on the sharded gradients)."""
    out = tmp_path_factory.mktemp("sharded")
    res = _run("fsdp_script.py", str(out), "4", "none", "sharded", "auto", "0.1")
    (out / "stdout.txt").write_text(res.stdout + res.stderr)
    return out


@pytest.fixture(scope="module")
def resumed_run(sharded_run, tmp_path_factory) -> Path:
    """The same run resumed from its step-2 distributed checkpoint, to step 4."""
    out = tmp_path_factory.mktemp("resumed")
    _run("fsdp_script.py", str(out), "4", str(sharded_run / "ckpts" / STEP_DIRS[1]), "sharded", "auto", "0.1")
    return out


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """FSDP2: 4 steps, one consolidated file per checkpoint (`save_distributed_checkpoint=False`), adapters in
    units of their own (`separate`), no clipping."""
    out = tmp_path_factory.mktemp("full")
    _run("fsdp_script.py", str(out), "4", "none", "full", "separate")
    return out


@pytest.fixture(scope="module")
def fsdp1_run(tmp_path_factory) -> Path:
    """FSDP1 (Lightning's FSDPStrategy on CPU processes): 4 steps, a distributed checkpoint every step."""
    out = tmp_path_factory.mktemp("fsdp1")
    res = _run("fsdp_script.py", str(out), "4", "none", "fsdp1-sharded", "auto")
    (out / "stdout.txt").write_text(res.stdout + res.stderr)
    return out


@pytest.fixture(scope="module")
def fsdp1_resumed(fsdp1_run, tmp_path_factory) -> Path:
    """The FSDP1 run resumed from its step-2 distributed checkpoint, writing one-file checkpoints (`full`)."""
    out = tmp_path_factory.mktemp("fsdp1-resumed")
    _run("fsdp_script.py", str(out), "4", str(fsdp1_run / "ckpts" / STEP_DIRS[1]), "fsdp1-full", "auto")
    return out


@pytest.fixture(scope="module")
def checks(sharded_run, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("checks")
    _run("fsdp_checks_script.py", str(out), "29561", str(sharded_run / "ckpts" / STEP_DIRS[-1]))
    return json.loads((out / "checks.json").read_text())


def reference_base() -> torch.nn.Module:
    """The base network the runs build in `configure_model` (bf16-true: drawn with default dtype bfloat16)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        return make_tiny_llama(seed=0)
    finally:
        torch.set_default_dtype(previous)


def reference_model(adapters: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The single-process model: the reference base with the run's adapters loaded."""
    model = reference_base()
    if dtype is not None:
        model = model.to(dtype)
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    load_lora_state_dict(model, {k.removeprefix("model."): v for k, v in adapters.items()})
    return model.eval()


TOKENS = torch.randint(1, 128, (2, 10), generator=torch.Generator().manual_seed(3))


# ------------------------------------------------------------------------------- ModelParallelStrategy (FSDP2)
def test_fit_shards_base_and_adapters_and_trains_only_adapters(sharded_run):
    ranks = _facts(sharded_run)
    for facts in ranks:
        assert facts["step"] == 4
        # units: each decoder layer (its fp32 adapters in the same unit), embedding, head, the network as root
        assert facts["units"] == ["model", "model.model.embed_tokens", "model.model.layers.0",
                                  "model.model.layers.1", "model.lm_head"]
        assert facts["all_dtensor"] is True
        assert facts["trainable_dtypes"] == ["torch.float32"] and facts["frozen_dtypes"] == ["torch.bfloat16"]
        assert facts["trainable_keys"] == ADAPTER_KEYS
        # every rank holds half of every tensor (all dims of the tiny Llama are even)
        assert facts["full_bytes"] == {"trainable": 7168, "frozen": 180864}
        assert facts["param_bytes"] == {"trainable": 3584, "frozen": 90432}
        # gradients: the adapter shards only; optimizer: exp_avg + exp_avg_sq of the adapter shards
        assert facts["grad_bytes"] == 3584 and facts["frozen_with_grad"] == 0
        assert facts["optimizer_params"] == 8
        assert facts["optimizer_holds_only_adapters"] is True and facts["optimizer_all_dtensor"] is True
        assert facts["optimizer_state_bytes"] == 2 * 3584
        assert facts["adapter_dtypes"] == ["torch.float32"]
    assert ranks[0]["sha256"] == ranks[1]["sha256"]  # the gathered adapters are the same on every rank
    adapters = torch.load(sharded_run / "adapters.pt", weights_only=True)
    assert sorted(adapters) == ADAPTER_KEYS
    assert all(adapters[k].abs().sum() > 0 for k in ADAPTER_KEYS if "lora_B" in k)  # B moved away from zero
    out = (sharded_run / "stdout.txt").read_text()
    assert "LoRA: sharded with FSDP2 (fully_shard) in 2 layer units, 1 embedding unit, 1 head unit, 1 root unit" in out


def test_distributed_checkpoint_holds_only_adapters_and_the_lora_section(sharded_run):
    import torch.distributed.checkpoint as dcp

    assert sorted(p.name for p in (sharded_run / "ckpts").iterdir()) == STEP_DIRS
    for name in STEP_DIRS:
        path = sharded_run / "ckpts" / name
        assert is_sharded_checkpoint(path)
        assert sorted(p.name for p in path.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
        stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        tensors = sorted(k.removeprefix("state_dict.") for k in stored if k.startswith("state_dict."))
        assert tensors == ADAPTER_KEYS  # no base weight
        optimizer = {k.split(".state.")[1].rsplit(".", 1)[0] for k in stored if k.startswith("optimizer_0.state.")}
        assert sorted(optimizer) == ADAPTER_KEYS
        assert set(stored) - {f"state_dict.{k}" for k in tensors} - {k for k in stored if k.startswith("optimizer_0.")} \
            == set()
        meta = torch.load(path / "meta.pt", weights_only=True)
        assert "state_dict" not in meta
        assert meta[CHECKPOINT_KEY]["config"]["r"] == 4 and meta[CHECKPOINT_KEY]["model_prefix"] == "model"


def test_resume_from_distributed_checkpoint_equals_uninterrupted_run(sharded_run, resumed_run):
    full = torch.load(sharded_run / "adapters.pt", weights_only=True)
    resumed = torch.load(resumed_run / "adapters.pt", weights_only=True)
    assert sorted(full) == sorted(resumed) == ADAPTER_KEYS
    assert all(torch.equal(full[k], resumed[k]) for k in full)  # bit for bit
    assert _facts(resumed_run)[0]["sha256"] == _facts(resumed_run)[1]["sha256"] == _facts(sharded_run)[0]["sha256"]
    step2 = read_checkpoint(sharded_run / "ckpts" / STEP_DIRS[1]).state_dict
    assert not all(torch.equal(step2[k.removeprefix("model.")], full[k]) for k in full)  # steps 3-4 changed them


@pytest.mark.parametrize("run", ["sharded_run", "full_run", "fsdp1_run"])
def test_weights_only_checkpoint_is_adapter_only_with_the_lora_section_and_exports(run, request, tmp_path):
    # issue 20 item 3: Lightning writes weights-only checkpoints without callbacks' on_save_checkpoint
    from lightning_lora.commands import export_main

    out = request.getfixturevalue(run)
    [path] = (out / "weights").iterdir()
    assert path.name == "epoch=1-step=4.ckpt"
    assert is_sharded_checkpoint(path) is (run != "full_run")
    ckpt = read_sharded_checkpoint(path) if is_sharded_checkpoint(path) else torch.load(path, weights_only=True)
    assert sorted(ckpt["state_dict"]) == ADAPTER_KEYS and "optimizer_states" not in ckpt
    assert ckpt[CHECKPOINT_KEY]["config"]["r"] == 4 and ckpt[CHECKPOINT_KEY]["model_prefix"] == "model"
    adapters = torch.load(out / "adapters.pt", weights_only=True)
    assert all(torch.equal(ckpt["state_dict"][k], adapters[k]) for k in ADAPTER_KEYS)
    assert export_main([str(path), str(tmp_path / "peft")]) == 0
    exported = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert all(torch.equal(exported[f"base_model.model.{k.removeprefix('model.')}"], adapters[k]) for k in adapters)


def test_consolidated_checkpoint_file_is_adapter_only_and_exports_to_peft(full_run, tmp_path):
    from peft import PeftModel

    from lightning_lora.commands import export_main

    assert sorted(p.name for p in (full_run / "ckpts").iterdir()) == STEP_DIRS
    last = full_run / "ckpts" / STEP_DIRS[-1]
    assert last.is_file()
    raw = torch.load(last, map_location="cpu", weights_only=True)
    assert sorted(raw["state_dict"]) == ADAPTER_KEYS and raw[CHECKPOINT_KEY]["config"]["r"] == 4
    adapters = torch.load(full_run / "adapters.pt", weights_only=True)
    assert all(torch.equal(raw["state_dict"][k], adapters[k]) for k in ADAPTER_KEYS)
    assert read_checkpoint(last).model_prefix == "model"
    assert export_main([str(last), str(tmp_path / "peft")]) == 0
    exported = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    at_fit_end = load_file(str(full_run / "adapter" / "adapter_model.safetensors"))
    assert exported.keys() == at_fit_end.keys() and all(torch.equal(exported[k], at_fit_end[k]) for k in exported)
    # PEFT loads it onto the base (fp32 copy of the bf16 weights) and computes what our single-process model does
    ours = reference_model(adapters, torch.float32)
    theirs = PeftModel.from_pretrained(reference_base().float(), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=TOKENS).logits, ours(input_ids=TOKENS).logits, atol=1e-5, rtol=0)


def test_adapters_in_units_of_their_own(full_run, checks):
    facts = _facts(full_run)[0]
    assert facts["units"] == ["model", "model.model.embed_tokens", "model.model.layers.0"] + [
        f"model.model.layers.0.self_attn.{m}.lora_{ab}" for m in ("q_proj", "v_proj") for ab in "AB"] + [
        "model.model.layers.1"] + [f"model.model.layers.1.self_attn.{m}.lora_{ab}" for m in ("q_proj", "v_proj")
                                   for ab in "AB"] + ["model.lm_head"]
    assert facts["grad_bytes"] == 3584 and facts["optimizer_state_bytes"] == 7168
    # the plain module path (hooks on the adapter units) trains as the fused kernels do (3 steps, all-linear, fp32;
    # the fused kernels fold the scaling into the GEMM, so fp32 rounding differs and AdamW's lr=1e-2 steps amplify it)
    assert checks["fsdp2"]["layer_vs_separate_keys"] == 28
    assert checks["fsdp2"]["layer_vs_separate_max_diff"] <= 1e-5


def test_fit_end_writes_gathered_peft_adapter_and_merged_model(sharded_run):
    adapters = torch.load(sharded_run / "adapters.pt", weights_only=True)
    written = load_file(str(sharded_run / "adapter" / "adapter_model.safetensors"))
    assert sorted(written) == sorted(f"base_model.model.{k.removeprefix('model.')}" for k in ADAPTER_KEYS)
    assert all(torch.equal(written[f"base_model.model.{k.removeprefix('model.')}"], adapters[k]) for k in adapters)
    merged = load_file(str(sharded_run / "merged" / "model.safetensors"))
    expected = merge_and_unload(reference_model(adapters)).state_dict()
    assert sorted(merged) == sorted(expected)
    assert all(merged[k].dtype == torch.bfloat16 and torch.equal(merged[k], expected[k]) for k in expected)
    base = reference_base().state_dict()
    assert torch.equal(merged["model.layers.0.self_attn.k_proj.weight"], base["model.layers.0.self_attn.k_proj.weight"])
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"],
                           base["model.layers.0.self_attn.q_proj.weight"])
    out = (sharded_run / "stdout.txt").read_text()
    assert "LoRA: adapter written to" in out and "(PEFT format, gathered from the shards)" in out
    assert "LoRA: the model is sharded (FSDP), so its adapters stay unmerged in memory" in out


def test_statistics_are_reduced_over_shards(sharded_run):
    rows = list(csv.DictReader((sharded_run / "logs" / "version_0" / "metrics.csv").open()))
    ratios = [float(r["lora/delta_ratio"]) for r in rows if r.get("lora/delta_ratio")]
    norms = [float(r["lora/grad_norm"]) for r in rows if r.get("lora/grad_norm")]
    assert len(ratios) == len(norms) == 4
    assert ratios[0] == 0.0 and all(b > a for a, b in pairwise(ratios))  # B = 0 before the first step
    assert all(0.1 < n < 10 for n in norms)  # logged before clipping; above 0.1, so clipping acted


def test_read_and_consolidate_a_distributed_checkpoint(sharded_run, tmp_path):
    from lightning_lora.commands import export_main

    path = sharded_run / "ckpts" / STEP_DIRS[-1]
    ckpt = read_checkpoint(path)
    adapters = torch.load(sharded_run / "adapters.pt", weights_only=True)
    assert sorted(ckpt.state_dict) == sorted(k.removeprefix("model.") for k in ADAPTER_KEYS)
    assert all(torch.equal(ckpt.state_dict[k.removeprefix("model.")], adapters[k]) for k in adapters)
    assert ckpt.config.r == 4 and ckpt.task_type == "CAUSAL_LM"
    single = consolidate_checkpoint(path, tmp_path / "last.ckpt")
    raw = torch.load(single, map_location="cpu", weights_only=True)
    assert sorted(raw["state_dict"]) == ADAPTER_KEYS and raw["global_step"] == 4 and len(raw["optimizer_states"]) == 1
    assert export_main([str(single), str(tmp_path / "peft")]) == 0
    exported = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert all(torch.equal(exported[f"base_model.model.{k.removeprefix('model.')}"], adapters[k]) for k in adapters)
    assert export_main([str(path), str(tmp_path / "peft-from-dir")]) == 0  # the directory itself
    direct = load_file(str(tmp_path / "peft-from-dir" / "adapter_model.safetensors"))
    assert direct.keys() == exported.keys() and all(torch.equal(direct[k], exported[k]) for k in direct)


# ------------------------------------------------------------------------------- refusals, FSDP1 (2 processes)
def test_refusals_name_the_fix(checks):
    fsdp2 = checks["fsdp2"]
    assert fsdp2["presharded"].startswith("configure_model sharded the network (fully_shard / FSDP) before the LoRA "
                                          "callback could add adapters")
    assert "shard_lora_model(self)" in fsdp2["presharded"]
    assert fsdp2["twice"] == "shard_lora_model: the model is already sharded; call it once, instead of fully_shard."
    assert fsdp2["tensor_parallel"].startswith("ModelParallelStrategy has tensor_parallel_size=2")
    assert "ModelParallelStrategy(data_parallel_size=<GPUs>, tensor_parallel_size=1)" in fsdp2["tensor_parallel"]
    assert fsdp2["mixed_layer"].startswith("FSDP unit 'model.layers.0' would hold trainable parameters of several "
                                           "dtypes (self_attn.q_proj.bias (bfloat16), self_attn.q_proj.lora_A.weight "
                                           "(float32)")


def test_load_sharded_adapters_checks_the_config_then_loads_every_shard(checks):
    fsdp2 = checks["fsdp2"]
    assert fsdp2["load_same_config"] == {"global_step": 4, "keys": 8, "equal": True}
    assert fsdp2["load_other_config"].startswith("The LoRA config in ")
    assert fsdp2["load_other_config"].splitlines()[1] == "  r: 2 != 4"
    assert fsdp2["load_other_config"].endswith("Resume with the same LoRA settings as the run that wrote the checkpoint.")


def test_auto_gives_adapters_their_own_unit_beside_trained_biases(checks):
    fsdp2 = checks["fsdp2"]
    assert fsdp2["auto_units"] == [["adapters", ["float32*"]], ["layer", ["bfloat16*", "bfloat16"]]] * 2 + [
        ["embedding", ["bfloat16"]], ["head", ["bfloat16"]], ["root", ["bfloat16"]]]
    assert fsdp2["auto_loss_finite"] and fsdp2["auto_grads"] == ["torch.bfloat16", "torch.float32"]


def test_adapters_start_from_rank_zeros_initialization(checks):
    assert checks["fsdp2"]["ranks_differed"] and checks["fsdp2"]["init_from_rank0"]


def test_fsdp1_policy_keeps_flat_parameters_of_one_dtype_and_trains(checks):
    fsdp1 = checks["fsdp1"]
    assert fsdp1["units"] == 11  # root, 2 layers, 8 adapter matrices
    adapter_units = {k: v for k, v in fsdp1["flat"].items() if k.endswith(("lora_A", "lora_B"))}
    assert len(adapter_units) == 8 and all(v == ["torch.float32", "torch.float32"] for v in adapter_units.values())
    others = {k: v for k, v in fsdp1["flat"].items() if k not in adapter_units}
    assert sorted(others) == ["<root>", "_fsdp_wrapped_module.model.layers.0", "_fsdp_wrapped_module.model.layers.1"]
    assert all(v == ["torch.bfloat16", "torch.bfloat16"] for v in others.values())
    assert fsdp1["lora_parameters"] == 8  # found through the wrapper names
    assert fsdp1["losses"][1] < fsdp1["losses"][0]
    assert fsdp1["adapter_keys"] == sorted(k.removeprefix("model.") for k in ADAPTER_KEYS)
    assert fsdp1["adapter_dtypes"] == ["torch.float32"] and fsdp1["adapters_equal_on_ranks"] and fsdp1["b_trained"]
    assert fsdp1["norms_match"]


def test_frozen_no_shard_units_get_their_parameters_back(checks):
    # after one step under NO_SHARD: the root unit's 3 weights (embedding, final norm, head) and layer 0's 9 are
    # plain tensors (layer 1's came back through its backward prefetch); the state dict then holds all 49 keys
    assert checks["fsdp1"]["no_shard"] == {"unregistered_before": 12, "unregistered_after": 0,
                                           "state_dict_keys": 49}


# ------------------------------------------------------------------------------- in-process
def test_options_are_validated():
    assert FSDPOptions.coerce(None) == FSDPOptions() and FSDPOptions.coerce(False).auto is False
    with pytest.raises(LoRAConfigError, match=r"fsdp adapter_units='both' is invalid; expected one of auto, layer, "
                                              r"separate\."):
        FSDPOptions.coerce({"adapter_units": "both"})
    with pytest.raises(LoRAConfigError, match=r"unknown option\(s\) \['reshard'\]"):
        LoRA(fsdp={"reshard": True})
    with pytest.raises(LoRAConfigError, match="expected a dict of FSDP options"):
        FSDPOptions.coerce("separate")
    assert LoRA(fsdp={"adapter_units": "separate", "layers": "LlamaDecoderLayer"}).fsdp == FSDPOptions(
        layers=["LlamaDecoderLayer"], adapter_units="separate")


def test_decoder_layers_and_tied_embeddings():
    from lightning_lora.fsdp.plan import _tied

    model = make_tiny_llama()
    assert [p for p, _ in decoder_layers(model)] == ["model.layers.0", "model.layers.1"]
    assert [p for p, _ in decoder_layers(model, ["LlamaMLP"])] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    with pytest.raises(LoRAError, match=r"fsdp layers=\['Block'\] matched no module of LlamaForCausalLM; its "
                                        r"container classes are: .*LlamaDecoderLayer"):
        decoder_layers(model, ["Block"])
    assert not _tied(model) and _tied(make_tiny_llama(tie_word_embeddings=True))


def test_strategy_kind():
    from lightning.pytorch.strategies import (
        DDPStrategy,
        FSDPStrategy,
        ModelParallelStrategy,
    )

    assert strategy_kind(ModelParallelStrategy()) == "fsdp2"
    assert strategy_kind(FSDPStrategy()) == "fsdp1"
    assert strategy_kind(DDPStrategy()) is None


def test_fsdp1_policy_wraps_adapter_matrices_and_layers():
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model = make_tiny_llama()
    inject_lora(model, LoRAConfig(r=2, target_modules=["q_proj"]))
    policy = fsdp1_auto_wrap_policy(model)
    decide = policy._lambda_fn
    layer = model.model.layers[0]
    a = decide(layer.self_attn.q_proj.lora_A)
    assert a["mixed_precision"].param_dtype == torch.float32 and a["mixed_precision"].reduce_dtype == torch.float32
    assert decide(layer) is True and isinstance(layer, LlamaDecoderLayer)
    assert decide(layer.self_attn.q_proj) is False and decide(layer.self_attn.k_proj) is False
    assert fsdp1_auto_wrap_policy(model, adapter_precision=None)._lambda_fn(layer.self_attn.q_proj.lora_B) is True


def test_prepare_fsdp1_combines_layer_classes_or_refuses():
    import lightning as L
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp.wrap import CustomPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    class Module(L.LightningModule):
        def __init__(self, **kw) -> None:
            super().__init__()
            self.model = make_tiny_llama(**kw)

    module = Module()
    inject_lora(module, LoRAConfig(r=2))
    strategy = FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer})
    prepare_fsdp1(strategy, module)
    assert isinstance(strategy.kwargs["auto_wrap_policy"], CustomPolicy)
    assert strategy.kwargs["auto_wrap_policy"]._lambda_fn(module.model.model.layers[1]) is True
    with pytest.raises(LoRAError, match=r"cannot be combined with LoRA's adapter units: FSDP1 flattens each unit.*"
                                        r"or use ModelParallelStrategy \(FSDP2\)"):
        prepare_fsdp1(FSDPStrategy(auto_wrap_policy=lambda *a, **k: False), module)
    biased = Module(attention_bias=True)
    inject_lora(biased, LoRAConfig(r=2, bias="all"))
    with pytest.raises(LoRAError, match=r"FSDPStrategy\(use_orig_params=False\) with trainable base parameters "
                                        r"\(\['model.model.layers.0.self_attn.q_proj.bias'"):
        prepare_fsdp1(FSDPStrategy(use_orig_params=False), biased)


def test_trainable_parameters_are_found_through_wrapper_names():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        checkpoint_wrapper,
    )

    model = make_tiny_llama()
    inject_lora(model, LoRAConfig(r=2))
    model.model.layers[0] = checkpoint_wrapper(model.model.layers[0])
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "model.layers.0._checkpoint_wrapped_module.self_attn.q_proj.lora_A.weight" in names
    assert len(lora_parameters(model)) == 8
    assert clean_name(names[0]) == "model.layers.0.self_attn.q_proj.lora_A.weight" and is_lora_key(names[0])


def test_peft_export_sees_through_wrapper_names():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        checkpoint_wrapper,
    )

    from lightning_lora.fsdp import adapter_state_dict
    from lightning_lora.peft_format import to_peft

    model = make_tiny_llama()
    inject_lora(model, LoRAConfig(r=2, target_modules="all-linear"))
    tensors, cfg = to_peft(model)
    model.model.layers[0] = checkpoint_wrapper(model.model.layers[0])
    wrapped_tensors, wrapped_cfg = to_peft(model, adapter_state=adapter_state_dict(model))
    assert wrapped_cfg == cfg and sorted(wrapped_tensors) == sorted(tensors)
    assert all(torch.equal(wrapped_tensors[k], tensors[k]) for k in tensors)


def test_llama_70b_config_shards_over_8_gpus(capsys):
    import yaml

    from lightning_lora.cli import main

    assert main(["fit", "--config", str(ROOT / "configs" / "llama-3-70b-lora-fsdp.yaml"), "--print_config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    trainer = cfg["trainer"]
    assert trainer["devices"] == 8 and trainer["precision"] == "bf16-true" and trainer["accelerator"] == "gpu"
    assert trainer["strategy"]["class_path"] == "lightning.pytorch.strategies.ModelParallelStrategy"
    assert trainer["strategy"]["init_args"]["data_parallel_size"] == 8
    assert trainer["strategy"]["init_args"]["tensor_parallel_size"] == 1
    assert cfg["model"]["init_args"]["gradient_checkpointing"] is True
    assert cfg["model"]["init_args"]["dtype"] == "bfloat16"
    lora = next(c["init_args"] for c in trainer["callbacks"] if c["class_path"] == "lightning_lora.LoRA")
    assert lora["r"] == 16 and lora["target_modules"] == "all-linear"


# ------------------------------------------------------------------------------- FSDPStrategy (FSDP1)
def test_fsdp1_wraps_adapters_in_units_of_their_own_and_trains_as_fsdp2(fsdp1_run, full_run):
    ranks = _facts(fsdp1_run)
    for facts in ranks:
        assert facts["units"] == [f"model.model.layers.{i}{s}" for i in (0, 1) for s in
                                  ["", *(f".self_attn.{m}.lora_{ab}" for m in ("q_proj", "v_proj") for ab in "AB")]]
        assert facts["flat_dtypes"] == ["torch.bfloat16", "torch.float32"]  # each flat parameter of one dtype
        assert facts["trainable_keys"] == ADAPTER_KEYS
        assert facts["param_bytes"] == {"trainable": 3584, "frozen": 90432}  # half per rank
        assert facts["grad_bytes"] == 3584 and facts["frozen_with_grad"] == 0
        assert facts["optimizer_params"] == 8 and facts["optimizer_holds_only_adapters"] is True
        assert facts["optimizer_state_bytes"] == 7168 and facts["adapter_dtypes"] == ["torch.float32"]
    assert ranks[0]["sha256"] == ranks[1]["sha256"]
    fsdp1 = torch.load(fsdp1_run / "adapters.pt", weights_only=True)
    fsdp2 = torch.load(full_run / "adapters.pt", weights_only=True)  # FSDP2, adapters in their own units too
    for key in ADAPTER_KEYS:
        torch.testing.assert_close(fsdp1[key], fsdp2[key], atol=1e-6, rtol=1e-5)
    written = load_file(str(fsdp1_run / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(written[f"base_model.model.{k.removeprefix('model.')}"], fsdp1[k]) for k in fsdp1)
    out = (fsdp1_run / "stdout.txt").read_text()
    assert "the merged model was not written to" in out and "(not supported under FSDPStrategy); merge offline " \
        "from the adapter: lightning-lora merge --base <base model> --adapter" in out
    assert not (fsdp1_run / "merged").exists()


def test_fsdp1_checkpoints_hold_only_adapters_and_resume_exactly(fsdp1_run, fsdp1_resumed):
    import torch.distributed.checkpoint as dcp

    for name in STEP_DIRS:  # state_dict_type="sharded": Lightning stores the model under "model."
        stored = dcp.FileSystemReader(str(fsdp1_run / "ckpts" / name)).read_metadata().state_dict_metadata
        assert sorted(k.removeprefix("model.") for k in stored if k.startswith("model.")) == ADAPTER_KEYS
        assert all(k.startswith(("model.", "optimizer_0.")) for k in stored)
    first = torch.load(fsdp1_run / "adapters.pt", weights_only=True)
    resumed = torch.load(fsdp1_resumed / "adapters.pt", weights_only=True)
    assert all(torch.equal(first[k], resumed[k]) for k in ADAPTER_KEYS)
    # the resumed run wrote one-file checkpoints (state_dict_type="full"), from step 3 on
    files = sorted(p.name for p in (fsdp1_resumed / "ckpts").iterdir())
    assert files == STEP_DIRS[2:] and all((fsdp1_resumed / "ckpts" / f).is_file() for f in files)
    raw = torch.load(fsdp1_resumed / "ckpts" / files[-1], map_location="cpu", weights_only=True)
    assert sorted(raw["state_dict"]) == ADAPTER_KEYS
    assert all(torch.equal(raw["state_dict"][k], resumed[k]) for k in ADAPTER_KEYS)
    assert read_checkpoint(fsdp1_resumed / "ckpts" / files[-1]).config.r == 4


def test_dora_is_refused_under_fsdp_with_the_ways_out():
    from lightning.pytorch.strategies import FSDPStrategy

    message = (r"use_dora=True is not supported under FSDP \(ModelParallelStrategy / FSDPStrategy\) yet: DoRA's weight "
               r"norm needs the whole weight of model.layers.0.self_attn.q_proj and its adapters at once. Train DoRA on "
               r"one device or with DDP, or drop use_dora for the sharded run.")
    with pytest.raises(LoRAError, match=message):  # FSDP2: refused before any process group or mesh is needed
        shard_lora_model(make_tiny_llama(), config=LoRAConfig(r=2, use_dora=True))
    model = make_tiny_llama()
    inject_lora(model, LoRAConfig(r=2, use_dora=True))
    with pytest.raises(LoRAError, match=message):  # FSDP1: before the strategy wraps anything
        prepare_fsdp1(FSDPStrategy(), model)


def test_shard_lora_model_injects_through_the_callbacks_injection_only():
    """Without `config=`, `shard_lora_model` injects with what `injecting_with` gives (the callback runs the module's
    `configure_model` inside it); nothing else: the torch-only plan does not look for a Lightning callback."""
    with pytest.raises(LoRAError, match="has no LoRA adapters and its Trainer has no LoRA callback"):
        shard_lora_model(make_tiny_llama())
    model, calls = make_tiny_llama(), []
    with injecting_with(lambda m: (calls.append(m), inject_lora(m, LoRAConfig(r=2)))):
        with pytest.raises(LoRAError, match="needs an initialized process group"):  # injected, then the mesh
            shard_lora_model(model)
    assert calls == [model] and has_lora(model)


DISABLE_UNDER_FSDP2 = """
import os, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from conftest import make_tiny_llama
from lightning_lora import LoRAConfig, LoRAError, disable_lora, inject_lora
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
dist.init_process_group("gloo", rank=0, world_size=1)
x = torch.randint(1, 128, (2, 8))
for saved in (["lm_head"], None):
    model = make_tiny_llama()
    with torch.no_grad():
        base = model(x).logits
    inject_lora(model, LoRAConfig(r=4, modules_to_save=saved))
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_B.weight.fill_(0.1)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    try:
        with disable_lora(model), torch.no_grad():
            print("equal", torch.equal(model(x).logits, base))
    except LoRAError as err:
        print("refused", err)
dist.destroy_process_group()
"""


def test_disable_lora_under_fsdp2_refuses_modules_to_save_and_runs_the_base_without():
    env = dict(os.environ, PYTHONPATH=f"{TESTS}{os.pathsep}{ROOT}", OMP_NUM_THREADS="1", PORT="29517")
    res = subprocess.run([sys.executable, "-c", DISABLE_UNDER_FSDP2], env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.splitlines() == [
        "refused disable_lora cannot run the original modules_to_save ['lm_head'] of a model sharded with FSDP (FSDP "
        "owns their parameters, so they cannot be swapped for the originals); compute the base outputs with an "
        "unsharded copy of the base model, or train without modules_to_save (task_heads=False).",
        "equal True"]
