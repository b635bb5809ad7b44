"""LoRA+ (`loraplus_lr_ratio`, issue 17 point 2): PEFT's grouping, any optimizer/scheduler, resume, bad input."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import make_tiny_llama
from lightning.pytorch.callbacks import ModelCheckpoint
from lit_models import TinyLlamaModule, fit
from torch import nn

from lightning_lora import (
    LoRA,
    LoRAConfig,
    LoRAConfigError,
    LoRAError,
    inject_lora,
    lora_parameters,
    lora_state_dict,
)
from lightning_lora.loraplus import (
    apply_loraplus,
    loraplus_param_groups,
    parameter_kinds,
    split_param_groups,
)
from lightning_lora.peft_format import from_peft_key
from lightning_lora.surgery import lora_layers

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model
from peft.optimizers import create_loraplus_optimizer

pytestmark = pytest.mark.filterwarnings("ignore")
IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 11, 4]])


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def lr_by_name(model: nn.Module, optimizer: torch.optim.Optimizer, peft_names: bool = False) -> dict[str, float]:
    """Each trainable parameter's learning rate in `optimizer`, under our key names."""
    lr = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            if peft_names:
                name = from_peft_key(name.replace(".modules_to_save.default", "").replace(".default", ""))
            out[name] = lr[id(p)]
    return out


# ------------------------------------------------------------------------------------------------ PEFT's grouping
@pytest.mark.parametrize("variant", ["embedding-and-modules_to_save", "dora"])
def test_groups_equal_peft_create_loraplus_optimizer(variant):
    if variant == "dora":
        ours_cfg = LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)
        peft_cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)
    else:
        ours_cfg = LoRAConfig(r=4, alpha=8, target_modules=["embed_tokens", "q_proj", "v_proj"],
                              modules_to_save=["lm_head"])
        peft_cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj", "v_proj"],
                              modules_to_save=["lm_head"])
    ours = make_tiny_llama()
    inject_lora(ours, ours_cfg)
    opt = torch.optim.AdamW(lora_parameters(ours), lr=1e-3, weight_decay=0.0)
    apply_loraplus(ours, [opt], [], ratio=16)
    pm = get_peft_model(make_tiny_llama(), peft_cfg)
    peft_opt = create_loraplus_optimizer(pm, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    got, want = lr_by_name(ours, opt), lr_by_name(pm, peft_opt, peft_names=True)
    assert got == pytest.approx(want) and len(got) == len(want)
    kinds = sorted(set(parameter_kinds(ours).values()))
    assert kinds == (["A", "B"] if variant == "dora" else ["A", "B", "embedding"])
    if variant == "dora":
        assert got["model.layers.0.self_attn.q_proj.lora_magnitude_vector"] == pytest.approx(16e-3)
    else:
        assert got["model.embed_tokens.lora_A.weight"] == 1e-6 and got["lm_head.weight"] == 1e-3


def test_training_equals_peft_loraplus_after_10_adamw_steps():
    targets = ["embed_tokens", "q_proj", "v_proj"]
    ours = make_tiny_llama()
    inject_lora(ours, LoRAConfig(r=4, alpha=8, target_modules=targets))
    pm = get_peft_model(make_tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    sd = pm.state_dict()
    with torch.no_grad():  # identical starting tensors (PEFT initialises embedding adapters its own way)
        for name, layer in lora_layers(ours):
            key = f"base_model.model.{name}"
            emb = name.endswith("embed_tokens")
            sd[f"{key}.lora_embedding_A.default" if emb else f"{key}.lora_A.default.weight"].copy_(layer.lora_A.weight)
            sd[f"{key}.lora_embedding_B.default" if emb else f"{key}.lora_B.default.weight"].copy_(layer.lora_B.weight)
    assert torch.equal(logits(ours), logits(pm))
    opts = [torch.optim.AdamW(lora_parameters(ours), lr=1e-2, weight_decay=0.0),
            create_loraplus_optimizer(pm, torch.optim.AdamW, lr=1e-2, loraplus_lr_ratio=16, loraplus_lr_embedding=1e-3)]
    apply_loraplus(ours, opts[:1], [], ratio=16, lr_embedding=1e-3)
    ids = torch.randint(1, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    for model, opt in zip((ours, pm), opts):
        model.train()
        for _ in range(10):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()
    assert (logits(ours) - logits(pm)).abs().max().item() <= 1e-5
    plain = make_tiny_llama()
    inject_lora(plain, LoRAConfig(r=4, alpha=8, target_modules=targets))
    assert (logits(ours) - logits(plain)).abs().max().item() > 1e-2


def test_param_groups_for_your_own_optimizer():
    model = make_tiny_llama()
    inject_lora(model, LoRAConfig(r=4, target_modules=["embed_tokens", "q_proj"], bias="none"))
    groups = loraplus_param_groups(model, lr=2e-4, ratio=8, weight_decay=0.0)
    assert [(g["loraplus"], g["lr"], len(g["params"]), g["weight_decay"]) for g in groups] == [
        ("A", 2e-4, 2, 0.0), ("B", pytest.approx(1.6e-3), 2, 0.0), ("embedding", 1e-6, 2, 0.0)]
    opt = torch.optim.AdamW(groups)
    assert split_param_groups(opt, parameter_kinds(model), ratio=8) == []  # already LoRA+ groups: left alone


# ------------------------------------------------------------------------------------------------ schedulers
def make_split(scheduler_factory, ratio=4.0):
    a, b = nn.Parameter(torch.zeros(3, 3)), nn.Parameter(torch.zeros(3, 3))
    opt = torch.optim.SGD([{"params": [a, b]}, {"params": [], "lr": 0.5}], lr=0.1, momentum=0.9)
    sched = scheduler_factory(opt)
    split_param_groups(opt, {id(b): "B"}, ratio, schedulers=[sched])
    return opt, sched


@pytest.mark.parametrize("name, factory", [
    ("LambdaLR", lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: min(1.0, (s + 1) / 3))),
    ("StepLR", lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)),
    ("CosineAnnealingLR", lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=6)),
    ("OneCycleLR", lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=[0.1, 0.5], total_steps=8)),
    ("SequentialLR", lambda o: torch.optim.lr_scheduler.SequentialLR(o, [
        torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=2),
        torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9)], milestones=[2])),
    ("CyclicLR", lambda o: torch.optim.lr_scheduler.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=2)),
])
def test_schedulers_see_every_group_and_keep_the_ratio(name, factory):
    opt, sched = make_split(factory)
    groups = opt.param_groups
    assert [g["loraplus"] for g in groups] == ["A", "B", "A"] and [len(g["params"]) for g in groups] == [1, 1, 0]
    for s in getattr(sched, "_schedulers", [sched]):  # SequentialLR: its schedulers hold the lists
        assert len(s.base_lrs) == len(groups) and len(s.get_last_lr()) == len(groups)
        assert s.base_lrs[1] == pytest.approx(4 * s.base_lrs[0])
    assert len(sched.get_last_lr()) == len(groups)
    for _ in range(6):
        assert groups[1]["lr"] == pytest.approx(4 * groups[0]["lr"]), name
        opt.step()
        sched.step()
        assert sched.get_last_lr() == [g["lr"] for g in groups]


# ------------------------------------------------------------------------------------------------ the callback
class Recorder(L.Callback):
    """The learning rate of every group at every step."""

    def __init__(self) -> None:
        self.lrs: list[list[float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])


class WarmupTwoGroups(TinyLlamaModule):
    """Two param groups (decay / no decay) and a per-step warmup built before the callback splits them."""

    def configure_optimizers(self):
        decay = [p for n, p in self.named_parameters() if n.endswith("weight")]
        no_decay = [p for n, p in self.named_parameters() if not n.endswith("weight")]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 3))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_callback_splits_whatever_configure_optimizers_built(tmp_path):
    module = WarmupTwoGroups()
    recorder = Recorder()
    trainer = fit(module, [LoRA(r=4, loraplus_lr_ratio=16, merge_on_fit_end=False), recorder], tmp_path, max_steps=4)
    opt = trainer.optimizers[0]
    groups = opt.param_groups
    assert [(g["loraplus"], g["weight_decay"], len(g["params"])) for g in groups] == [
        ("A", 0.1, 4), ("B", 0.1, 4), ("A", 0.0, 0)]
    b_params = {id(p) for _, layer in lora_layers(module) for p in [layer.lora_B.weight]}
    assert {id(p) for p in groups[1]["params"]} == b_params
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert sched.base_lrs == pytest.approx([1e-2, 16e-2, 1e-2]) and len(sched.lr_lambdas) == 3
    assert [lr for lrs in recorder.lrs for lr in lrs[:2]] == pytest.approx(
        [1e-2 / 3, 16e-2 / 3, 2e-2 / 3, 32e-2 / 3, 1e-2, 16e-2, 1e-2, 16e-2])


def test_callback_without_ratio_leaves_groups_alone(tmp_path):
    trainer = fit(TinyLlamaModule(), [LoRA(r=4, merge_on_fit_end=False)], tmp_path, max_steps=1)
    assert len(trainer.optimizers[0].param_groups) == 1 and "loraplus" not in trainer.optimizers[0].param_groups[0]


def test_resume_reproduces_an_uninterrupted_loraplus_run(tmp_path):
    def callback():
        return LoRA(r=4, loraplus_lr_ratio=16, merge_on_fit_end=False)

    full = TinyLlamaModule(scheduler=True)
    fit(full, [callback()], tmp_path / "full", max_steps=-1, max_epochs=2)
    first = TinyLlamaModule(scheduler=True)
    fit(first, [callback(), ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)], tmp_path / "a",
        max_steps=-1, max_epochs=1, enable_checkpointing=True)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert [g["loraplus"] for g in saved["optimizer_states"][0]["param_groups"]] == ["A", "B"]
    assert len(saved["lr_schedulers"][0]["base_lrs"]) == 2
    resumed = TinyLlamaModule(scheduler=True)
    trainer = fit(resumed, [callback()], tmp_path / "b", max_steps=-1, max_epochs=2,
                  ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 8
    a, b = lora_state_dict(full), lora_state_dict(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    groups = trainer.optimizers[0].param_groups
    assert [g["lr"] for g in groups] == pytest.approx([1e-2 * 0.25, 16e-2 * 0.25])  # StepLR per epoch, 2 epochs


def test_evaluation_ignores_training_only_options_and_resume_does_not(tmp_path):
    # LoRA+ (and dropout) change how adapters train, not what they compute: a plain-LoRA checkpoint is
    # validated under a callback with LoRA+; resuming training with another LoRA+ setting is refused
    module = TinyLlamaModule()
    fit(module, [LoRA(r=4, merge_on_fit_end=False), ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
        tmp_path / "a", max_steps=2, enable_checkpointing=True)
    last = str(tmp_path / "ckpt" / "last.ckpt")
    from lit_models import TokenData

    def validate(callback: LoRA) -> float:
        trainer = L.Trainer(callbacks=[callback], logger=False, enable_progress_bar=False, enable_model_summary=False,
                            accelerator="cpu", devices=1, default_root_dir=str(tmp_path))
        return trainer.validate(TinyLlamaModule(), datamodule=TokenData(), ckpt_path=last, verbose=False)[0]["val_loss"]

    plain = validate(LoRA(r=4, merge_on_fit_end=False))
    assert validate(LoRA(r=4, dropout=0.1, loraplus_lr_ratio=16, merge_on_fit_end=False)) == plain
    with pytest.raises(LoRAError, match=r"differs from this run's \(this run's value != the checkpoint's\):\n"
                                        r"  loraplus_lr_ratio: 16.0 != None"):
        fit(TinyLlamaModule(), [LoRA(r=4, loraplus_lr_ratio=16, merge_on_fit_end=False)], tmp_path / "b",
            max_steps=4, ckpt_path=last)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("ratio", [0, -1, 0.0, float("inf"), float("nan"), "16", True])
def test_bad_ratio_is_a_clear_error(ratio):
    with pytest.raises(LoRAConfigError, match=r"loraplus_lr_ratio=.* is invalid; expected a finite number > 0"):
        LoRAConfig(loraplus_lr_ratio=ratio)
    with pytest.raises(LoRAConfigError, match=r"loraplus_lr_ratio="):
        LoRA(loraplus_lr_ratio=ratio)


@pytest.mark.parametrize("value", [-1e-6, float("nan"), "x"])
def test_bad_embedding_lr_is_a_clear_error(value):
    with pytest.raises(LoRAConfigError, match=r"loraplus_lr_embedding=.* is invalid; expected a finite learning rate"):
        LoRAConfig(loraplus_lr_embedding=value)


def test_ratio_is_normalised_and_round_trips():
    cfg = LoRAConfig(loraplus_lr_ratio=16)
    assert cfg.loraplus_lr_ratio == 16.0 and type(cfg.loraplus_lr_ratio) is float
    assert LoRAConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(LoRAConfigError, match="loraplus_lr_ratio=0"):
        loraplus_param_groups(make_tiny_llama(), lr=1e-3, ratio=0)


# ------------------------------------------------------------------------------------------------ named groups
class NamedGroups(TinyLlamaModule):
    """Two named param groups (decay / no decay), as LearningRateMonitor users name them."""

    names: tuple[str | None, str | None] = ("decay", "no_decay")

    def configure_optimizers(self):
        decay = [p for n, p in self.named_parameters() if n.endswith("weight")]
        no_decay = [p for n, p in self.named_parameters() if not n.endswith("weight")]
        groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
        for group, name in zip(groups, self.names):
            if name is not None:
                group["name"] = name
        return torch.optim.AdamW(groups, lr=1e-2)


class UnnamedGroups(NamedGroups):
    names = (None, None)


@pytest.mark.parametrize(("module_cls", "expected"), [
    (NamedGroups, ["lr-AdamW/decay", "lr-AdamW/decay/lora_B", "lr-AdamW/decay/embedding", "lr-AdamW/no_decay"]),
    (UnnamedGroups, ["lr-AdamW/pg1", "lr-AdamW/pg2", "lr-AdamW/pg3", "lr-AdamW/pg4"]),
])
def test_split_groups_keep_unique_names_for_learning_rate_monitor(tmp_path, module_cls, expected):
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger

    monitor = LearningRateMonitor(logging_interval="step")
    lora = LoRA(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"], loraplus_lr_ratio=16,
                loraplus_lr_embedding=1e-4, merge_on_fit_end=False)
    trainer = fit(module_cls(), [lora, monitor], tmp_path, max_steps=2, logger=CSVLogger(str(tmp_path)),
                  log_every_n_steps=1)
    groups = trainer.optimizers[0].param_groups
    names = [None] * 4 if module_cls is UnnamedGroups else ["decay", "decay/lora_B", "decay/embedding", "no_decay"]
    assert [(g["loraplus"], g.get("name"), g["weight_decay"]) for g in groups] == list(zip(
        ["A", "B", "embedding", "A"], names, [0.1, 0.1, 0.1, 0.0]))
    assert list(monitor.lrs) == expected
    assert [monitor.lrs[k][-1] for k in expected] == pytest.approx([1e-2, 16e-2, 1e-4, 1e-2])


def test_param_groups_for_your_own_optimizer_get_unique_names():
    model = make_tiny_llama()
    inject_lora(model, LoRAConfig(r=2, target_modules=["q_proj", "embed_tokens"]))
    groups = loraplus_param_groups(model, lr=1e-3, ratio=8, name="adapters", weight_decay=0.0)
    assert [(g["loraplus"], g["name"], g["weight_decay"]) for g in groups] == [
        ("A", "adapters", 0.0), ("B", "adapters/lora_B", 0.0), ("embedding", "adapters/embedding", 0.0)]
