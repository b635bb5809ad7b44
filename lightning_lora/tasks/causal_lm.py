"""`CausalLM`: fine-tune a transformers causal language model (SmolLM2, Llama, Mistral, ...) with LoRA.

The module the configs in `configs/` train. It loads the model offline with
`lightning_lora.hub.load_causal_lm`, trains on batches of `input_ids`, `attention_mask` and `labels`
(-100 where there is no loss, as `lightning_lora.data.InstructionDataModule` makes them), logs
`train_loss`/`val_loss` and perplexity, and shows what the fine-tuning did:

- at every validation end, greedy answers to a few validation prompts go to TensorBoard (text tab);
- with `print_answers` and a datamodule that offers `eval_examples()` and `encode_prompt()`, the
  held-out questions are answered before training (the base model: adapters start at zero) and after
  it, and a table is printed at fit end: question | expected fact | base answer | fine-tuned answer,
  with "base: x/N contain the right fact, fine-tuned: y/N" and the validation loss before/after.
  The same goes to `answers.json` in the logger's `log_dir`.

Example:
    >>> import lightning as L
    >>> from lightning_lora import LoRA
    >>> from lightning_lora.data import InstructionDataModule
    >>> from lightning_lora.tasks import CausalLM
    >>> trainer = L.Trainer(max_epochs=2, callbacks=[LoRA(r=16, target_modules="all-linear")])  # doctest: +SKIP
    >>> trainer.fit(CausalLM(learning_rate=1e-3), datamodule=InstructionDataModule())              # doctest: +SKIP

The transformers model is loaded in `configure_model`, so that under `bf16-true` (or a sharded
strategy) it is built inside the Trainer's init context; `load_from_checkpoint` calls
`configure_model` too, so an adapter-only checkpoint loads onto the base (see `LoRAMixin`).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import Metric
from typing_extensions import override

from lightning_lora._io import _umask
from lightning_lora.mixin import LoRAMixin
from lightning_lora.surgery import LoRAError

#: label value that carries no loss (transformers' and `InstructionDataModule`'s convention)
IGNORE_INDEX = -100
#: prompts per `generate` call (left-padded together)
GENERATE_BATCH_SIZE = 24
ANSWERS_FILE = "answers.json"


class TaskConfigError(LoRAError):
    """A bad argument of a task module, or a model and data that do not fit together.

    A `LoRAError` (so a `ValueError`): the `lightning-lora` command shows it as one line, exit code 2.
    """


# ============================================================================================ metrics


class Perplexity(Metric):
    """Token-level perplexity, `exp(sum of token NLLs / number of target tokens)`, accumulated from
    the mean loss of each batch and its number of target tokens.

    Unlike `torchmetrics.text.Perplexity` it needs no second float copy of the `(batch, seq, vocab)`
    logits (several GB for a 128k vocabulary), and its sum stays in float32 under `bf16-true`.

    Example:
        >>> ppl = Perplexity()
        >>> ppl.update(torch.tensor(2.0), 10)
        >>> ppl.update(torch.tensor(4.0), 30)
        >>> round(ppl.compute().log().item(), 4)     # (2 * 10 + 4 * 30) / 40
        3.5
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    nll_sum: torch.Tensor
    num_tokens: torch.Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("nll_sum", default=torch.tensor(0.0, dtype=torch.float32), dist_reduce_fx="sum")
        self.add_state("num_tokens", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, loss: torch.Tensor, num_tokens: int | torch.Tensor) -> None:
        """Add a batch: its mean loss per target token and its number of target tokens."""
        n = torch.as_tensor(num_tokens, device=self.nll_sum.device)
        # `.float()`: `module.to(torch.bfloat16)` (bf16-true) converts metric states too
        self.nll_sum = self.nll_sum.float() + loss.detach().float().to(self.nll_sum.device) * n.float()
        self.num_tokens = self.num_tokens + n.long()

    def compute(self) -> torch.Tensor:
        """`exp(mean NLL)`; NaN before any token was seen."""
        if int(self.num_tokens) == 0:
            return torch.tensor(float("nan"), device=self.nll_sum.device)
        return torch.exp(self.nll_sum.float() / self.num_tokens.float())


def num_target_tokens(labels: torch.Tensor) -> torch.Tensor:
    """How many tokens a causal LM loss averages over: labels are shifted by one, -100 is ignored.

    Example:
        >>> num_target_tokens(torch.tensor([[-100, -100, 5, 6, 2], [-100, 7, 2, -100, -100]])).item()
        5
    """
    return (labels[..., 1:] != IGNORE_INDEX).sum()


# ======================================================================= generation and answers


def contains_answer(answer: str, keywords: Sequence[str]) -> bool:
    """Whether `answer` contains one of `keywords` (case-insensitive, whitespace-normalised).

    Example:
        >>> contains_answer("It was founded by  odalys Penhallow.", ["Odalys Penhallow"])
        True
        >>> contains_answer("I don't know.", ["Odalys Penhallow"])
        False
    """
    text = " ".join(answer.lower().split())
    return any(" ".join(k.lower().split()) in text for k in keywords if k and k.strip())


def select_eval_examples(examples: Sequence[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """The examples with answer keywords; with `0 < limit < len`, `limit` of them evenly spread over
    the list (deterministic, so before and after use the same questions, and every run the same).

    Example:
        >>> exs = [{"keywords": [str(i)]} for i in range(10)] + [{"keywords": []}]
        >>> [e["keywords"][0] for e in select_eval_examples(exs, 4)]
        ['0', '2', '5', '7']
    """
    scored = [ex for ex in examples if ex.get("keywords")]
    if limit <= 0 or limit >= len(scored):
        return list(scored)
    return [scored[(i * len(scored)) // limit] for i in range(limit)]


def prompt_from_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                       labels: torch.Tensor) -> tuple[list[int], list[int]] | None:
    """Split one row of a training batch into the prompt (tokens before the first learned label)
    and the expected answer (the learned tokens); None when the row has no learned token.

    Example:
        >>> prompt_from_labels(torch.tensor([5, 6, 7, 8, 0]), torch.tensor([1, 1, 1, 1, 0]),
        ...                    torch.tensor([-100, -100, 7, 8, -100]))
        ([5, 6], [7, 8])
    """
    keep = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    ids, lab = input_ids[keep].tolist(), labels[keep].tolist()
    learned = [i for i, label in enumerate(lab) if label != IGNORE_INDEX]
    if not learned or learned[0] == 0:
        return None
    return ids[:learned[0]], [lab[i] for i in learned]


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                  getattr(tokenizer, "eos_token_id", None)):
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and int(v) not in ids:
                ids.append(int(v))
    return ids


@torch.no_grad()
def generate_answers(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32,
                     batch_size: int = GENERATE_BATCH_SIZE) -> list[str]:
    """Greedy answers to tokenized prompts, generated in left-padded batches.

    The model is put in eval mode for the call and every submodule's mode is restored afterwards.

    Args:
        model: a transformers causal LM (anything with `generate`).
        tokenizer: its tokenizer (pad/eos ids and decoding).
        prompts: token ids, each formatted as in training (e.g. `InstructionDataModule.encode_prompt`).
        max_new_tokens: the most tokens generated per answer.
        batch_size: prompts per `generate` call.

    Returns:
        The decoded answers (special tokens dropped, stripped), in the order of `prompts`.

    Example:
        >>> ids = dm.encode_prompt("Who founded Brindlewhisk Robotics?")[0].tolist()   # doctest: +SKIP
        >>> generate_answers(model, dm.tokenizer, [ids])                                # doctest: +SKIP
        ['Brindlewhisk Robotics was founded by Odalys Penhallow.']
    """
    from transformers import GenerationConfig

    if not prompts:
        return []
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad,
                              eos_token_id=eos or None, use_cache=True)
    device = next(model.parameters()).device
    modes = {m: m.training for m in model.modules()}
    model.eval()
    answers: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = [list(p) for p in prompts[start:start + batch_size]]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, p in enumerate(chunk):
                ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
                mask[i, width - len(p):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
            answers += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out.cpu()]
    finally:
        for module, training in modes.items():
            module.training = training
    return answers


@dataclass
class AnswerRow:
    """One held-out question with the base and the fine-tuned answer.

    Example:
        >>> row = AnswerRow("Who founded it?", ["Odalys"], base_answer="I don't know.",
        ...                 finetuned_answer="It was founded by Odalys Penhallow.")
        >>> row.base_correct, row.finetuned_correct
        (False, True)
    """

    question: str
    keywords: list[str]
    base_answer: str
    finetuned_answer: str
    expected: str | None = None
    fact: str | None = None
    source: str | None = None
    base_correct: bool = field(init=False)
    finetuned_correct: bool = field(init=False)

    def __post_init__(self) -> None:
        self.base_correct = contains_answer(self.base_answer, self.keywords)
        self.finetuned_correct = contains_answer(self.finetuned_answer, self.keywords)


def answers_summary(rows: Sequence[AnswerRow], val_loss_before: float | None = None,
                    val_loss_after: float | None = None) -> dict[str, Any]:
    """Counts and rates of answers that contain the expected fact, before and after.

    Example:
        >>> rows = [AnswerRow("q1", ["a"], "x", "a"), AnswerRow("q2", ["b"], "b", "b")]
        >>> s = answers_summary(rows, 2.0, 0.5)
        >>> s["base_correct"], s["finetuned_correct"], s["total"], s["finetuned_accuracy"]
        (1, 2, 2, 1.0)
    """
    n = len(rows)
    base = sum(r.base_correct for r in rows)
    tuned = sum(r.finetuned_correct for r in rows)
    return {"total": n, "base_correct": base, "finetuned_correct": tuned,
            "base_accuracy": base / n if n else None, "finetuned_accuracy": tuned / n if n else None,
            "val_loss_before": val_loss_before, "val_loss_after": val_loss_after}


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The two lines printed under the before/after table.

    Example:
        >>> summary_lines({"total": 24, "base_correct": 0, "finetuned_correct": 21,
        ...                "val_loss_before": 3.2, "val_loss_after": 0.41})
        ['base: 0/24 answers contain the right fact, fine-tuned: 21/24', 'val loss: 3.200 -> 0.410']
    """
    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    n = summary["total"]
    return [f"base: {summary['base_correct']}/{n} answers contain the right fact, "
            f"fine-tuned: {summary['finetuned_correct']}/{n}",
            f"val loss: {fmt(summary.get('val_loss_before'))} -> {fmt(summary.get('val_loss_after'))}"]


def print_answers_table(rows: Sequence[AnswerRow], summary: dict[str, Any], title: str, before_label: str = "base",
                        file: Any = None) -> None:
    """Print the before/after table and the summary lines with `rich`."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(file=file, highlight=False)
    if not console.is_terminal:  # piped or captured: wide enough to read, not the 80 column default
        console = Console(file=file, width=max(console.width, 140), highlight=False)
    table = Table(title=title, show_lines=True, expand=False)
    table.add_column("question", ratio=3)
    table.add_column("expected", ratio=1, style="bold")
    table.add_column(f"{before_label} answer", ratio=3)
    table.add_column("fine-tuned answer", ratio=3)

    def cell(answer: str, correct: bool) -> Text:
        return Text.assemble(("✓ " if correct else "✗ ", "green" if correct else "red"), answer or "(empty)")

    for row in rows:
        table.add_row(row.question, " / ".join(row.keywords), cell(row.base_answer, row.base_correct),
                      cell(row.finetuned_answer, row.finetuned_correct))
    console.print(table)
    for line in summary_lines(summary):
        console.print(line, style="bold")


def _markdown_cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|") or "(empty)"


def _write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, ensure_ascii=False)
            fh.write("\n")
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; a log file is as readable as any other
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ============================================================================================= module


class CausalLM(LoRAMixin, pl.LightningModule):
    """A transformers causal LM, trained on `input_ids`/`attention_mask`/`labels` batches.

    Add the `LoRA` callback (or call `apply_lora` on the module) for LoRA fine-tuning; without it
    every weight trains.

    Args:
        model_name_or_path: a bundled name (`smollm2-135m-instruct`), a local transformers model
            directory, or a hub id in the local cache (nothing is downloaded).
        dtype: dtype the weights are loaded in (`float32`, `bfloat16`, ...); None loads float32. The
            Trainer's `precision` (e.g. `bf16-true`) converts the module afterwards anyway; set this to
            save host memory when loading a large model.
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: steps of linear learning-rate warmup from 0 (0 = no scheduler).
        gradient_checkpointing: recompute activations in the backward pass (less memory, ~30% slower).
        compile: run the training forward through `torch.compile` (validation and generation stay
            eager). Off by default: compiling takes minutes and needs a working compiler toolchain.
        generate_max_new_tokens: the most tokens generated per answer (TensorBoard samples and the
            before/after table).
        num_generate_examples: validation prompts answered at each validation end and logged to
            TensorBoard as text (0 = none).
        print_answers: print the before/after table at fit end and write `answers.json`, when the
            datamodule offers `eval_examples()` and `encode_prompt()` (as `InstructionDataModule` does).
        num_eval_questions: held-out questions in the before/after table, evenly spread over
            `eval_examples()` (0 = all of them).

    Example:
        >>> module = CausalLM("smollm2-135m-instruct", learning_rate=1e-3, warmup_steps=10)   # doctest: +SKIP
        >>> module = CausalLM.load_from_checkpoint("runs/quickstart/checkpoints/last.ckpt")   # doctest: +SKIP
    """

    def __init__(
        self,
        model_name_or_path: str = "smollm2-135m-instruct",
        dtype: str | None = None,
        learning_rate: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        gradient_checkpointing: bool = False,
        compile: bool = False,
        generate_max_new_tokens: int = 32,
        num_generate_examples: int = 4,
        print_answers: bool = True,
        num_eval_questions: int = 24,
    ) -> None:
        super().__init__()
        checks = [(learning_rate > 0, f"learning_rate={learning_rate}; expected a positive number, e.g. 2e-4"),
                  (weight_decay >= 0, f"weight_decay={weight_decay}; expected 0 or more"),
                  (warmup_steps >= 0, f"warmup_steps={warmup_steps}; expected 0 or more steps"),
                  (generate_max_new_tokens >= 1,
                   f"generate_max_new_tokens={generate_max_new_tokens}; expected 1 or more tokens"),
                  (num_generate_examples >= 0, f"num_generate_examples={num_generate_examples}; expected 0 or more"),
                  (num_eval_questions >= 0, f"num_eval_questions={num_eval_questions}; expected 0 (all) or more")]
        for ok, message in checks:
            if not ok:
                raise TaskConfigError(message + ".")
        if dtype is not None:
            from lightning_lora.hub import parse_dtype

            try:
                parse_dtype(dtype)
            except ValueError as err:
                raise TaskConfigError(str(err)) from None
        self.save_hyperparameters()
        self.model_name_or_path = str(model_name_or_path)
        # the tokenizer is loaded now: it is small, an unknown model fails at once with a clear message,
        # and the LoRA callback saves it next to the merged model
        from lightning_lora.hub import load_tokenizer

        self.tokenizer = load_tokenizer(self.model_name_or_path)
        self.model: Any = None  # loaded in configure_model
        self._compiled_forward: Any = None
        self.train_ppl = Perplexity()
        self.val_ppl = Perplexity()
        self._val_prompts: list[tuple[list[int], list[int]]] = []
        self._eval_examples: list[dict[str, Any]] = []
        self._eval_prompts: list[list[int]] = []
        self._base_answers: list[str] = []
        self._finetuned_answers: list[str] = []
        self.val_loss_before: float | None = None
        self.val_loss_after: float | None = None
        self.val_loss_after_step: int | None = None

    # ------------------------------------------------------------------ model
    @override
    def configure_model(self) -> None:
        """Load the transformers model (once): in the Trainer's init context, or from `load_from_checkpoint`."""
        if self.model is not None:
            return
        from lightning_lora.hub import load_causal_lm

        model = load_causal_lm(self.model_name_or_path, dtype=self.hparams.dtype)
        model.train()  # from_pretrained returns eval mode; Lightning does not switch modes for us
        if self.hparams.gradient_checkpointing:
            if not getattr(model, "supports_gradient_checkpointing", False):
                raise TaskConfigError(f"gradient_checkpointing=True, but {type(model).__name__} does not support "
                                      "gradient checkpointing; set it to False.")
            # non-reentrant: works with a frozen embedding (no input-grad hook needed); transformers >= 5.x calls
            # it activation checkpointing and deprecates the old name
            enable = getattr(model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        self.model = model
        if self.hparams.compile:
            # the bound forward, not the module: parameter names (and so checkpoints) stay unchanged, the
            # LoRA layers injected after this point are traced on the first call, and generate() stays eager
            self._compiled_forward = torch.compile(model.forward, dynamic=True)

    def _forward(self, **inputs: Any) -> Any:
        if self._compiled_forward is not None and self.training:
            return self._compiled_forward(**inputs)
        return self.model(**inputs)

    @override
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> Any:
        """The transformers model's output (`logits`, and `loss` when `labels` is given)."""
        return self._forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """`(mean loss per target token, number of target tokens)` of a batch; labels come from the batch.

        Raises:
            TaskConfigError: the batch has no `labels` or no `input_ids`.
        """
        if not isinstance(batch, dict) or "input_ids" not in batch or "labels" not in batch:
            keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise TaskConfigError(f"CausalLM expects batches with 'input_ids', 'attention_mask' and 'labels' "
                                  f"(-100 where there is no loss), got {keys}; use "
                                  "lightning_lora.data.InstructionDataModule or a collate function that adds labels.")
        labels = batch["labels"]
        out = self._forward(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=labels)
        return out.loss, num_target_tokens(labels)

    # ------------------------------------------------------------------ steps
    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, n = self.loss(batch)
        batch_size = batch["input_ids"].shape[0]
        self.train_ppl(loss, n)
        self.log("train_loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=batch_size)
        self.log("train_ppl", self.train_ppl, on_step=True, on_epoch=False, prog_bar=True, batch_size=batch_size)
        return loss

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        loss, n = self.loss(batch)
        self.val_ppl.update(loss, n)
        # weighted by target tokens, so that the epoch's val_loss is exactly log(val_ppl)
        self.log("val_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=max(int(n), 1),
                 sync_dist=True)
        if batch_idx == 0 and dataloader_idx == 0:
            self._val_prompts = []
            for i in range(batch["input_ids"].shape[0]):
                if len(self._val_prompts) >= self.hparams.num_generate_examples:
                    break
                mask = batch.get("attention_mask")
                pair = prompt_from_labels(batch["input_ids"][i], None if mask is None else mask[i], batch["labels"][i])
                if pair is not None:
                    self._val_prompts.append(pair)
        return loss

    @override
    def on_validation_epoch_end(self) -> None:
        ppl = self.val_ppl.compute()
        self.val_ppl.reset()
        if torch.isnan(ppl):
            return
        value = math.log(float(ppl))
        if self.trainer.sanity_checking:
            # a sanity check over every validation batch (num_sanity_val_steps: -1) is the loss before training
            full = list(self.trainer.num_sanity_val_batches) == list(self.trainer.num_val_batches)
            if full and self.val_loss_before is None and self.trainer.state.fn == "fit" and self.global_step == 0:
                self.val_loss_before = value
            return
        self.log("val_ppl", ppl, prog_bar=True, sync_dist=True)  # already global; silences the DDP hint
        if self.trainer.state.fn == "fit":
            if self.val_loss_before is None and self.global_step == 0:
                self.val_loss_before = value
            self.val_loss_after, self.val_loss_after_step = value, self.global_step
        self._log_val_generations()

    def _tensorboard(self) -> Any:
        if self._trainer is None:
            return None
        for logger in self.trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                return logger.experiment
        return None

    def _log_val_generations(self) -> None:
        """Greedy answers to the first validation prompts, as TensorBoard text."""
        writer = self._tensorboard()
        if writer is None or not self._val_prompts or self.hparams.num_generate_examples == 0:
            return
        prompts = [p for p, _ in self._val_prompts]
        answers = generate_answers(self.model, self.tokenizer, prompts, self.hparams.generate_max_new_tokens)
        if not self.trainer.is_global_zero:
            return
        lines = ["| prompt | expected | model |", "| --- | --- | --- |"]
        for (prompt, expected), answer in zip(self._val_prompts, answers):
            question = self.tokenizer.decode(prompt, skip_special_tokens=True)
            lines.append(f"| {_markdown_cell(question[-300:])} | "
                         f"{_markdown_cell(self.tokenizer.decode(expected, skip_special_tokens=True))} | "
                         f"{_markdown_cell(answer)} |")
        writer.add_text("val/generations", "\n".join(lines), global_step=self.global_step)

    # ------------------------------------------------------------------ optimizer
    @override
    def configure_optimizers(self) -> Any:
        """AdamW over the trainable parameters (with the LoRA callback: the adapters), plus a linear
        warmup (per step) when `warmup_steps > 0`."""
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise TaskConfigError("CausalLM has no trainable parameter: add the LoRA callback (trainer.callbacks) "
                                  "or call apply_lora(), or unfreeze the model.")
        optimizer = torch.optim.AdamW(params, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)
        warmup = self.hparams.warmup_steps
        if warmup <= 0:
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ checks and before/after table
    @override
    def setup(self, stage: str) -> None:
        """Check that the datamodule tokenizes with the model's tokenizer."""
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        data_tokenizer = getattr(dm, "tokenizer", None) if dm is not None else None
        if data_tokenizer is None or data_tokenizer is self.tokenizer or not hasattr(data_tokenizer, "get_vocab"):
            return
        if data_tokenizer.get_vocab() != self.tokenizer.get_vocab():
            name = getattr(dm, "tokenizer_name", None) or getattr(data_tokenizer, "name_or_path", "?")
            raise TaskConfigError(
                f"The data is tokenized with {str(name)!r} but the model is {self.model_name_or_path!r}, and their "
                f"vocabularies differ; pass the model's path to the data module too, e.g. "
                f"--data.tokenizer {self.model_name_or_path}")

    def _eval_source(self) -> Any:
        dm = self.trainer.datamodule
        if dm is None or not callable(getattr(dm, "eval_examples", None)) or \
                not callable(getattr(dm, "encode_prompt", None)):
            return None
        return dm

    @override
    def on_fit_start(self) -> None:
        """Answer the held-out questions with the model as it starts (base weights, zero adapters)."""
        self._eval_examples, self._eval_prompts, self._base_answers, self._finetuned_answers = [], [], [], []
        self.val_loss_before = self.val_loss_after = self.val_loss_after_step = None
        if not self.hparams.print_answers:
            return
        dm = self._eval_source()
        if dm is None:
            rank_zero_info("CausalLM: the datamodule has no eval_examples()/encode_prompt(); no before/after table.")
            return
        self._eval_examples = select_eval_examples(dm.eval_examples(), self.hparams.num_eval_questions)
        if not self._eval_examples:
            return
        self._eval_prompts = [dm.encode_prompt(ex.get("messages") or ex["prompt"])[0].tolist()
                              for ex in self._eval_examples]
        rank_zero_info(f"CausalLM: answering {len(self._eval_prompts)} held-out questions before training ...")
        self._base_answers = generate_answers(self.model, self.tokenizer, self._eval_prompts,
                                              self.hparams.generate_max_new_tokens)

    @override
    def on_train_end(self) -> None:
        """Answer the same questions after training, while the model is still on the training device
        (the adapters are merged later, in `on_fit_end`, after the module moved to the CPU; the function
        the model computes is the same)."""
        if self._eval_prompts and self._base_answers:
            rank_zero_info(f"CausalLM: answering {len(self._eval_prompts)} held-out questions after training ...")
            self._finetuned_answers = generate_answers(self.model, self.tokenizer, self._eval_prompts,
                                                       self.hparams.generate_max_new_tokens)

    def answer_rows(self) -> list[AnswerRow]:
        """The before/after rows of the last fit (empty when there was no table)."""
        if not (self._eval_examples and self._base_answers and self._finetuned_answers):
            return []
        return [AnswerRow(question=ex["prompt"], keywords=list(ex["keywords"]), base_answer=base,
                          finetuned_answer=tuned, expected=ex.get("response"), fact=ex.get("fact"),
                          source=ex.get("source"))
                for ex, base, tuned in zip(self._eval_examples, self._base_answers, self._finetuned_answers)]

    @override
    def on_fit_end(self) -> None:
        """Print the before/after table and write `answers.json` (rank 0)."""
        rows = self.answer_rows()
        if not rows or self.trainer.interrupted or not self.trainer.is_global_zero:
            return
        summary = answers_summary(rows, self.val_loss_before, self.val_loss_after)
        summary["val_loss_after_step"] = self.val_loss_after_step
        resumed = self.trainer.ckpt_path is not None
        before = "before (resumed)" if resumed else "base"
        log_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        path = log_dir / ANSWERS_FILE
        data = {**summary, "model": self.model_name_or_path, "global_step": self.global_step, "resumed": resumed,
                "generate_max_new_tokens": self.hparams.generate_max_new_tokens,
                "questions": [asdict(r) for r in rows]}
        _write_json_atomic(path, data)
        print_answers_table(rows, summary, before_label=before,
                            title=f"{len(rows)} held-out questions, before and after fine-tuning "
                                  f"({self.global_step} steps)")
        print(f"answers written to {path}", flush=True)
        writer = self._tensorboard()
        if writer is not None:
            lines = [f"| question | expected | {before} | fine-tuned |", "| --- | --- | --- | --- |"]
            for r in rows:
                lines.append(f"| {_markdown_cell(r.question)} | {_markdown_cell(' / '.join(r.keywords))} | "
                             f"{'✓' if r.base_correct else '✗'} {_markdown_cell(r.base_answer)} | "
                             f"{'✓' if r.finetuned_correct else '✗'} {_markdown_cell(r.finetuned_answer)} |")
            writer.add_text("answers/before_after", "\n\n".join(summary_lines(summary)) + "\n\n" + "\n".join(lines),
                            global_step=self.global_step)
            writer.flush()

    # ------------------------------------------------------------------ checkpoints
    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Make sure the base model exists before `LoRAMixin` re-injects the adapters of an adapter-only
        checkpoint (Lightning calls `configure_model` first; this covers other callers)."""
        self.configure_model()
        super().on_load_checkpoint(checkpoint)
