"""The LoRA callback in real Trainer runs on CPU (issue 3)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import (
    EMAWeightAveraging,
    ModelCheckpoint,
    StochasticWeightAveraging,
    WeightAveraging,
)
from lightning.pytorch.loggers import TensorBoardLogger
from lit_models import BuiltInConfigureModel, EvalData, MixinTinyLlama, PlainTinyLlama, TinyLlamaModule, fit, token_data
from torch.optim.swa_utils import get_ema_avg_fn, get_swa_avg_fn

from lightning_lora import LoRA, LoRAConfig, LoRAError, lora_state_dict
from lightning_lora.checkpoint import CHECKPOINT_KEY, read_checkpoint
from lightning_lora.layers import LoRALayer
from lightning_lora.surgery import lora_layers, restrict_optimizer

TESTS = Path(__file__).parent
ROOT = TESTS.parent


def adapters(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lora_state_dict(module).items()}


def base_weights(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if ".lora_" not in k}


# ---------------------------------------------------------------------------------------- optimizer
def test_optimizer_holds_exactly_the_adapters_and_base_is_untouched(tmp_path):
    module = TinyLlamaModule()
    before = base_weights(module)
    cb = LoRA(r=4, merge_on_fit_end=False)
    trainer = fit(module, [cb], tmp_path, max_steps=3)
    held = [p for g in trainer.optimizers[0].param_groups for p in g["params"]]
    expected = [p for n, p in module.named_parameters() if ".lora_" in n]
    assert len(expected) == 8  # 2 layers x (q, v) x (A, B)
    assert {id(p) for p in held} == {id(p) for p in expected} and len(held) == len(expected)
    after = base_weights(module)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(layer.lora_B.weight.abs().sum() > 0 for _, layer in lora_layers(module))
    assert cb.adapted_modules == [f"model.model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]


class ManyOptimizers(TinyLlamaModule):
    """Two param groups in one optimizer, plus a second optimizer over the base only (manual opt)."""

    def configure_optimizers(self):
        decay = [p for n, p in self.named_parameters() if n.endswith("weight")]
        no_decay = [p for n, p in self.named_parameters() if not n.endswith("weight")]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        return [opt], [sched]


def test_param_groups_and_scheduler_lists_are_restricted(tmp_path):
    module = ManyOptimizers(scheduler=True)
    trainer = fit(module, [LoRA(r=4, merge_on_fit_end=False)], tmp_path, max_steps=2)
    groups = trainer.optimizers[0].param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert len(groups[0]["params"]) == 8 and groups[1]["params"] == []
    assert trainer.lr_scheduler_configs[0].scheduler.optimizer is trainer.optimizers[0]


def test_optimizer_without_adapters_is_an_error():
    base_only = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(base_only.parameters(), lr=0.1)
    with pytest.raises(LoRAError, match="SGD holds none of the LoRA parameters"):
        restrict_optimizer(opt, [torch.nn.Parameter(torch.zeros(1))])


# ---------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_holds_only_adapters_and_config(tmp_path):
    module = TinyLlamaModule()
    trainer = fit(module, [LoRA(r=4, merge_on_fit_end=False)], tmp_path, max_steps=2)
    path = tmp_path / "a.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert sorted(ckpt["state_dict"]) == sorted(lora_state_dict(module))
    assert all(".lora_A.weight" in k or ".lora_B.weight" in k for k in ckpt["state_dict"])
    meta = ckpt[CHECKPOINT_KEY]
    assert meta["config"]["r"] == 4 and meta["config"]["target_modules"] == ["q_proj", "v_proj"]
    assert meta["model_prefix"] == "model" and meta["version"] == 1
    assert len(ckpt["optimizer_states"][0]["state"]) == 8


def test_smollm2_checkpoint_is_under_8_mb(tmp_path, smollm2):
    class Smol(TinyLlamaModule):
        def __init__(self):
            L.LightningModule.__init__(self)
            self.save_hyperparameters({"lr": 1e-3, "sleep": 0.0, "scheduler": False})
            self.model = smollm2

    module = Smol()
    trainer = L.Trainer(max_steps=1, callbacks=[LoRA(r=8, merge_on_fit_end=False)], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir=str(tmp_path))
    trainer.fit(module, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randint(0, 1000, (1, 8))),
                                                    batch_size=1))
    path = tmp_path / "smol.ckpt"
    trainer.save_checkpoint(path)
    size = path.stat().st_size
    adapter_bytes = 460_800 * 4
    assert size < 8 * 1024 * 1024, size
    assert size > 3 * adapter_bytes  # adapters + two AdamW moments are really in there
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert sum(v.numel() for v in ckpt["state_dict"].values()) == 460_800


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    # uninterrupted: 2 epochs of 4 steps
    full = TinyLlamaModule(scheduler=True)
    fit(full, [LoRA(r=4, merge_on_fit_end=False)], tmp_path / "full", max_steps=-1, max_epochs=2)
    # interrupted after epoch 1, resumed from its checkpoint into a fresh module
    first = TinyLlamaModule(scheduler=True)
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(first, [LoRA(r=4, merge_on_fit_end=False), ckpt_cb], tmp_path / "a", max_steps=-1, max_epochs=1,
        enable_checkpointing=True)
    last = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)
    resumed = TinyLlamaModule(scheduler=True)
    trainer = fit(resumed, [LoRA(r=4, merge_on_fit_end=False)], tmp_path / "b", max_steps=-1, max_epochs=2,
                  ckpt_path=str(last))
    assert trainer.global_step == 8
    a, b = adapters(full), adapters(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # scheduler and optimizer state really came from the checkpoint
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 2  # an epoch-interval StepLR
    assert saved["lr_schedulers"][0]["last_epoch"] == 1
    assert trainer.optimizers[0].state_dict()["state"][0]["step"].item() == 8


def test_resume_with_other_config_shows_both(tmp_path):
    module = TinyLlamaModule()
    trainer = fit(module, [LoRA(r=4, merge_on_fit_end=False)], tmp_path, max_steps=1)
    trainer.save_checkpoint(tmp_path / "r4.ckpt")
    with pytest.raises(LoRAError) as err:
        fit(TinyLlamaModule(), [LoRA(r=8, target_modules=["q_proj"])], tmp_path, max_steps=2,
            ckpt_path=str(tmp_path / "r4.ckpt"))
    msg = str(err.value)
    assert "r: 8 != 4" in msg and "target_modules: ['q_proj'] != ['q_proj', 'v_proj']" in msg
    assert "this run:   {'r': 8" in msg and "the checkpoint: {'r': 4" in msg


def test_resume_with_a_missing_adapter_key_is_an_error(tmp_path):
    module = TinyLlamaModule()
    trainer = fit(module, [LoRA(r=4, merge_on_fit_end=False)], tmp_path, max_steps=1)
    path = tmp_path / "a.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    del ckpt["state_dict"]["model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    torch.save(ckpt, path)
    with pytest.raises(LoRAError, match=r"missing adapter keys \(1\): model.model.layers.1.self_attn.v_proj.lora_B.weight"):
        fit(TinyLlamaModule(), [LoRA(r=4)], tmp_path, max_steps=2, ckpt_path=str(path))


def test_configure_model_built_network_is_injected_and_resumes(tmp_path):
    module = BuiltInConfigureModel()
    assert module.model is None
    cb = LoRA(r=4, merge_on_fit_end=False)
    trainer = fit(module, [cb], tmp_path, max_steps=2)
    assert len(cb.adapted_modules) == 4
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    trained = adapters(module)
    resumed = BuiltInConfigureModel()
    trainer = fit(resumed, [LoRA(r=4, merge_on_fit_end=False)], tmp_path, max_steps=2,
                  ckpt_path=str(tmp_path / "c.ckpt"))
    assert trainer.global_step == 2  # nothing left to do: the restored state is exactly the saved one
    got = adapters(resumed)
    assert all(torch.equal(trained[k], got[k]) for k in trained)


# ---------------------------------------------------------------------------------------- precision
@pytest.mark.parametrize("checkpointing", [None, "reentrant", "non_reentrant"])
def test_bf16_true_keeps_fp32_adapters_and_learns(tmp_path, checkpointing):
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(outputs["loss"].item())

    module = TinyLlamaModule(lr=2e-2, gradient_checkpointing=checkpointing)
    fit(module, [LoRA(r=8, alpha=16, merge_on_fit_end=False), Record()], tmp_path, max_steps=20,
        precision="bf16-true")
    for name, p in module.named_parameters():
        assert p.dtype == (torch.float32 if ".lora_" in name else torch.bfloat16), name
    assert len(losses) == 20 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05


def test_bf16_mixed_trains(tmp_path):
    module = TinyLlamaModule()
    fit(module, [LoRA(r=4, merge_on_fit_end=False)], tmp_path, max_steps=2, precision="bf16-mixed")
    assert all(p.dtype == torch.float32 for p in module.parameters())
    assert all(layer.lora_B.weight.abs().sum() > 0 for _, layer in lora_layers(module))


# ---------------------------------------------------------------------------------------- merge
def test_merge_at_fit_end_and_merged_dir(tmp_path):
    from transformers import AutoModelForCausalLM

    module = TinyLlamaModule()
    x = torch.randint(0, 128, (2, 10))
    seen: dict[str, torch.Tensor] = {}

    class Capture(L.Callback):  # runs before LoRA's on_fit_end (callbacks run in order)
        def on_fit_end(self, trainer, pl_module):
            pl_module.eval()
            with torch.no_grad():
                seen["unmerged"] = pl_module(x)

    cb = LoRA(r=4, merged_dir=str(tmp_path / "merged"))
    fit(module, [Capture(), cb], tmp_path, max_steps=3)
    assert not any(isinstance(m, LoRALayer) for m in module.modules())
    assert not any("lora_" in k for k in module.state_dict())
    assert type(module.model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    with torch.no_grad():
        merged = module(x)
    assert torch.allclose(merged, seen["unmerged"], atol=1e-5)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(x).logits, merged, atol=1e-5)
    assert not [p for p in (tmp_path).iterdir() if p.name.startswith(".merged")]  # no temp dir left


# ---------------------------------------------------------------------------------------- monitoring
def test_tensorboard_has_lora_scalars_and_loss(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    fit(TinyLlamaModule(), [LoRA(r=4, log_every_n_steps=2, merge_on_fit_end=False)], tmp_path, max_steps=6,
        logger=logger, log_every_n_steps=1)
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"lora/trainable_params", "lora/total_params", "lora/trainable_percent", "lora/grad_norm",
            "lora/delta_ratio", "train_loss"} <= tags
    assert acc.Scalars("lora/trainable_params")[0].value == 1792.0
    assert [e.step for e in acc.Scalars("lora/grad_norm")] == [0, 2, 4]
    ratios = [e.value for e in acc.Scalars("lora/delta_ratio")]
    assert ratios[0] == 0.0 and ratios[-1] > 0.0  # B starts at zero, then grows
    assert all(e.value > 0 for e in acc.Scalars("lora/grad_norm"))


def test_fit_start_prints_the_parameter_table(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO):
        fit(TinyLlamaModule(), [LoRA(r=4, merge_on_fit_end=False)], tmp_path, max_steps=1)
    text = caplog.text
    assert "LoRA: 4 modules adapted" in text
    assert "trainable 1,792 of 92,224 parameters" in text


# ---------------------------------------------------------------------------------------- bad input
def test_target_matching_nothing_fails_at_setup_before_training(tmp_path):
    steps: list[int] = []

    class Count(L.Callback):
        def on_train_batch_start(self, *args):
            steps.append(1)

    with pytest.raises(LoRAError, match=r"target_modules=\['qproj'\] matched no module; Linear modules in this "
                                        r"model end with: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
                                        r"down_proj, lm_head"):
        fit(TinyLlamaModule(), [LoRA(target_modules=["qproj"]), Count()], tmp_path, max_steps=2)
    assert steps == []


def test_target_matching_nothing_in_configure_model_fails_before_training(tmp_path):
    with pytest.raises(LoRAError, match="matched no module"):
        fit(BuiltInConfigureModel(), [LoRA(target_modules=["nope"])], tmp_path, max_steps=1)


def test_callback_arguments_are_validated():
    with pytest.raises(ValueError, match=r"r=0 is invalid; expected an integer > 0"):
        LoRA(r=0)
    with pytest.raises(ValueError, match="merged_dir is set but merge_on_fit_end=False"):
        LoRA(merged_dir="x", merge_on_fit_end=False)
    with pytest.raises(ValueError, match="log_every_n_steps=0 is invalid"):
        LoRA(log_every_n_steps=0)


# ---------------------------------------------------------------------------------------- processes
def _script(tmp_path: Path, code: str) -> str:
    """Write `code` to a file: the DDP launcher re-runs `sys.argv`, so `python -c` cannot be used."""
    path = tmp_path / "train_script.py"
    path.write_text(code)
    return str(path)


def _run_script(tmp_path: Path, code: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=f"{TESTS}{os.pathsep}{ROOT}")
    return subprocess.run([sys.executable, _script(tmp_path, code), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


TRAIN_SCRIPT = textwrap.dedent("""
    import sys, torch, lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning_lora import LoRA
    from lit_models import TinyLlamaModule, TokenData
    out, max_steps, sleep, strategy, devices = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], int(sys.argv[5])
    ckpt = sys.argv[6] if len(sys.argv) > 6 else None
    torch.manual_seed(0)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=devices, strategy=strategy, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
                        callbacks=[LoRA(r=4, merge_on_fit_end=False),
                                   ModelCheckpoint(dirpath=out, every_n_train_steps=1, save_last=True, save_top_k=-1)])
    module = TinyLlamaModule(sleep=sleep)
    trainer.fit(module, datamodule=TokenData(n=64), ckpt_path=ckpt)
    import json, hashlib
    from lightning_lora import lora_state_dict
    sd = lora_state_dict(module)
    digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in sd.values())).hexdigest()
    with open(f"{out}/result-rank{trainer.global_rank}.json", "w") as f:
        json.dump({"step": trainer.global_step, "sha256": digest}, f)
    if trainer.is_global_zero:
        print("RESULT", trainer.global_step)
    if torch.distributed.is_initialized():  # stop gloo's threads before the interpreter exits (else: std::terminate)
        torch.distributed.destroy_process_group()
""")


def test_sigkill_mid_training_resumes_from_last_checkpoint(tmp_path):
    env = dict(os.environ, PYTHONPATH=f"{TESTS}{os.pathsep}{ROOT}")
    proc = subprocess.Popen([sys.executable, _script(tmp_path, TRAIN_SCRIPT), str(tmp_path), "1000", "0.5", "auto", "1"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    last = tmp_path / "last.ckpt"
    deadline = time.time() + 180
    try:
        while time.time() < deadline:
            if last.exists() and len(list(tmp_path.glob("epoch=*-step=*.ckpt"))) >= 3:
                break
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.2)
        else:
            pytest.fail("the training subprocess wrote no checkpoint in time")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    step = ckpt["global_step"]
    assert step >= 3 and CHECKPOINT_KEY in ckpt
    module = TinyLlamaModule()
    trainer = fit(module, [LoRA(r=4, merge_on_fit_end=False)], tmp_path / "resume", max_steps=step + 2,
                  ckpt_path=str(last))
    assert trainer.global_step == step + 2


def test_ddp_two_cpu_processes_fit_checkpoint_once_and_resume(tmp_path):
    res = _run_script(tmp_path, TRAIN_SCRIPT, str(tmp_path / "a"), "3", "0", "ddp", "2")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("RESULT") == 1  # only rank 0 reports
    files = sorted(p.name for p in (tmp_path / "a").iterdir() if p.suffix == ".ckpt")
    assert files == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt", "epoch=0-step=3.ckpt", "last.ckpt"]
    ckpt = torch.load(tmp_path / "a" / "last.ckpt", map_location="cpu", weights_only=True)
    assert all(".lora_" in k for k in ckpt["state_dict"]) and ckpt["global_step"] == 3
    res = _run_script(tmp_path, TRAIN_SCRIPT, str(tmp_path / "b"), "5", "0", "ddp", "2", str(tmp_path / "a" / "last.ckpt"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert json.loads((tmp_path / "b" / "result-rank0.json").read_text())["step"] == 5


def test_ddp_ranks_hold_identical_adapters(tmp_path):
    res = _run_script(tmp_path, TRAIN_SCRIPT, str(tmp_path), "3", "0", "ddp", "2")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"result-rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["step"] == ranks[1]["step"] == 3
    assert ranks[0]["sha256"] == ranks[1]["sha256"]


# ---------------------------------------------------------------------------------------- weights-only checkpoints
# (issue 20, item 3: Lightning writes them without calling callbacks' on_save_checkpoint)
def quiet_trainer(callbacks=()) -> L.Trainer:
    return L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                     devices=1, callbacks=list(callbacks))


def eval_loss(module, ckpt_path=None, callbacks=()) -> float:
    return quiet_trainer(callbacks).validate(module, datamodule=EvalData(), ckpt_path=ckpt_path,
                                             verbose=False)[0]["val_loss"]


@pytest.mark.parametrize("how", ["ModelCheckpoint(save_weights_only=True)", "trainer.save_checkpoint(weights_only=True)"])
def test_weights_only_checkpoints_are_adapter_only_and_every_loader_reads_them(tmp_path, capsys, how):
    from conftest import make_tiny_llama

    from lightning_lora.cli import main

    module = PlainTinyLlama()
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpts", save_weights_only=True)
    trainer = fit(module, [LoRA(r=4, merge_on_fit_end=False), saver], tmp_path, max_steps=4,
                  enable_checkpointing=True)
    path = Path(saver.best_model_path)
    if how.startswith("trainer"):
        path = tmp_path / "weights.ckpt"
        trainer.save_checkpoint(path, weights_only=True)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    trained = adapters(module)
    assert len(trained) == 8 and sorted(ckpt["state_dict"]) == sorted(trained)
    assert all(torch.equal(ckpt["state_dict"][k], trained[k]) for k in trained)
    assert ckpt[CHECKPOINT_KEY]["config"] == LoRAConfig(r=4).to_dict() and "optimizer_states" not in ckpt
    # every loader: validate with ckpt_path (a fresh module), load_from_checkpoint, read_checkpoint, export, merge
    assert eval_loss(PlainTinyLlama(), path, [LoRA(r=4)]) == eval_loss(module)
    loaded = MixinTinyLlama.load_from_checkpoint(path)
    assert all(torch.equal(v, trained[k]) for k, v in lora_state_dict(loaded).items())
    assert read_checkpoint(path).config == LoRAConfig(r=4) and len(read_checkpoint(path).state_dict) == 8
    assert main(["export", str(path), str(tmp_path / "peft")]) == 0
    make_tiny_llama(seed=0, vocab_size=256).save_pretrained(tmp_path / "base")
    assert main(["merge", "--base", str(tmp_path / "base"), "--adapter", str(path), "--out",
                 str(tmp_path / "merged")]) == 0, capsys.readouterr().err


# ---------------------------------------------------------------------------------------- averaging callbacks
# (issue 20, item 4: callbacks that copy or average the module)
AVERAGING = {
    "EMAWeightAveraging": lambda: EMAWeightAveraging(decay=0.5),
    "WeightAveraging": lambda: WeightAveraging(),  # the equal average (SWA) after every step
    "StochasticWeightAveraging": lambda: StochasticWeightAveraging(swa_lrs=1e-2, swa_epoch_start=1),
}


class History(L.Callback):
    """The adapters at every epoch start and after every optimizer step."""

    def __init__(self) -> None:
        self.epoch_starts: list[dict[str, torch.Tensor]] = []
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.epoch_starts.append(adapters(pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(adapters(pl_module))


def expected_average(kind: str, history: History) -> dict[str, torch.Tensor]:
    """What the averaging callback computes from the adapters it sees (SWA: at epoch starts; the others:
    after every step), with torch's own averaging functions."""
    values = history.epoch_starts if kind == "StochasticWeightAveraging" else history.steps
    fn = get_ema_avg_fn(0.5) if kind == "EMAWeightAveraging" else get_swa_avg_fn()
    average = dict(values[0])
    for n, value in enumerate(values[1:], start=1):
        average = {k: fn(average[k], value[k], torch.tensor(n)) for k in average}
    return average


def averaged_fit(tmp_path, kind: str, lora_first: bool = True, module_cls=PlainTinyLlama, **kwargs):
    """Fit with `LoRA` and an averaging callback (a plain LightningModule: only the callback makes the
    checkpoints adapter-only); returns the module, trainer, adapter history and last checkpoint."""
    lora, averaging, history = LoRA(r=4, merge_on_fit_end=False), AVERAGING[kind](), History()
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpts", save_last=True)
    module = module_cls()
    callbacks = [lora, averaging] if lora_first else [averaging, lora]
    kwargs = {"max_steps": -1, "max_epochs": 2, **kwargs}
    trainer = fit(module, [*callbacks, history, saver], tmp_path, enable_checkpointing=True, **kwargs)
    return module, trainer, history, torch.load(saver.last_model_path, map_location="cpu", weights_only=True)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a), max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("lora_first", [True, False], ids=["LoRA-first", "LoRA-last"])
@pytest.mark.parametrize("kind", list(AVERAGING))
def test_averaging_callbacks_average_the_adapters_in_adapter_only_checkpoints(tmp_path, kind, lora_first):
    module, trainer, history, ckpt = averaged_fit(tmp_path, kind, lora_first)
    assert trainer.global_step == 8
    average = expected_average(kind, history)
    if kind == "StochasticWeightAveraging":  # the callback's state holds the average, state_dict the model
        [state] = [s for s in ckpt["callbacks"].values() if "average_model_state" in s]
        assert_same(state["average_model_state"], average)
        assert_same(ckpt["state_dict"], history.steps[-1])
    else:  # state_dict holds the average, current_model_state the model
        assert_same(ckpt["state_dict"], average)
        assert_same(ckpt["current_model_state"], history.steps[-1])
    assert ckpt[CHECKPOINT_KEY]["config"] == LoRAConfig(r=4).to_dict()
    assert_same(adapters(module), average)  # at train end the callback puts the average into the model
    assert_same(base_weights(module), base_weights(PlainTinyLlama()))


@pytest.mark.parametrize("module_cls", [PlainTinyLlama, MixinTinyLlama], ids=["plain", "mixin"])
@pytest.mark.parametrize("kind", list(AVERAGING))
def test_resume_with_an_averaging_callback_equals_an_uninterrupted_run(tmp_path, kind, module_cls):
    full, _, _, full_ckpt = averaged_fit(tmp_path / "full", kind, module_cls=module_cls)
    averaged_fit(tmp_path / "first", kind, module_cls=module_cls, max_steps=4)  # stops after epoch 0 (4 steps)
    resumed, trainer, _, ckpt = averaged_fit(tmp_path / "resumed", kind, module_cls=module_cls,
                                             ckpt_path=str(tmp_path / "first" / "ckpts" / "last.ckpt"))
    assert trainer.global_step == 8
    assert_same(adapters(resumed), adapters(full))
    assert_same(ckpt["state_dict"], full_ckpt["state_dict"])


@pytest.mark.parametrize("lora_first", [True, False], ids=["LoRA-first", "LoRA-last"])
def test_averaging_callback_with_a_network_built_in_configure_model(tmp_path, lora_first):
    # WeightAveraging calls configure_model itself in its setup, before or after LoRA's
    module, trainer, history, ckpt = averaged_fit(tmp_path, "EMAWeightAveraging", lora_first,
                                                  module_cls=BuiltInConfigureModel)
    assert trainer.global_step == 8 and len(history.steps) == 8
    average = expected_average("EMAWeightAveraging", history)
    assert_same(ckpt["state_dict"], average)
    assert_same(adapters(module), average)


@pytest.mark.parametrize("kind", sorted(AVERAGING))
def test_averaging_a_4bit_base_is_one_clear_error_at_fit_start(kind, tmp_path):
    """torch's AveragedModel averages every parameter, the frozen NF4 weights too, which support no arithmetic:
    without the check the first update crashed inside torchao ('NF4Tensor dispatch: ... aten.mul.Tensor')."""
    pytest.importorskip("torchao")
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[LoRA(r=4, target_modules=["q_proj", "v_proj"], quantize_base="nf4",
                                        merge_on_fit_end=False), AVERAGING[kind]()])
    with pytest.raises(LoRAError, match=rf"^{kind} cannot average a model with a 4-bit base: .* Remove {kind} from "
                                        r"the Trainer's callbacks, or train without a 4-bit base \(quantize_base=None\)"):
        trainer.fit(PlainTinyLlama(), torch.utils.data.DataLoader(token_data(8, 12), batch_size=4))
    assert trainer.global_step == 0
