"""LightningModules and data used by the callback, mixin and CLI tests (importable by class path)."""

from __future__ import annotations

import time

import lightning as L
import torch
from conftest import make_tiny_llama
from torch.utils.data import DataLoader, TensorDataset

from lightning_lora import LoRAMixin

VOCAB = 128


def token_data(n: int = 16, seq: int = 12, seed: int = 0) -> TensorDataset:
    """Deterministic random token sequences."""
    gen = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randint(1, VOCAB, (n, seq), generator=gen))


class TokenData(L.LightningDataModule):
    """Fixed token sequences, no shuffling: runs are reproducible step for step."""

    def __init__(self, n: int = 16, seq: int = 12, batch_size: int = 4) -> None:
        super().__init__()
        self.n, self.seq, self.batch_size = n, seq, batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(token_data(self.n, self.seq), batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(token_data(8, self.seq, seed=1), batch_size=self.batch_size)


class TinyLlamaLM(LoRAMixin, L.LightningModule):
    """A tiny Llama LM without `configure_optimizers` (LightningCLI's `--optimizer` provides one)."""

    def __init__(self, lr: float = 1e-2, seed: int = 0, sleep: float = 0.0, scheduler: bool = False,
                 gradient_checkpointing: str | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = make_tiny_llama(seed=seed).train()
        if gradient_checkpointing is not None:
            self.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": gradient_checkpointing == "reentrant"})

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits

    def training_step(self, batch, batch_idx):
        if self.hparams.sleep:
            time.sleep(self.hparams.sleep)
        loss = self.model(input_ids=batch[0], labels=batch[0]).loss
        self.log("train_loss", loss, on_step=True, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch[0], labels=batch[0]).loss
        self.log("val_loss", loss)



class TinyLlamaModule(TinyLlamaLM):
    """A tiny Llama LM; `configure_optimizers` is the plain `AdamW(self.parameters())`."""

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        if not self.hparams.scheduler:
            return opt
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)}


class BuiltInConfigureModel(TinyLlamaModule):
    """The network is built in `configure_model`, not in `__init__`."""

    def __init__(self, lr: float = 1e-2) -> None:
        L.LightningModule.__init__(self)
        self.save_hyperparameters({"lr": lr, "sleep": 0.0, "scheduler": False, "gradient_checkpointing": None})
        self.model = None

    def configure_model(self) -> None:
        if self.model is None:
            self.model = make_tiny_llama().train()


def fit(module: L.LightningModule, callbacks: list, tmp_path, max_steps: int = 3, ckpt_path=None,
        **trainer_kwargs) -> L.Trainer:
    """A quiet CPU Trainer run."""
    kwargs = dict(max_steps=max_steps, callbacks=callbacks, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                  accelerator="cpu", devices=1, num_sanity_val_steps=0, limit_val_batches=0)
    kwargs.update(trainer_kwargs)
    trainer = L.Trainer(**kwargs)
    trainer.fit(module, datamodule=TokenData(), ckpt_path=ckpt_path)
    return trainer


class PlainTinyLlama(L.LightningModule):
    """A plain LightningModule (no LoRAMixin): a tiny Llama (vocab 256), `AdamW(self.parameters())`,
    `val_loss` logged per epoch, logits from `predict_step`."""

    def __init__(self, lr: float = 1e-2, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = make_tiny_llama(seed=seed, vocab_size=256).train()

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(input_ids=batch[0], labels=batch[0]).loss)

    def test_step(self, batch, batch_idx):
        self.log("test_loss", self.model(input_ids=batch[0], labels=batch[0]).loss)

    def predict_step(self, batch, batch_idx):
        return self.model(input_ids=batch[0]).logits

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


class MixinTinyLlama(LoRAMixin, PlainTinyLlama):
    """`PlainTinyLlama` with `LoRAMixin` (adapter-only `load_from_checkpoint`)."""


class EvalData(L.LightningDataModule):
    """Training, validation, test and predict batches of fixed token sequences (no shuffling)."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(token_data(16, 12), batch_size=4)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(token_data(8, 12, seed=1), batch_size=4)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(token_data(4, 12, seed=2), batch_size=4)


class Distill(L.LightningModule):
    """A student Llama trained to match a frozen teacher Llama (frozen in __init__, run under no_grad)."""

    def __init__(self) -> None:
        super().__init__()
        self.student = make_tiny_llama(seed=0).train()
        self.teacher = make_tiny_llama(seed=1).requires_grad_(False)

    def training_step(self, batch, batch_idx):
        with torch.no_grad():
            target = self.teacher(input_ids=batch[0]).logits.softmax(-1)
        logits = self.student(input_ids=batch[0]).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(0, 1))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)
