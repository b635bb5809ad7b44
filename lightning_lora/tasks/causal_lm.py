"""`CausalLM`: fine-tune a transformers causal language model (SmolLM2, Llama, Mistral, ...) with LoRA.

The module the configs in `configs/` train. It loads the model with `lightning_lora.hub.load_causal_lm`
(in `configure_model`; a hub id is downloaded into the Hugging Face cache on first use), trains on batches of `input_ids`,
`attention_mask` and `labels` (-100 where there is no loss, as `lightning_lora.data.InstructionDataModule`
makes them), logs `train_loss`/`val_loss` and perplexity, keeps the validation loss before and after
training (`val_loss_before`, `val_loss_after`), and at every validation end logs greedy answers to a
few validation prompts to TensorBoard (text tab).

The before/after table of held-out answers is the `lightning_lora.tasks.AnswersReport` callback's job
(`configs/quickstart.yaml` adds it to the trainer's callbacks).

Example:
    >>> import lightning as L
    >>> from lightning_lora import LoRA
    >>> from lightning_lora.data import InstructionDataModule
    >>> from lightning_lora.tasks import AnswersReport, CausalLM
    >>> trainer = L.Trainer(max_epochs=2, callbacks=[LoRA(r=16, target_modules="all-linear"), AnswersReport()])
    >>> trainer.fit(CausalLM(learning_rate=1e-3), datamodule=InstructionDataModule())   # doctest: +SKIP

The transformers model is loaded in `configure_model`, so that under `bf16-true` (or a sharded
strategy) it is built inside the Trainer's init context; `load_from_checkpoint` calls
`configure_model` too, so an adapter-only checkpoint loads onto the base (see `LoRAMixin`).
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from torchmetrics import Metric
from typing_extensions import override

from lightning_lora.hub import load_causal_lm, load_tokenizer, parse_dtype
from lightning_lora.loss import IGNORE_INDEX, causal_lm_loss
from lightning_lora.mixin import LoRAMixin
from lightning_lora.offload import OffloadActivations
from lightning_lora.tasks._errors import TaskConfigError
from lightning_lora.tasks.answers import generate_answers, markdown_cell, tensorboard_writer
from lightning_lora.tasks.compile import TrainingCompile

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


# ======================================================================= validation prompts


def prompt_from_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor,
                       position_ids: torch.Tensor | None = None) -> tuple[list[int], list[int]] | None:
    """Split one row of a training batch into the prompt (tokens before the first learned label)
    and the expected answer (the learned tokens); None when the row has no learned token. A packed row
    (`position_ids` given) is read up to its second example.

    Example:
        >>> prompt_from_labels(torch.tensor([5, 6, 7, 8, 0]), torch.tensor([1, 1, 1, 1, 0]),
        ...                    torch.tensor([-100, -100, 7, 8, -100]))
        ([5, 6], [7, 8])
        >>> prompt_from_labels(torch.tensor([5, 6, 7, 1, 2]), None, torch.tensor([-100, -100, 7, -100, 2]),
        ...                    position_ids=torch.tensor([0, 1, 2, 0, 1]))
        ([5, 6], [7])
    """
    keep = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    if position_ids is not None:
        restarts = (position_ids[1:] == 0).nonzero()
        if len(restarts):
            keep = keep.clone()
            keep[int(restarts[0]) + 1:] = False
    ids, lab = input_ids[keep].tolist(), labels[keep].tolist()
    learned = [i for i, label in enumerate(lab) if label != IGNORE_INDEX]
    if not learned or learned[0] == 0:
        return None
    return ids[:learned[0]], [lab[i] for i in learned]


# ============================================================================================= module


class CausalLM(LoRAMixin, pl.LightningModule):
    """A transformers causal LM, trained on `input_ids`/`attention_mask`/`labels` batches.

    Add the `LoRA` callback (or call `apply_lora` on the module) for LoRA fine-tuning; without it
    every weight trains. Add the `AnswersReport` callback for the before/after table of held-out answers.

    Args:
        model_name_or_path: a bundled name (`smollm2-135m-instruct`), a local transformers model
            directory, or a hub id (`meta-llama/Llama-3.2-1B-Instruct`, `org/name@revision` for a branch,
            tag or commit), downloaded into the Hugging Face cache on first use as transformers does
            (`HF_TOKEN` for gated models; `HF_HUB_OFFLINE=1` reads the cache only).
        dtype: dtype the weights are loaded in (`float32`, `bfloat16`, ...); None loads float32. The
            Trainer's `precision` (e.g. `bf16-true`) converts the module afterwards anyway; set this to
            save host memory when loading a large model.
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: steps of linear learning-rate warmup from 0 (0 = no scheduler).
        gradient_checkpointing: recompute activations in the backward pass (less memory, ~30% slower).
        compile: run the training forward through `torch.compile`, one decoder layer at a time
            (`TrainingCompile`: one compile for all layers, lengths dynamic; validation, generation and
            the first batch of every fit stay eager). True uses torch's default backend (inductor); a
            string names another (`"aot_eager"`: traced and differentiated, no code generation). Off by
            default: compiling needs a working compiler toolchain and pays off only over many steps.
        chunked_loss: compute the loss without the full logits (`lightning_lora.loss`: the output
            head applied to the target positions a chunk at a time, each chunk's float32 logits alive only
            while its loss and gradient are computed); equal to transformers' loss within float rounding.
            False: from the model's own logits. Models outside `loss.CHUNKABLE_MODEL_TYPES` always are.
        offload_activations: keep what the training forward saves for backward in pinned host memory
            (`lightning_lora.offload.OffloadActivations`: copies on a side CUDA stream overlapping the
            forward, back in backward); parameters and tensors under 1 MiB stay. Less GPU memory for longer
            sequences, at the cost of host-device copies. The gradients are identical.
        generate_max_new_tokens: the most tokens generated per answer (the TensorBoard samples).
        num_generate_examples: validation prompts answered at each validation end and logged to
            TensorBoard as text (0 = none).

    Every optimizer step weights each target token of the step the same: with `accumulate_grad_batches`
    (and across DDP/FSDP ranks), the gradient is the mean over all target tokens of all micro-batches of
    the step (the fix transformers and Unsloth made in 2024), not the mean of the micro-batches' means;
    `train_loss` is logged once per optimizer step as that mean (the same number on every rank).
    `training_step` returns the micro-batch's summed loss divided by one constant of the fit (the first
    micro-batch's target tokens): about its mean, but weighted by its token count, which is what Lightning's
    learning-rate finder then reads. Packed batches
    (`InstructionDataModule(packing=True)`) carry `position_ids`, which the model receives.

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
        compile: bool | str = False,
        chunked_loss: bool = True,
        offload_activations: bool = False,
        generate_max_new_tokens: int = 32,
        num_generate_examples: int = 4,
    ) -> None:
        super().__init__()
        checks = [(learning_rate > 0, f"learning_rate={learning_rate}; expected a positive number, e.g. 2e-4"),
                  (weight_decay >= 0, f"weight_decay={weight_decay}; expected 0 or more"),
                  (warmup_steps >= 0, f"warmup_steps={warmup_steps}; expected 0 or more steps"),
                  (generate_max_new_tokens >= 1,
                   f"generate_max_new_tokens={generate_max_new_tokens}; expected 1 or more tokens"),
                  (num_generate_examples >= 0, f"num_generate_examples={num_generate_examples}; expected 0 or more")]
        for ok, message in checks:
            if not ok:
                raise TaskConfigError(message + ".")
        if isinstance(compile, str) and compile not in torch._dynamo.list_backends(exclude_tags=()):
            raise TaskConfigError(f"compile={compile!r} is not a torch.compile backend; expected True (inductor), "
                                  f"False or one of {', '.join(torch._dynamo.list_backends())}, aot_eager.")
        if dtype is not None:
            try:
                parse_dtype(dtype)
            except ValueError as err:
                raise TaskConfigError(str(err)) from None
        self.save_hyperparameters()
        self.model_name_or_path = str(model_name_or_path)
        # the tokenizer is loaded now: it is small, an unknown model fails at once with a clear message,
        # and the LoRA callback saves it next to the merged model
        self.tokenizer = load_tokenizer(self.model_name_or_path)
        self.model: Any = None  # loaded in configure_model
        #: the compiled training forward (`compile=True`), made in `configure_model`
        self.training_compile: TrainingCompile | None = None
        self._fit_batches = 0
        # the summed loss and target tokens of the micro-batches of the current optimizer step (this rank)
        self._step_loss_sum = torch.zeros((), dtype=torch.float64)
        self._step_tokens = torch.zeros((), dtype=torch.long)
        self._step_mean: torch.Tensor | None = None
        #: the constant the summed loss is divided by before backward (set by the first training step of a fit)
        self._loss_divisor: float | None = None
        #: the offloading hooks of the last training step (`offload_activations=True`): `offloaded` counts tensors
        self.activation_offload: OffloadActivations | None = None
        self.val_ppl = Perplexity()
        self._val_prompts: list[tuple[list[int], list[int]]] = []
        self.val_loss_before: float | None = None
        self.val_loss_after: float | None = None
        self.val_loss_after_step: int | None = None

    # ------------------------------------------------------------------ model
    @override
    def configure_model(self) -> None:
        """Load the transformers model (once): in the Trainer's init context, or from `load_from_checkpoint`."""
        if self.model is not None:
            return
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
            # per block and only for training forwards: parameter names (and so checkpoints) stay unchanged,
            # the LoRA layers injected after this point are traced on the first compiled call, and
            # validation and generate() stay eager
            backend = self.hparams.compile if isinstance(self.hparams.compile, str) else "inductor"
            self.training_compile = TrainingCompile(model, dynamic=True, backend=backend)

    def _forward(self, **inputs: Any) -> Any:
        # a loss needs no KV cache (transformers builds one unless told; under compile it costs a graph per layer)
        return self.model(**inputs, use_cache=False)

    @override
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> Any:
        """The transformers model's output (`logits`, and `loss` when `labels` is given); `position_ids` of
        packed batches (`InstructionDataModule(packing=True)`) keep their examples apart."""
        extra = {} if position_ids is None else {"position_ids": position_ids}
        return self._forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **extra)

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """`(mean loss per target token, number of target tokens)` of a batch; labels come from the batch.

        Raises:
            TaskConfigError: the batch has no `labels` or no `input_ids`.
        """
        total, n = self.loss_sum(batch)
        return total / n.clamp(min=1), n

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """`(summed float32 loss over the target tokens, number of target tokens)` of a batch
        (`lightning_lora.loss.causal_lm_loss`; `position_ids` of packed batches are passed on).

        Raises:
            TaskConfigError: the batch has no `labels` or no `input_ids`.
        """
        if not isinstance(batch, dict) or "input_ids" not in batch or "labels" not in batch:
            keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise TaskConfigError(f"CausalLM expects batches with 'input_ids', 'attention_mask' and 'labels' "
                                  f"(-100 where there is no loss), got {keys}; use "
                                  "lightning_lora.data.InstructionDataModule or a collate function that adds labels.")
        return causal_lm_loss(self.model, batch["input_ids"], batch["labels"], batch.get("attention_mask"),
                              batch.get("position_ids"), chunked=self.hparams.get("chunked_loss", True))

    # ------------------------------------------------------------------ steps
    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.training_compile is not None:
            # the first batch of a fit runs eagerly: the LoRA callback hooks every adapter for that one step
            # (which adapters run), and compiling the hooks would cost a second compile once they are gone
            self.training_compile.enabled = self._fit_batches > 0
        self._fit_batches += 1
        if self.hparams.get("offload_activations", False):
            self.activation_offload = OffloadActivations()
            with self.activation_offload:
                total, n = self.loss_sum(batch)
        else:
            total, n = self.loss_sum(batch)
        self._step_loss_sum = self._step_loss_sum.to(total.device) + total.detach().double()
        self._step_tokens = self._step_tokens.to(n.device) + n
        if self._loss_divisor is None:
            # one constant for the whole fit, the same on every rank (the first micro-batch's target tokens,
            # averaged over ranks): the backward starts from sum / divisor, about a mean, so an fp16 GradScaler
            # does not overflow on a sum of thousands of tokens; _token_mean_gradients multiplies it back
            self._loss_divisor = max(float(self.trainer.strategy.reduce(n.double(), reduce_op="mean")), 1.0)
        # Lightning divides this by accumulate_grad_batches and DDP averages over ranks; _token_mean_gradients
        # turns the step's gradient into the mean over all its target tokens
        return total / self._loss_divisor

    @override
    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """The step's gradient becomes the mean over every target token of the step (all micro-batches, all
        ranks) right after the last backward, inside the closure: before callbacks see it (the LoRA callback's
        `lora/grad_norm`), before gradient clipping and the optimizer."""

        def closure() -> Any:
            out = optimizer_closure() if optimizer_closure is not None else None
            self._token_mean_gradients(optimizer)
            return out

        super().optimizer_step(epoch, batch_idx, optimizer, closure)

    def _token_mean_gradients(self, optimizer: Any) -> None:
        strategy = self.trainer.strategy
        tokens = strategy.reduce(self._step_tokens.to(self.device).double(), reduce_op="sum")
        loss_sum = strategy.reduce(self._step_loss_sum.to(self.device), reduce_op="sum")
        self._step_loss_sum = torch.zeros((), dtype=torch.float64)
        self._step_tokens = torch.zeros((), dtype=torch.long)
        self._step_mean = None
        if float(tokens) == 0:
            return
        factor = self.trainer.accumulate_grad_batches * self.trainer.world_size * self._loss_divisor / float(tokens)
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(factor)
        self._step_mean = (loss_sum / tokens).float()

    @override
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log the step's mean loss per target token as `train_loss` (and its `exp` as `train_ppl`)."""
        if self._step_mean is not None:  # already the global mean: the same number on every rank
            self.log("train_loss", self._step_mean, on_step=True, on_epoch=False, prog_bar=True)
            self.log("train_ppl", self._step_mean.exp(), on_step=True, on_epoch=False, prog_bar=True)

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
                mask, positions = batch.get("attention_mask"), batch.get("position_ids")
                pair = prompt_from_labels(batch["input_ids"][i], None if mask is None else mask[i], batch["labels"][i],
                                          None if positions is None else positions[i])
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

    def _log_val_generations(self) -> None:
        """Greedy answers to the first validation prompts, as TensorBoard text."""
        writer = tensorboard_writer(self.trainer) if self._trainer is not None else None
        if writer is None or not self._val_prompts or self.hparams.num_generate_examples == 0:
            return
        prompts = [p for p, _ in self._val_prompts]
        answers = generate_answers(self.model, self.tokenizer, prompts, self.hparams.generate_max_new_tokens)
        if not self.trainer.is_global_zero:
            return
        lines = ["| prompt | expected | model |", "| --- | --- | --- |"]
        for (prompt, expected), answer in zip(self._val_prompts, answers):
            question = self.tokenizer.decode(prompt, skip_special_tokens=True)
            lines.append(f"| {markdown_cell(question[-300:])} | "
                         f"{markdown_cell(self.tokenizer.decode(expected, skip_special_tokens=True))} | "
                         f"{markdown_cell(answer)} |")
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
                f"vocabularies differ; leave the data module's tokenizer unset (it then tokenizes with the model's) "
                f"or pass the model's path, e.g. --data.tokenizer {self.model_name_or_path}")

    @override
    def on_fit_start(self) -> None:
        """Forget the validation losses and the step accumulators of an earlier fit (one stopped in the middle
        of an accumulation window: max_time, an interrupt)."""
        self.val_loss_before = self.val_loss_after = self.val_loss_after_step = None
        self._fit_batches = 0
        self._step_loss_sum = torch.zeros((), dtype=torch.float64)
        self._step_tokens = torch.zeros((), dtype=torch.long)
        self._step_mean = None
        self._loss_divisor = None

    # ------------------------------------------------------------------ checkpoints
    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Make sure the base model exists before `LoRAMixin` re-injects the adapters of an adapter-only
        checkpoint (Lightning calls `configure_model` first; this covers other callers)."""
        self.configure_model()
        super().on_load_checkpoint(checkpoint)

