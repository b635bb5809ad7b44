"""`lightning_lora.data.packing` and `InstructionDataModule(packing=True)`: rows, the padding-free convention,
and the numbers: a packed batch's loss is the token-weighted loss of its examples run alone, and no token
attends across examples."""

from __future__ import annotations

import random

import lightning as L
import pytest
import torch
from conftest import make_tiny_llama, run_ddp_script

from lightning_lora import LoRA
from lightning_lora.data import InstructionDataModule
from lightning_lora.data.packing import PackedCollator, pack_examples, packing_fill
from lightning_lora.errors import DataFormatError
from lightning_lora.loss import causal_lm_loss
from lightning_lora.tasks import CausalLM


def _examples(n: int, seed: int = 0, vocab: int = 128, lengths=(3, 40)) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(*lengths)
        ids = [rng.randrange(1, vocab) for _ in range(length)]
        prompt = rng.randint(1, length - 1)
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def test_rows_hold_every_example_once_within_max_length():
    items = _examples(200, lengths=(2, 60))
    rows = pack_examples(items, max_length=64)
    assert all(len(r["input_ids"]) <= 64 for r in rows)
    # every example is one segment of one row, its tokens unchanged, its first label -100, positions 0..n-1
    segments = []
    for r in rows:
        starts = [i for i, p in enumerate(r["position_ids"]) if p == 0] + [len(r["input_ids"])]
        for a, b in zip(starts, starts[1:]):
            segments.append((tuple(r["input_ids"][a:b]), tuple(r["labels"][a:b])))
            assert r["position_ids"][a:b] == list(range(b - a))
    expected = sorted((tuple(x["input_ids"]), tuple([-100] + x["labels"][1:])) for x in items)
    assert sorted(segments) == expected
    assert packing_fill(rows, 64) >= 0.9                                  # the acceptance: fill >= 0.9
    assert pack_examples(items, max_length=64) == rows                     # deterministic
    with pytest.raises(DataFormatError, match="an example of 70 tokens is longer than max_length=64"):
        pack_examples([{"input_ids": [1] * 70, "labels": [1] * 70}], max_length=64)


def test_collator_pads_the_tail_as_a_segment_of_its_own():
    batch = PackedCollator(pad_token_id=9)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "position_ids": [0, 1, 0]},
                                            {"input_ids": [8], "labels": [-100], "position_ids": [0]}])
    assert sorted(batch) == ["input_ids", "labels", "position_ids"]            # no attention_mask
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 9]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 0], [0, 0, 1]]


def _alone_and_packed(model, items, max_length):
    rows = pack_examples(items, max_length)
    batch = PackedCollator(0)(rows)
    packed_sum, packed_n = causal_lm_loss(model, batch["input_ids"], batch["labels"],
                                          position_ids=batch["position_ids"])
    sums = [causal_lm_loss(model, torch.tensor([x["input_ids"]]), torch.tensor([x["labels"]])) for x in items]
    return (packed_sum, packed_n), (sum(s for s, _ in sums), sum(n for _, n in sums)), batch


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_is_the_token_weighted_loss_of_the_examples_alone(attn):
    model = make_tiny_llama(attn_implementation=attn)
    items = _examples(12, lengths=(3, 30))
    with torch.no_grad():
        (packed, n_packed), (alone, n_alone), batch = _alone_and_packed(model, items, max_length=64)
    assert batch["input_ids"].shape[0] < len(items)                             # several examples per row
    assert int(n_packed) == int(n_alone) == sum(sum(1 for t in x["labels"][1:] if t != -100) for x in items)
    torch.testing.assert_close(packed / n_packed, alone / n_alone, rtol=1e-5, atol=1e-5)


def test_no_token_attends_across_examples():
    """Changing one example of a row changes no logit of the other examples in it (transformers reads packed
    rows from position_ids only without a KV cache: use_cache=False, as CausalLM passes)."""
    model = make_tiny_llama()
    items = _examples(2, lengths=(10, 12))
    batch = PackedCollator(0)(pack_examples(items, max_length=32))
    assert batch["input_ids"].shape[0] == 1
    first = int((batch["position_ids"][0, 1:] == 0).nonzero()[0]) + 1          # start of the second example
    changed = batch["input_ids"].clone()
    changed[0, :first] = (changed[0, :first] + 7) % 127 + 1
    with torch.no_grad():
        a = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        b = model(input_ids=changed, position_ids=batch["position_ids"], use_cache=False).logits
    torch.testing.assert_close(a[0, first:], b[0, first:], rtol=0, atol=1e-6)
    assert (a[0, :first] - b[0, :first]).abs().max() > 1e-2


def test_data_module_packs_train_and_val_with_the_same_val_loss(tiny_lm_dir):
    """The bundled data packed into rows of 256: fewer, fuller batches; CausalLM's validation loss (token-weighted)
    is the same number packed or padded."""
    losses, shapes = {}, {}
    module = CausalLM(tiny_lm_dir)
    module.configure_model()
    for packing in (False, True):
        dm = InstructionDataModule(tokenizer=tiny_lm_dir, batch_size=4, packing=packing)
        dm.setup("fit")
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in dm.val_dataloader():
                s, n = module.loss_sum(batch)
                total, count = total + float(s), count + int(n)
        losses[packing] = total / count
        train = list(dm.train_dataloader())
        shapes[packing] = (len(train), sorted(train[0]))
    assert shapes[True][1] == ["input_ids", "labels", "position_ids"]
    assert shapes[False][1] == ["attention_mask", "input_ids", "labels"]
    assert shapes[True][0] < shapes[False][0] / 2
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_packed_fit_with_lora(tiny_lm_dir, tmp_path):
    dm = InstructionDataModule(tokenizer=tiny_lm_dir, batch_size=2, packing=True, system_prompt="Answer briefly.")
    module = CausalLM(tiny_lm_dir, learning_rate=1e-2, num_generate_examples=1, generate_max_new_tokens=2)
    trainer = L.Trainer(max_steps=3, limit_val_batches=1, val_check_interval=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, callbacks=[LoRA(r=4, target_modules=["q_proj", "v_proj"],
                                                                  merge_on_fit_end=False)])
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 3 and torch.isfinite(trainer.callback_metrics["val_loss"])
    assert len(module._val_prompts) == 1                    # the first example of the first packed row


@pytest.mark.integration
def test_packed_loss_on_the_real_smollm2(smollm2_shared):
    """The acceptance on the real model: fp32, within 1e-5."""
    items = _examples(6, seed=3, vocab=49152, lengths=(8, 40))
    with torch.no_grad():
        (packed, n_packed), (alone, n_alone), _ = _alone_and_packed(smollm2_shared, items, max_length=128)
    assert int(n_packed) == int(n_alone)
    torch.testing.assert_close(packed / n_packed, alone / n_alone, rtol=1e-5, atol=1e-5)


PACKED_DDP = """
import sys, torch, lightning as L
from lightning_lora import LoRA
from lightning_lora.data import InstructionDataModule
from lightning_lora.tasks import CausalLM
model_dir, out = sys.argv[1], sys.argv[2]


class Rows(L.Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        assert sorted(batch) == ["input_ids", "labels", "position_ids"]
        pad = trainer.datamodule.tokenizer.pad_token_id
        for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
            while ids and ids[-1] == pad and labels[-1] == -100:   # the batch's padded tail
                ids, labels = ids[:-1], labels[:-1]
            self.rows.append(tuple(ids))


rows = Rows()
trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                    enable_model_summary=False, enable_checkpointing=False, default_root_dir=out, limit_val_batches=0,
                    callbacks=[LoRA(r=4, target_modules=["q_proj", "v_proj"], merge_on_fit_end=False), rows])
dm = InstructionDataModule(tokenizer=model_dir, batch_size=2, packing=True, max_length=128)
trainer.fit(CausalLM(model_dir, num_generate_examples=0), datamodule=dm)
torch.save({"rows": rows.rows, "steps": trainer.global_step}, f"{out}/rank{trainer.global_rank}.pt")
if torch.distributed.is_initialized():  # stop gloo's threads before the interpreter exits (else: std::terminate)
    torch.distributed.destroy_process_group()
"""


@pytest.mark.integration
def test_packed_batches_under_ddp_split_the_rows_between_ranks(tiny_lm_dir, tmp_path):
    """Each rank trains on its own packed rows (Lightning's DistributedSampler over the rows): no row twice,
    every row of the epoch on one rank, both ranks step together."""
    run_ddp_script(tmp_path, PACKED_DDP, tiny_lm_dir, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    dm = InstructionDataModule(tokenizer=tiny_lm_dir, batch_size=2, packing=True, max_length=128)
    dm.setup("fit")
    expected = {tuple(r["input_ids"]) for r in pack_examples(dm.train_dataset.items, 128)}
    seen = [set(r["rows"]) for r in ranks]
    assert ranks[0]["steps"] == ranks[1]["steps"] > 0
    assert seen[0] | seen[1] == expected
    # DistributedSampler repeats a row to give both ranks as many when the count is odd
    assert len(seen[0] & seen[1]) == len(expected) % 2
