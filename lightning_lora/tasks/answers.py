"""`AnswersReport`: what did fine-tuning teach? Held-out questions answered before and after training.

A Lightning callback. At fit start it asks the model the datamodule's held-out questions (the base
model: LoRA adapters start at zero), at train end it asks the same questions again (still on the
training device, before the `LoRA` callback merges at fit end), and at fit end it prints a table:
question | expected fact | base answer | fine-tuned answer, with the summary lines

    base: 0/24 answers contain the right fact, fine-tuned: 19/24
    val loss: 2.546 -> 0.120

and writes the same to `answers.json` in the logger's `log_dir` and to TensorBoard (text tab).

What it needs:

- from the LightningModule: `model` (a transformers causal LM: anything with `generate`) and
  `tokenizer`, as `lightning_lora.tasks.CausalLM` has; optionally `val_loss_before`,
  `val_loss_after`, `val_loss_after_step` (the "val loss" line; `n/a` without them) and
  `model_name_or_path` (recorded in `answers.json`);
- from the datamodule: `eval_examples()` (dicts with `prompt`, `keywords`, optionally `messages`,
  `response`, `fact`, `source`) and `encode_prompt()` (a prompt formatted as in training), as
  `lightning_lora.data.InstructionDataModule` has. Without them there is no table (one info line).

Example:
    >>> import lightning as L
    >>> from lightning_lora import LoRA
    >>> from lightning_lora.data import InstructionDataModule
    >>> from lightning_lora.tasks import AnswersReport, CausalLM
    >>> trainer = L.Trainer(max_epochs=3, num_sanity_val_steps=-1,
    ...                     callbacks=[LoRA(r=2, target_modules="all-linear"), AnswersReport(num_questions=24)])
    >>> trainer.fit(CausalLM(), datamodule=InstructionDataModule())   # doctest: +SKIP

or in a LightningCLI config (`configs/quickstart.yaml`)::

    trainer:
      callbacks:
        - class_path: lightning_lora.tasks.AnswersReport
          init_args: {num_questions: 24, max_new_tokens: 24}
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_lora._io import _umask
from lightning_lora.tasks._errors import TaskConfigError

#: prompts per `generate` call (left-padded together)
GENERATE_BATCH_SIZE = 24
#: the file `AnswersReport` writes into the logger's `log_dir`
ANSWERS_FILE = "answers.json"

# ======================================================================= generation and scoring


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
    """Print the before/after table and the summary lines with `rich`.

    Example:
        >>> import io
        >>> out = io.StringIO()
        >>> rows = [AnswerRow("Who founded it?", ["Odalys"], "No idea.", "Odalys Penhallow.")]
        >>> print_answers_table(rows, answers_summary(rows), title="1 held-out question", file=out)
        >>> out.getvalue().splitlines()[-2:]
        ['base: 0/1 answers contain the right fact, fine-tuned: 1/1', 'val loss: n/a -> n/a']
    """
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


def markdown_cell(text: str) -> str:
    """One cell of a Markdown table (TensorBoard's text tab): one line, `|` escaped.

    Example:
        >>> markdown_cell("a | b\\n c")
        'a \\\\| b c'
    """
    return " ".join(str(text).split()).replace("|", "\\|") or "(empty)"


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Write `data` as indented UTF-8 JSON to `path` atomically (a temporary file renamed into place),
    readable as the umask allows. Returns the path.

    Example:
        >>> import tempfile, json, pathlib
        >>> p = write_json_atomic(pathlib.Path(tempfile.mkdtemp()) / "a.json", {"x": 1})
        >>> json.loads(p.read_text())
        {'x': 1}
    """
    path = Path(path)
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
    return path


def tensorboard_writer(trainer: pl.Trainer) -> Any:
    """The `SummaryWriter` of the trainer's first `TensorBoardLogger`, or None."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


# ============================================================================================ callback


class AnswersReport(Callback):
    """Answer the datamodule's held-out questions before and after training; print the table at fit end,
    write `answers.json` into the logger's `log_dir` and the table to TensorBoard (rank 0 only).

    Args:
        num_questions: held-out questions asked, evenly spread over the datamodule's `eval_examples()`
            (0 = all of them).
        max_new_tokens: the most tokens generated per answer (greedy).

    After `fit`: `answer_rows()` (one `AnswerRow` per question), `summary` (the counts, rates and val
    losses written to `answers.json`) and `path` (where it was written).

    Example:
        >>> report = AnswersReport(num_questions=24, max_new_tokens=24)
        >>> report.num_questions, report.max_new_tokens
        (24, 24)
        >>> AnswersReport(max_new_tokens=0)
        Traceback (most recent call last):
        lightning_lora.tasks._errors.TaskConfigError: AnswersReport(max_new_tokens=0); expected 1 or more tokens, e.g. max_new_tokens=32.
    """

    def __init__(self, num_questions: int = 24, max_new_tokens: int = 32) -> None:
        if not isinstance(num_questions, int) or num_questions < 0:
            raise TaskConfigError(f"AnswersReport(num_questions={num_questions!r}); expected 0 (all questions) or "
                                  "more, e.g. num_questions=24.")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise TaskConfigError(f"AnswersReport(max_new_tokens={max_new_tokens!r}); expected 1 or more tokens, "
                                  "e.g. max_new_tokens=32.")
        self.num_questions = num_questions
        self.max_new_tokens = max_new_tokens
        self.summary: dict[str, Any] | None = None
        self.path: Path | None = None
        self._reset()

    def _reset(self) -> None:
        self._examples: list[dict[str, Any]] = []
        self._prompts: list[list[int]] = []
        self._base_answers: list[str] = []
        self._finetuned_answers: list[str] = []

    @staticmethod
    def can_report(datamodule: Any) -> bool:
        """Whether `datamodule` offers the questions: callable `eval_examples()` and `encode_prompt()`.

        Example:
            >>> from lightning_lora.data import InstructionDataModule
            >>> AnswersReport.can_report(InstructionDataModule), AnswersReport.can_report(None)
            (True, False)
        """
        return datamodule is not None and callable(getattr(datamodule, "eval_examples", None)) and \
            callable(getattr(datamodule, "encode_prompt", None))

    @staticmethod
    def _model_and_tokenizer(pl_module: pl.LightningModule) -> tuple[Any, Any]:
        model, tokenizer = getattr(pl_module, "model", None), getattr(pl_module, "tokenizer", None)
        if not callable(getattr(model, "generate", None)) or tokenizer is None:
            raise TaskConfigError(
                f"AnswersReport needs a LightningModule with a `model` that can `generate` (a transformers causal "
                f"LM) and a `tokenizer`, as lightning_lora.tasks.CausalLM has; {type(pl_module).__name__} has "
                f"model={type(model).__name__}, tokenizer={type(tokenizer).__name__}. Remove AnswersReport from "
                "the callbacks or use such a module.")
        return model, tokenizer

    # ------------------------------------------------------------------ hooks
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Answer the held-out questions with the model as it starts (base weights, zero adapters)."""
        self._reset()
        self.summary = self.path = None
        dm = trainer.datamodule
        if not self.can_report(dm):
            rank_zero_info("AnswersReport: the datamodule has no eval_examples()/encode_prompt(); "
                           "no before/after table.")
            return
        model, tokenizer = self._model_and_tokenizer(pl_module)
        self._examples = select_eval_examples(dm.eval_examples(), self.num_questions)
        if not self._examples:
            return
        self._prompts = [dm.encode_prompt(ex["messages"] if "messages" in ex else ex["prompt"])[0].tolist() for ex in self._examples]
        rank_zero_info(f"AnswersReport: answering {len(self._prompts)} held-out questions before training ...")
        self._base_answers = generate_answers(model, tokenizer, self._prompts, self.max_new_tokens)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Answer the same questions after training, while the model is still on the training device
        (the `LoRA` callback merges later, in `on_fit_end`, after the module moved to the CPU)."""
        if self._prompts and self._base_answers:
            model, tokenizer = self._model_and_tokenizer(pl_module)
            rank_zero_info(f"AnswersReport: answering {len(self._prompts)} held-out questions after training ...")
            self._finetuned_answers = generate_answers(model, tokenizer, self._prompts, self.max_new_tokens)

    def answer_rows(self) -> list[AnswerRow]:
        """The before/after rows of the last fit (empty when there was no table)."""
        if not (self._examples and self._base_answers and self._finetuned_answers):
            return []
        return [AnswerRow(question=ex["prompt"], keywords=list(ex["keywords"]), base_answer=base,
                          finetuned_answer=tuned, expected=ex.get("response"), fact=ex.get("fact"),
                          source=ex.get("source"))
                for ex, base, tuned in zip(self._examples, self._base_answers, self._finetuned_answers)]

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Print the before/after table, write `answers.json` and the TensorBoard text (rank 0)."""
        rows = self.answer_rows()
        if not rows or trainer.interrupted:
            return
        summary = answers_summary(rows, getattr(pl_module, "val_loss_before", None),
                                  getattr(pl_module, "val_loss_after", None))
        summary["val_loss_after_step"] = getattr(pl_module, "val_loss_after_step", None)
        self.summary = summary
        if not trainer.is_global_zero:
            return
        resumed = trainer.ckpt_path is not None
        before = "before (resumed)" if resumed else "base"
        path = Path(trainer.log_dir or trainer.default_root_dir) / ANSWERS_FILE
        data = {**summary, "model": getattr(pl_module, "model_name_or_path", None), "global_step": trainer.global_step,
                "resumed": resumed, "generate_max_new_tokens": self.max_new_tokens,
                "questions": [asdict(r) for r in rows]}
        self.path = write_json_atomic(path, data)
        print_answers_table(rows, summary, before_label=before,
                            title=f"{len(rows)} held-out questions, before and after fine-tuning "
                                  f"({trainer.global_step} steps)")
        print(f"answers written to {path}", flush=True)
        writer = tensorboard_writer(trainer)
        if writer is not None:
            lines = [f"| question | expected | {before} | fine-tuned |", "| --- | --- | --- | --- |"]
            for r in rows:
                lines.append(f"| {markdown_cell(r.question)} | {markdown_cell(' / '.join(r.keywords))} | "
                             f"{'✓' if r.base_correct else '✗'} {markdown_cell(r.base_answer)} | "
                             f"{'✓' if r.finetuned_correct else '✗'} {markdown_cell(r.finetuned_answer)} |")
            writer.add_text("answers/before_after", "\n\n".join(summary_lines(summary)) + "\n\n" + "\n".join(lines),
                            global_step=trainer.global_step)
            writer.flush()
