"""The paths users take around `fit`, each on a tiny Llama built in code (seconds on a CPU):

1. evaluate after fit: `validate(ckpt_path="best")` equals `best_model_score`, merged or not;
2. a classification head the base checkpoint lacks is trained and saved (`task_heads`);
3. added tokens: a resized vocabulary travels with the adapter (`save_embedding_layers`);
4. a frozen teacher next to the student is left alone.

Run: python examples/everyday_workflows.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from lightning_lora import LoRA, LoRAConfig, inject_lora, load_adapter, lora_parameters, save_adapter

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, pad_token_id=0)


def tokens(n: int, seed: int, vocab: int = 256) -> torch.Tensor:
    return torch.randint(1, vocab, (n, 12), generator=torch.Generator().manual_seed(seed))


def trainer(root: Path, callbacks: list, **kwargs) -> L.Trainer:
    opts = dict(max_epochs=4, callbacks=callbacks, logger=False, enable_progress_bar=False, enable_model_summary=False,
                default_root_dir=str(root), num_sanity_val_steps=0, accelerator="cpu", devices=1)
    return L.Trainer(**{**opts, **kwargs})


class TinyLM(L.LightningModule):
    """A plain LightningModule: nothing LoRA-specific in it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = LlamaForCausalLM(LlamaConfig(**TINY))

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(input_ids=batch[0], labels=batch[0]).loss)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-2)


def evaluate_after_fit(root: Path) -> None:
    train = DataLoader(TensorDataset(tokens(16, 0)), batch_size=4)
    val = DataLoader(TensorDataset(tokens(8, 1)), batch_size=4)
    best = ModelCheckpoint(dirpath=root / "ckpt", monitor="val_loss", mode="min", save_top_k=1)
    module = TinyLM()
    t = trainer(root, [LoRA(r=4, alpha=32), best])
    t.fit(module, train, val)
    last = t.callback_metrics["val_loss"].item()
    again = t.validate(module, val, ckpt_path="best", verbose=False)[0]["val_loss"]
    print(f"1. evaluate after fit: last val_loss {last:.5f}; validate(ckpt_path='best') {again:.5f} "
          f"== best_model_score {best.best_model_score.item():.5f}")


def classification_head(root: Path) -> None:
    base_dir = root / "causal-lm"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY)).save_pretrained(base_dir)
    model = LlamaForSequenceClassification.from_pretrained(base_dir, num_labels=3)  # a new, random `score`
    inject_lora(model, LoRAConfig(r=4))
    print(f"2. classification head: trained fully and saved: {model.lora_state.modules_to_save}; "
          f"{sum(p.numel() for p in lora_parameters(model)):,} trainable parameters")


def added_tokens(root: Path) -> None:
    def resized(seed: int) -> LlamaForCausalLM:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**TINY))
        torch.manual_seed(seed)  # the new rows are random
        model.resize_token_embeddings(260, mean_resizing=False)
        return model.eval()

    model = resized(seed=1)
    inject_lora(model, LoRAConfig(r=4))
    out = save_adapter(model, root / "adapter-260")
    fresh = resized(seed=2)
    load_adapter(fresh, out)
    ids = tokens(2, 3, vocab=260)
    with torch.no_grad():
        diff = (fresh(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item()
    print(f"3. added tokens: the adapter carries {model.lora_state.embedding_keys}; reloaded logits differ by {diff}")


class Distill(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.student = LlamaForCausalLM(LlamaConfig(**TINY))
        self.teacher = LlamaForCausalLM(LlamaConfig(**TINY)).requires_grad_(False)

    def training_step(self, batch, batch_idx):
        with torch.no_grad():
            target = self.teacher(input_ids=batch[0]).logits.softmax(-1)
        logits = self.student(input_ids=batch[0]).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(0, 1))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def frozen_teacher(root: Path) -> None:
    lora = LoRA(r=4, merge_on_fit_end=False)
    module = Distill()
    t = trainer(root, [lora], max_epochs=1, enable_checkpointing=False)
    t.fit(module, DataLoader(TensorDataset(tokens(8, 0)), batch_size=4))
    held = sum(len(g["params"]) for g in t.optimizers[0].param_groups)
    print(f"4. frozen teacher: adapted {len(lora.adapted_modules)} student layers, 0 teacher layers; "
          f"the optimizer holds {held} tensors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None, help="where files go (default: a temporary directory)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        evaluate_after_fit(root / "eval")
        classification_head(root)
        added_tokens(root)
        frozen_teacher(root / "teacher")


if __name__ == "__main__":
    main()
