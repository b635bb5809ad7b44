"""`torch.compile` of an injected model's training (`lightning_lora.tasks.compile.TrainingCompile`, used by
`CausalLM(compile=...)`): real compiled training steps (forward, backward, AdamW) over batches of several
lengths and sizes with a bounded number of compilations, counted with dynamo's compile events.

Most tests compile with the `aot_eager` backend: dynamo traces the blocks and AOTAutograd builds and
partitions the forward and backward graphs exactly as for inductor (recompiles and graph breaks are decided
there), without inductor's C++ code generation, which takes minutes per graph on a small CPU. One
integration test runs inductor itself."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import make_tiny_llama

from lightning_lora import LoRA, LoRAConfig, inject_lora
from lightning_lora.layers import AdapterPath, LoRALayer
from lightning_lora.surgery import lora_layers
from lightning_lora.tasks import CausalLM, TaskConfigError
from lightning_lora.tasks.compile import (
    CompileEvents,
    TrainingCompile,
    repeated_blocks,
)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model(dropout: float = 0.1, layers: int = 2, seed: int = 0, b_seed: int | None = None, **lora):
    """A tiny Llama with adapters on every linear layer; with `b_seed`, B ~ N(0, 0.1) (a non-zero update)."""
    model = make_tiny_llama(seed=seed, num_hidden_layers=layers).train()
    model.config.use_cache = False
    inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=dropout, target_modules="all-linear", **lora))
    if b_seed is not None:
        for _, layer in lora_layers(model):
            torch.nn.init.normal_(layer.lora_B.weight, std=0.1, generator=torch.Generator().manual_seed(b_seed))
    return model


def _batch(b: int, length: int, padded: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed * 1000 + b * 100 + length)
    ids = torch.randint(1, 128, (b, length), generator=gen)
    mask = torch.ones_like(ids)
    if padded:
        mask[-1, length // 2:] = 0
        ids[-1, length // 2:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _step(model, opt, batch) -> float:
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def test_repeated_blocks_and_remove():
    model = _model()
    blocks = repeated_blocks(model)
    assert [type(b).__name__ for b in blocks] == ["LlamaDecoderLayer"] * 2
    keys = list(model.state_dict())
    compiled = TrainingCompile(model, backend="aot_eager")
    assert all("forward" in b.__dict__ for b in blocks) and list(model.state_dict()) == keys
    compiled.remove()
    assert not any("forward" in b.__dict__ for b in blocks)
    assert repeated_blocks(torch.nn.Linear(2, 2))[0].__class__ is torch.nn.Linear   # no blocks named: the model


def test_compiled_model_trains_over_lengths_and_sizes_with_bounded_compiles():
    """Batches of other lengths, sizes, with and without padding: one graph per variant (padded or not:
    transformers passes no mask without padding; a batch of 1: torch specializes size 1), and none once
    those were seen. Every adapter trains; no graph breaks."""
    torch.manual_seed(0)
    model = _model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    TrainingCompile(model, backend="aot_eager")
    torch._dynamo.utils.counters.clear()
    variants = [(2, 17, True), (2, 23, False), (1, 12, False), (3, 31, True)]
    others = [(2, 40, True), (4, 9, True), (1, 30, False), (5, 19, False), (3, 26, True)]
    with CompileEvents() as events:
        losses = [_step(model, opt, _batch(*v)) for v in variants]
    with CompileEvents() as later:
        losses += [_step(model, opt, _batch(*v)) for v in others]
    # one graph per variant: padded, unpadded, a batch of 1 (without the first block's input marked as needing
    # a gradient, the first block would double each: 6)
    assert (events.compiles, events.recompiles) == (3, 2)
    assert later.compiles == 0
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0
    assert all(torch.isfinite(torch.tensor(losses)))
    for name, layer in lora_layers(model):
        assert layer.lora_B.weight.abs().sum() > 0, name              # gradients reached every adapter


def test_compiled_step_equals_the_eager_step():
    """No dropout: the compiled step (functional adapter ops) computes what the eager step (FusedLoRA) computes."""
    batch = _batch(2, 13, True)
    grads = []
    for compile_it in (False, True):
        model = _model(dropout=0.0, b_seed=1)
        if compile_it:
            TrainingCompile(model, backend="aot_eager")
        loss = model(**batch).loss
        loss.backward()
        grads.append((loss.detach(), [layer.lora_A.weight.grad for _, layer in lora_layers(model)]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_adapters_take_the_functional_ops_inside_the_compiled_blocks():
    seen: list[AdapterPath] = []
    original = LoRALayer.functional_adapter

    def spy(self, x):
        seen.append(AdapterPath.FUNCTIONAL)
        return original(self, x)

    model = _model()
    TrainingCompile(model, backend="aot_eager")
    LoRALayer.functional_adapter = spy
    try:
        model(**_batch(2, 8, True)).loss.backward()
    finally:
        LoRALayer.functional_adapter = original
    assert len(seen) == 14                      # traced once per adapted layer of the two blocks


def test_checkpoint_recompute_inside_the_compiled_block_replays_the_dropout_masks():
    """transformers' (non-reentrant) activation checkpointing runs inside the compiled block: its recompute
    must draw the forward's masks, so the gradients equal those without checkpointing."""
    grads = []
    for checkpointing in (False, True):
        model = _model(dropout=0.3, b_seed=2)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        TrainingCompile(model, backend="aot_eager")
        torch.manual_seed(11)
        model(**_batch(2, 10, True)).loss.backward()
        grads.append([layer.lora_A.weight.grad for _, layer in lora_layers(model)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_kv_cache_in_a_training_forward_runs_eagerly_with_a_warning():
    """transformers makes a KV cache unless use_cache=False; every layer would compile its own graph for it."""
    model = _model()
    model.config.use_cache = True
    TrainingCompile(model, backend="aot_eager")
    with CompileEvents() as events, pytest.warns(UserWarning, match="KV cache reached the compiled layers"):
        model(**_batch(2, 8, True)).loss.backward()
    assert events.compiles == 0
    with CompileEvents() as events:
        model(**_batch(2, 8, True), use_cache=False).loss.backward()
    assert events.compiles == 1


def test_eval_no_grad_and_a_disabled_switch_stay_eager():
    model = _model()
    compiled = TrainingCompile(model, backend="aot_eager")
    batch = _batch(2, 8, True)
    with CompileEvents() as events:
        model.eval()
        model(**batch)                          # validation
        model.train()
        with torch.no_grad():
            model(**batch)                      # no_grad in train mode
        compiled.enabled = False
        model(**batch).loss.backward()          # a disabled switch (CausalLM's first batch of a fit)
    assert events.compiles == 0
    compiled.enabled = True
    with CompileEvents() as events:
        model(**batch).loss.backward()
    assert events.compiles == 1


# ---------------------------------------------------------------------- CausalLM(compile=...) in a Trainer
class _Compiles(L.Callback):
    """Compile events per training batch."""

    def __init__(self) -> None:
        self.per_batch: list[int] = []
        self._events: CompileEvents | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._events = CompileEvents().__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._events.__exit__(None, None, None)
        self.per_batch.append(self._events.compiles)


def test_causal_lm_compiles_from_the_second_batch_once(tiny_lm_dir):
    """The first batch of a fit runs eagerly (the LoRA callback's probes hook every adapter for it), the
    second compiles, and the batches after it (other lengths) compile nothing more than their variant."""
    from lightning_lora.data import InstructionDataModule

    module = CausalLM(tiny_lm_dir, compile="aot_eager", learning_rate=1e-3, num_generate_examples=0)
    data = InstructionDataModule(tokenizer=tiny_lm_dir, batch_size=4, max_length=64, system_prompt="Answer briefly.")
    compiles = _Compiles()
    trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=1, callbacks=[LoRA(r=4, target_modules="all-linear", dropout=0.1,
                                                             merge_on_fit_end=False), compiles])
    trainer.fit(module, datamodule=data)
    # padded batches of 4 from the second on: one graph for every layer, compiled once (CausalLM passes
    # use_cache=False: with transformers' default KV cache each layer would compile its own graph)
    assert compiles.per_batch == [0, 1, 0, 0, 0, 0]
    assert module.training_compile is not None and torch.isfinite(trainer.callback_metrics["train_loss"])


def test_causal_lm_refuses_an_unknown_backend(tiny_lm_dir):
    with pytest.raises(TaskConfigError, match="compile='inductr' is not a torch.compile backend"):
        CausalLM(tiny_lm_dir, compile="inductr")


# ---------------------------------------------------------------------- inductor itself
@pytest.mark.integration
def test_inductor_compiled_training_reuses_its_graph_for_other_lengths():
    """The real thing (inductor's generated code; a minute or more on a small CPU): one graph for the
    padded batches of every length, and training moves every adapter."""
    torch.manual_seed(0)
    model = _model(layers=1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    TrainingCompile(model)
    with CompileEvents() as events:
        losses = [_step(model, opt, _batch(2, n, True)) for n in (17, 29, 11)]
    assert events.compiles == 1 and all(torch.isfinite(torch.tensor(losses)))
    for name, layer in lora_layers(model):
        assert layer.lora_B.weight.abs().sum() > 0, name


# ------------------------------------------------------------------ graph breaks never change the numbers
def _lora_grads(model) -> list[torch.Tensor]:
    return [layer.lora_A.weight.grad.clone() for _, layer in lora_layers(model)]


def _break_in_mlp(model) -> None:
    """A forward hook on every decoder layer's MLP that dynamo cannot trace: a graph break inside the block
    (and inside its checkpointed region), without touching any class."""
    for block in repeated_blocks(model):
        block.mlp.register_forward_hook(lambda module, args, out: torch._dynamo.graph_break())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_graph_break_inside_a_block_runs_it_eagerly_with_the_same_numbers(checkpointing):
    """A block dynamo cannot compile whole runs eagerly (one warning naming the reason): with checkpointing, a
    break would leave the recompute outside the compiled call and draw other dropout masks."""
    grads = []
    for compile_it in (False, True):
        model = _model(dropout=0.3, b_seed=2)
        _break_in_mlp(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        compiled = TrainingCompile(model, backend="aot_eager") if compile_it else None
        torch.manual_seed(11)
        if compile_it:
            with pytest.warns(UserWarning, match=r"LlamaDecoderLayer cannot be compiled as one graph .*runs "
                                                 r"eagerly") as record, CompileEvents() as events:
                model(**_batch(2, 10, True)).loss.backward()
            assert len([w for w in record if "cannot be compiled" in str(w.message)]) == 1
            assert list(compiled.eager) == ["LlamaDecoderLayer"] and "graph_break" in compiled.eager[
                "LlamaDecoderLayer"]
            assert events.compiles == 1               # the one refused trace; nothing after it
        else:
            model(**_batch(2, 10, True)).loss.backward()
        grads.append(_lora_grads(model))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class _CheckpointedBlock(torch.nn.Module):
    """A block that checkpoints inside its own forward (as transformers >= 5.25's layers do), with a LoRA
    target and an optional graph break inside the checkpointed region."""

    def __init__(self, graph_break: bool, checkpoint: bool = True) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)
        self.graph_break = graph_break
        self.checkpoint = checkpoint

    def _inner(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.proj(x))
        if self.graph_break:
            torch._dynamo.graph_break()
        return h + x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.checkpoint:
            return self._inner(x)
        return torch.utils.checkpoint.checkpoint(self._inner, x, use_reentrant=False)


class _Stack(torch.nn.Module):
    _no_split_modules = ["_CheckpointedBlock"]

    def __init__(self, graph_break: bool, checkpoint: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(_CheckpointedBlock(graph_break, checkpoint) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize("graph_break", [False, True])
def test_a_checkpoint_inside_the_compiled_block_replays_the_masks_or_runs_eagerly(graph_break):
    """The kind behind transformers 5.25's failure, on a model of our own: a checkpoint inside the compiled
    block, with and without a graph break in it. Whole: compiled, the recompute replays the forward's masks (the
    gradients equal those of the compiled block without checkpointing); broken: eager, the same numbers as
    eager."""
    x = torch.randn(4, 7, 16, generator=torch.Generator().manual_seed(3))
    grads = []
    # reference: the whole block compiled without checkpointing, or the broken block run eagerly
    for reference in (True, False):
        model = _Stack(graph_break, checkpoint=not (reference and not graph_break)).train()
        inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.5, target_modules=["proj"]))
        for _, layer in lora_layers(model):
            torch.nn.init.normal_(layer.lora_B.weight, std=0.1, generator=torch.Generator().manual_seed(2))
        compile_it = not (reference and graph_break)
        compiled = TrainingCompile(model, backend="aot_eager") if compile_it else None
        torch.manual_seed(5)
        with CompileEvents() as events:
            if compile_it and graph_break:
                with pytest.warns(UserWarning, match="_CheckpointedBlock cannot be compiled as one graph"):
                    model(x).pow(2).sum().backward()
            else:
                model(x).pow(2).sum().backward()
        if compile_it:
            assert list(compiled.eager) == (["_CheckpointedBlock"] if graph_break else [])
            assert events.compiles == 1
        grads.append(_lora_grads(model))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
