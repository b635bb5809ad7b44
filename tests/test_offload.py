"""`lightning_lora.offload.OffloadActivations`: which saved tensors move, and identical gradients (on CPU the
hooks copy to other host tensors and back: the mechanism runs, the numbers must not change)."""

from __future__ import annotations

import torch
from conftest import make_tiny_llama, randomize_lora_B

from lightning_lora import LoRAConfig, inject_lora
from lightning_lora.loss import causal_lm_loss
from lightning_lora.offload import OffloadActivations
from lightning_lora.surgery import lora_layers
from lightning_lora.tasks import CausalLM


def _grads(offload: bool, checkpointing: bool = False):
    model = make_tiny_llama(seed=0).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.2, target_modules="all-linear"))
    randomize_lora_B(model, std=0.1)
    ids = torch.randint(1, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(3)
    hooks = OffloadActivations(min_bytes=0)
    if offload:
        with hooks:
            total, n = causal_lm_loss(model, ids, ids)
    else:
        total, n = causal_lm_loss(model, ids, ids)
    (total / n).backward()
    return total.detach(), [layer.lora_A.weight.grad for _, layer in lora_layers(model)], hooks


def test_gradients_are_identical_with_and_without_offloading():
    for checkpointing in (False, True):
        plain, plain_grads, _ = _grads(False, checkpointing)
        moved, moved_grads, hooks = _grads(True, checkpointing)
        assert hooks.offloaded > (5 if checkpointing else 50) and hooks.offloaded_bytes > 0
        assert torch.equal(plain, moved)
        for a, b in zip(plain_grads, moved_grads):
            assert torch.equal(a, b)


def test_parameters_and_small_tensors_stay():
    lin = torch.nn.Linear(256, 256)
    x = torch.randn(4, 256, requires_grad=True)          # 4 KiB
    big = torch.randn(2048, 256, requires_grad=True)     # 2 MiB
    with OffloadActivations() as hooks:                  # min 1 MiB
        lin(x).sum()
    assert hooks.offloaded == 0                           # x is small, the weight a Parameter
    with OffloadActivations() as hooks:
        lin(big).sum().backward()
    assert hooks.offloaded == 1 and hooks.offloaded_bytes == big.numel() * 4
    torch.testing.assert_close(big.grad, lin.weight.sum(0).expand_as(big))


def test_causal_lm_trains_the_same_with_offloading(tiny_lm_dir, tmp_path, monkeypatch):
    import lightning as L
    from test_tasks import _examples, _pad, _StepGrads

    import lightning_lora.offload as offload_module
    from lightning_lora import LoRA

    monkeypatch.setattr(offload_module, "MIN_OFFLOAD_BYTES", 0)      # the tiny model's activations are small
    runs = []
    for offload in (False, True):
        torch.manual_seed(0)
        module = CausalLM(tiny_lm_dir, offload_activations=offload, num_generate_examples=0)
        grads = _StepGrads()
        trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=tmp_path,
                            callbacks=[LoRA(r=4, dropout=0.1, target_modules="all-linear"), grads])
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([_pad(_examples())], batch_size=None))
        runs.append(grads.grads[0])
        assert (module.activation_offload is not None and module.activation_offload.offloaded > 50) is offload
    assert sorted(runs[0]) == sorted(runs[1]) and len(runs[0]) > 10
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name
