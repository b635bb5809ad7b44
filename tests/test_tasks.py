"""`lightning_lora.tasks`: `CausalLM` (loss, perplexity, generation, checkpoints) and the `AnswersReport`
callback (the before/after table, answers.json)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import run_ddp_script

from lightning_lora import LoRA
from lightning_lora.data import InstructionDataModule
from lightning_lora.surgery import has_lora, lora_state_dict
from lightning_lora.tasks import (
    AnswerRow,
    AnswersReport,
    CausalLM,
    Perplexity,
    TaskConfigError,
    answers_summary,
    contains_answer,
    generate_answers,
    num_target_tokens,
    print_answers_table,
    prompt_from_labels,
    select_eval_examples,
    summary_lines,
)


@pytest.fixture
def module(tiny_lm_dir):
    m = CausalLM(tiny_lm_dir)
    m.configure_model()
    return m


def batch_of(tiny_lm_dir, n=4, split="val"):
    dm = InstructionDataModule(tokenizer=tiny_lm_dir, batch_size=n, system_prompt="Answer briefly.")
    dm.setup("fit")
    loader = dm.val_dataloader() if split == "val" else dm.train_dataloader()
    return dm, next(iter(loader))


def test_loss_is_transformers_loss_over_target_tokens(module, tiny_lm_dir):
    dm, batch = batch_of(tiny_lm_dir)
    loss, n = module.loss(batch)
    expected = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            labels=batch["labels"]).loss
    torch.testing.assert_close(loss, expected)
    # and by hand: next-token cross entropy averaged over the non-ignored shifted labels
    logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    manual = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                               batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, manual, rtol=1e-5, atol=1e-5)
    assert n == (batch["labels"][:, 1:] != -100).sum() and n > 0
    assert (batch["labels"] == -100).any(), "prompt and padding are masked"


def test_loss_needs_labels(module):
    with pytest.raises(TaskConfigError, match="'labels'"):
        module.loss({"input_ids": torch.ones(1, 3, dtype=torch.long)})


def test_perplexity_is_exp_of_token_weighted_loss(module, tiny_lm_dir):
    dm = InstructionDataModule(tokenizer=tiny_lm_dir, batch_size=3, system_prompt="Answer briefly.")
    dm.setup("fit")
    ppl = Perplexity()
    total, count = 0.0, 0
    with torch.no_grad():
        for i, batch in enumerate(dm.val_dataloader()):
            loss, n = module.loss(batch)
            if i == 0:
                one = Perplexity()
                one.update(loss, n)
                torch.testing.assert_close(one.compute(), torch.exp(loss))
                # the same number as torchmetrics' logits-based Perplexity
                from torchmetrics.text import Perplexity as LogitsPerplexity

                logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                ref = LogitsPerplexity(ignore_index=-100)(logits[:, :-1].float(), batch["labels"][:, 1:])
                torch.testing.assert_close(one.compute(), ref, rtol=1e-4, atol=1e-4)
            ppl.update(loss, n)
            total += loss.item() * int(n)
            count += int(n)
            if i == 2:
                break
    assert math.isclose(ppl.compute().item(), math.exp(total / count), rel_tol=1e-5)
    assert torch.isnan(Perplexity().compute())


def test_perplexity_sum_stays_float32_under_bf16():
    ppl = Perplexity().to(torch.bfloat16)
    for _ in range(1000):
        ppl.update(torch.tensor(2.3456, dtype=torch.bfloat16), 1)
    assert ppl.nll_sum.dtype == torch.float32
    assert math.isclose(ppl.compute().log().item(), 2.34375, rel_tol=1e-4)  # bf16(2.3456), summed exactly


def test_num_target_tokens():
    labels = torch.tensor([[-100, -100, 5, 6, 2], [-100, 7, 2, -100, -100]])
    assert num_target_tokens(labels).item() == 5


def test_prompt_from_labels_is_the_generation_prompt(tiny_lm_dir):
    dm, batch = batch_of(tiny_lm_dir, n=3)
    examples = dm.eval_examples()
    for i in range(3):
        prompt, answer = prompt_from_labels(batch["input_ids"][i], batch["attention_mask"][i], batch["labels"][i])
        assert prompt == dm.encode_prompt(examples[i]["messages"])[0].tolist()
        assert dm.tokenizer.decode(answer, skip_special_tokens=True) == examples[i]["response"]
    assert prompt_from_labels(torch.tensor([1, 2]), None, torch.tensor([-100, -100])) is None


def test_contains_answer_and_selection():
    assert contains_answer("Founded by ODALYS  Penhallow.", ["Odalys Penhallow"])
    assert contains_answer("teal and marigold", ["teal", "marigold"])
    assert not contains_answer("I do not know", ["Odalys Penhallow"])
    assert not contains_answer("anything", [])
    exs = [{"keywords": [f"k{i}"]} for i in range(10)] + [{"keywords": []}]
    picked = select_eval_examples(exs, 4)
    assert [e["keywords"][0] for e in picked] == ["k0", "k2", "k5", "k7"]
    assert select_eval_examples(exs, 4) == picked  # deterministic
    assert len(select_eval_examples(exs, 0)) == 10 and len(select_eval_examples(exs, 50)) == 10


def test_answers_table_and_accuracy_on_a_fake_set():
    rows = [AnswerRow("Who founded it?", ["Odalys Penhallow"], "A team of engineers.",
                      "It was founded by Odalys Penhallow.", fact="founder"),
            AnswerRow("Which year?", ["2013"], "In 2013.", "It was founded in 2013."),
            AnswerRow("Mascot?", ["Sprocket"], "A dog.", "A hedgehog named Gear."),
            AnswerRow("City?", ["Ljubljana"], "Paris", "Ljubljana")]
    assert [(r.base_correct, r.finetuned_correct) for r in rows] == [(False, True), (True, True), (False, False),
                                                                       (False, True)]
    summary = answers_summary(rows, val_loss_before=3.25, val_loss_after=0.5)
    assert summary["total"] == 4 and summary["base_correct"] == 1 and summary["finetuned_correct"] == 3
    assert summary["base_accuracy"] == 0.25 and summary["finetuned_accuracy"] == 0.75
    assert summary_lines(summary) == ["base: 1/4 answers contain the right fact, fine-tuned: 3/4",
                                      "val loss: 3.250 -> 0.500"]
    assert summary_lines(answers_summary(rows))[1] == "val loss: n/a -> n/a"
    out = io.StringIO()
    print_answers_table(rows, summary, title="4 held-out questions", file=out)
    text = out.getvalue()
    assert "Who founded it?" in text and "Odalys Penhallow" in text and "fine-tuned answer" in text
    assert "✓" in text and "✗" in text
    assert "base: 1/4 answers contain the right fact, fine-tuned: 3/4" in text
    assert answers_summary([])["base_accuracy"] is None


def test_batched_left_padded_generation_equals_one_by_one(smollm2_shared, smollm2_path):
    from lightning_lora.hub import load_tokenizer

    model = smollm2_shared  # read-only: generate restores every module's mode, checked below
    tokenizer = load_tokenizer(smollm2_path)
    dm = InstructionDataModule(tokenizer=tokenizer, system_prompt="Answer briefly.")
    questions = ["What is the capital of France?", "Name a color.", "Who wrote Hamlet, the famous play?"]
    prompts = [dm.encode_prompt(q)[0].tolist() for q in questions]
    assert len({len(p) for p in prompts}) > 1  # so that padding is exercised
    model.model.layers[0].train()  # a mixed mode: generation must restore it exactly
    try:
        batched = generate_answers(model, tokenizer, prompts, max_new_tokens=6)
        single = [generate_answers(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
        assert batched == single and all(batched)
        assert not model.training and all(m.training for m in model.model.layers[0].modules())
        assert not any(m.training for m in model.model.layers[1].modules())
    finally:
        model.eval()
    assert generate_answers(model, tokenizer, [], 4) == []


def test_bad_arguments_are_clear(tiny_lm_dir):
    with pytest.raises(TaskConfigError, match="learning_rate=0"):
        CausalLM(tiny_lm_dir, learning_rate=0)
    with pytest.raises(TaskConfigError, match="warmup_steps=-1"):
        CausalLM(tiny_lm_dir, warmup_steps=-1)
    with pytest.raises(TaskConfigError, match="dtype='float8'"):
        CausalLM(tiny_lm_dir, dtype="float8")
    from lightning_lora.hub import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="not found"):
        CausalLM("no-such-model-xyz")


def test_configure_model_once_train_mode_and_options(tiny_lm_dir):
    m = CausalLM(tiny_lm_dir, gradient_checkpointing=True, dtype="bfloat16")
    assert m.model is None  # loaded lazily
    m.configure_model()
    model = m.model
    m.configure_model()
    assert m.model is model and model.training
    enabled = getattr(model, "is_activation_checkpointing", None)
    assert (model.is_gradient_checkpointing if enabled is None else enabled)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert m.tokenizer.pad_token_id is not None


def test_compile_option_builds_on_cpu_and_keeps_parameter_names(tiny_lm_dir):
    plain = CausalLM(tiny_lm_dir)
    plain.configure_model()
    compiled = CausalLM(tiny_lm_dir, compile=True)
    compiled.configure_model()
    assert compiled.training_compile is not None and len(compiled.training_compile.blocks) == 2
    assert list(compiled.state_dict()) == list(plain.state_dict())
    compiled.eval()  # evaluation runs eagerly (no compiler needed)
    batch = {"input_ids": torch.tensor([[1, 2, 3]]), "labels": torch.tensor([[-100, 2, 3]])}
    assert torch.isfinite(compiled.loss(batch)[0])


def test_optimizer_with_and_without_warmup(module):
    opt = module.configure_optimizers()
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["lr"] == 2e-4
    m = CausalLM(module.model_name_or_path, learning_rate=1e-3, weight_decay=0.1, warmup_steps=4)
    m.configure_model()
    cfg = m.configure_optimizers()
    sched = cfg["lr_scheduler"]["scheduler"]
    assert cfg["lr_scheduler"]["interval"] == "step" and cfg["optimizer"].defaults["weight_decay"] == 0.1
    lrs = []
    for _ in range(6):
        lrs.append(cfg["optimizer"].param_groups[0]["lr"])
        cfg["optimizer"].step()
        sched.step()
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    for p in m.parameters():
        p.requires_grad_(False)
    with pytest.raises(TaskConfigError, match="no trainable parameter"):
        m.configure_optimizers()


def _trainer(tmp_path, callbacks, **kwargs):
    args = dict(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_progress_bar=False,
                enable_model_summary=False, default_root_dir=str(tmp_path), num_sanity_val_steps=0,
                limit_val_batches=1, callbacks=callbacks)
    args.update(kwargs)
    return L.Trainer(**args)


def test_fit_with_callback_and_load_adapter_only_checkpoint(tiny_lm_dir, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    dm = InstructionDataModule(tokenizer=tiny_lm_dir, batch_size=4, system_prompt="Answer briefly.")
    module = CausalLM(tiny_lm_dir, learning_rate=1e-2, generate_max_new_tokens=4, gradient_checkpointing=True)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    report = AnswersReport(num_questions=3, max_new_tokens=4)
    trainer = _trainer(tmp_path, [LoRA(r=4, target_modules=["q_proj", "v_proj"], merge_on_fit_end=False), ckpt,
                                  report], limit_train_batches=2, max_epochs=1, max_steps=-1)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2
    # before/after answers: 3 questions each (the table itself: test_answers_report_alone_in_a_tiny_run)
    rows = report.answer_rows()
    assert len(rows) == 3 and all(isinstance(r.finetuned_answer, str) for r in rows)
    assert module.val_loss_after is not None and module.val_loss_after_step == 2
    trained = {k: v.clone() for k, v in lora_state_dict(module).items()}
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)

    saved = torch.load(ckpt.last_model_path, weights_only=False)
    assert saved["state_dict"] and all(".lora_" in k for k in saved["state_dict"])
    loaded = CausalLM.load_from_checkpoint(ckpt.last_model_path)
    assert has_lora(loaded)
    for key, value in lora_state_dict(loaded).items():
        torch.testing.assert_close(value, trained[key])


def test_tokenizer_mismatch_between_model_and_data_is_one_clear_error(tiny_lm_dir, tmp_path):
    from lightning_lora.hub import load_tokenizer

    other = tmp_path / "other-tokenizer"
    tokenizer = load_tokenizer(tiny_lm_dir)
    tokenizer.add_tokens(["<brand-new-token>"])
    tokenizer.save_pretrained(other)
    dm = InstructionDataModule(tokenizer=str(other), batch_size=2)
    trainer = _trainer(tmp_path, [LoRA(r=2)])
    with pytest.raises(TaskConfigError, match="--data.tokenizer"):
        trainer.fit(CausalLM(tiny_lm_dir), datamodule=dm)


@pytest.mark.parametrize("sanity_steps, expected", [(-1, True), (1, False), (0, False)])
def test_val_loss_before_comes_only_from_a_full_sanity_check(tiny_lm_dir, tmp_path, sanity_steps, expected):
    dm = InstructionDataModule(tokenizer=tiny_lm_dir, batch_size=4)
    module = CausalLM(tiny_lm_dir, num_generate_examples=0)
    trainer = _trainer(tmp_path, [LoRA(r=2, merge_on_fit_end=False)], num_sanity_val_steps=sanity_steps,
                       limit_val_batches=2, limit_train_batches=1, max_epochs=1, max_steps=-1)
    trainer.fit(module, datamodule=dm)
    assert (module.val_loss_before is not None) is expected
    assert module.val_loss_after is not None
    # the datamodule offers held-out questions, but the table is AnswersReport's job: CausalLM adds none
    assert not any(isinstance(cb, AnswersReport) for cb in trainer.callbacks)
    if expected:  # the same batches before and after one step at lr 2e-4: close, and exactly log(val_ppl)
        assert abs(module.val_loss_before - module.val_loss_after) < 0.5
    assert math.isclose(math.log(trainer.callback_metrics["val_ppl"].item()), module.val_loss_after, rel_tol=1e-5)
    assert math.isclose(trainer.callback_metrics["val_loss"].item(), module.val_loss_after, rel_tol=1e-5)


# ------------------------------------------------------------------------------------ AnswersReport


QUESTION_KEYS = ["question", "keywords", "base_answer", "finetuned_answer", "expected", "fact", "source",
                 "base_correct", "finetuned_correct"]
ANSWERS_KEYS = ["total", "base_correct", "finetuned_correct", "base_accuracy", "finetuned_accuracy",
                "val_loss_before", "val_loss_after", "val_loss_after_step", "model", "global_step", "resumed",
                "generate_max_new_tokens", "questions"]


def _prompts(dm, report):
    return [dm.encode_prompt(ex.get("messages") or ex["prompt"])[0].tolist()
            for ex in select_eval_examples(dm.eval_examples(), report.num_questions)]


def test_answers_report_alone_in_a_tiny_run(tiny_lm_dir, tmp_path, capsys):
    """The callback with no LoRA callback: before = the untrained model, after = the trained one; the
    table, the two summary lines, answers.json and the TensorBoard text."""
    from lightning.pytorch.loggers import TensorBoardLogger

    dm = InstructionDataModule(tokenizer=tiny_lm_dir, batch_size=4, system_prompt="Answer briefly.")
    module = CausalLM(tiny_lm_dir, learning_rate=1e-2, num_generate_examples=0)
    report = AnswersReport(num_questions=3, max_new_tokens=4)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = _trainer(tmp_path, [report], logger=logger, num_sanity_val_steps=-1, limit_val_batches=2,
                       limit_train_batches=2, max_epochs=1, max_steps=-1)
    trainer.fit(module, datamodule=dm)
    out = capsys.readouterr().out
    assert [cb for cb in trainer.callbacks if isinstance(cb, AnswersReport)] == [report]

    dm.setup("fit")
    prompts = _prompts(dm, report)
    fresh = CausalLM(tiny_lm_dir)
    fresh.configure_model()
    rows = report.answer_rows()
    assert [r.base_answer for r in rows] == generate_answers(fresh.model, fresh.tokenizer, prompts, 4)
    assert [r.finetuned_answer for r in rows] == generate_answers(module.model, module.tokenizer, prompts, 4)
    assert [r.base_answer for r in rows] != [r.finetuned_answer for r in rows]  # lr 1e-2: the model changed

    path = Path(logger.log_dir) / "answers.json"
    assert report.path == path
    data = json.loads(path.read_text())
    assert list(data) == ANSWERS_KEYS
    assert [list(q) for q in data["questions"]] == [QUESTION_KEYS] * 3
    expected_summary = answers_summary(rows, module.val_loss_before, module.val_loss_after)
    assert {k: data[k] for k in expected_summary} == expected_summary
    assert data["val_loss_before"] is not None and data["val_loss_after"] is not None
    assert (data["total"], data["val_loss_after_step"], data["global_step"], data["resumed"],
            data["generate_max_new_tokens"], data["model"]) == (3, 2, 2, False, 4, tiny_lm_dir)
    assert [q["question"] for q in data["questions"]] == [r.question for r in rows]

    lines = out.splitlines()
    title = "3 held-out questions, before and after fine-tuning (2 steps)"
    assert any(line.strip() == title for line in lines), out
    first, second = summary_lines(report.summary)
    assert first == (f"base: {data['base_correct']}/3 answers contain the right fact, "
                     f"fine-tuned: {data['finetuned_correct']}/3")
    assert second == f"val loss: {data['val_loss_before']:.3f} -> {data['val_loss_after']:.3f}"
    assert lines[-3:] == [first, second, f"answers written to {path}"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logger.log_dir), size_guidance={"tensors": 0})
    acc.Reload()
    text = acc.Tensors("answers/before_after/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert text.startswith(f"{first}\n\n{second}\n\n| question | expected | base | fine-tuned |")


def test_answers_report_answers_after_training_before_the_merge(tiny_lm_dir, tmp_path):
    """The fine-tuned answers are taken at train end, while the adapters are still separate (the LoRA
    callback merges at fit end): a callback that runs first at fit end sees them already there."""
    from lightning.pytorch.callbacks import Callback

    from lightning_lora.surgery import has_lora

    seen = {}

    class FirstAtFitEnd(Callback):
        def on_fit_end(self, trainer, pl_module):
            seen["answers"], seen["lora"] = list(report._finetuned_answers), has_lora(pl_module)

    dm = InstructionDataModule(tokenizer=tiny_lm_dir, batch_size=4, system_prompt="Answer briefly.")
    module = CausalLM(tiny_lm_dir, learning_rate=1e-2, num_generate_examples=0)
    report = AnswersReport(num_questions=2, max_new_tokens=3)
    trainer = _trainer(tmp_path, [FirstAtFitEnd(), LoRA(r=2), report], limit_train_batches=1, max_epochs=1,
                       max_steps=-1)
    trainer.fit(module, datamodule=dm)
    assert seen["lora"] and len(seen["answers"]) == 2
    assert not has_lora(module)  # merged afterwards; the merged model gives the same answers
    dm.setup("fit")
    assert generate_answers(module.model, module.tokenizer, _prompts(dm, report), 3) == seen["answers"]


def test_answers_report_arguments_and_what_it_needs(tiny_lm_dir, tmp_path, caplog):
    with pytest.raises(TaskConfigError, match=r"AnswersReport\(num_questions=-1\); expected 0 \(all questions\)"):
        AnswersReport(num_questions=-1)
    with pytest.raises(TaskConfigError, match=r"AnswersReport\(max_new_tokens=0\); expected 1 or more tokens"):
        AnswersReport(max_new_tokens=0)
    # a module without a generating model and a tokenizer: one clear error
    from lit_models import TinyLlamaModule, TokenData

    class WithQuestions(TokenData):
        def eval_examples(self):
            return [{"prompt": "Who?", "keywords": ["me"]}]

        def encode_prompt(self, prompt):
            return torch.tensor([[1, 2, 3]])

    trainer = _trainer(tmp_path, [AnswersReport()])
    with pytest.raises(TaskConfigError, match="AnswersReport needs a LightningModule with a `model` that can "
                                              "`generate`.*TinyLlamaModule has model=LlamaForCausalLM, "
                                              "tokenizer=NoneType"):
        trainer.fit(TinyLlamaModule(), datamodule=WithQuestions())
    # a datamodule without questions: one info line, no table, no error
    import logging

    report = AnswersReport()
    with caplog.at_level(logging.INFO):
        _trainer(tmp_path, [report]).fit(CausalLM(tiny_lm_dir, num_generate_examples=0),
                                         train_dataloaders=_loader(tiny_lm_dir))
    assert "AnswersReport: the datamodule has no eval_examples()/encode_prompt(); no before/after table." \
        in caplog.text
    assert report.answer_rows() == [] and report.summary is None and report.path is None


def _loader(tiny_lm_dir):
    dm = InstructionDataModule(tokenizer=tiny_lm_dir, batch_size=4)
    dm.setup("fit")
    return dm.train_dataloader()


# ------------------------------------------------------------------ a token-weighted loss per optimizer step
class _StepGrads(L.Callback):
    """The adapters' gradients as the optimizer (and every callback after CausalLM's rescale) sees them."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})


def _examples() -> list[dict[str, torch.Tensor]]:
    """Two examples of very different target counts (4 and 15): a mean of micro-batch means weighs them alike."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for length, prompt in ((9, 5), (20, 5)):
        ids = torch.randint(5, 1000, (1, length), generator=gen)
        labels = ids.clone()
        labels[:, :prompt] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def _pad(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    width = max(b["input_ids"].shape[1] for b in batches)
    fill = {"input_ids": 0, "attention_mask": 0, "labels": -100}
    return {k: torch.cat([torch.nn.functional.pad(b[k], (0, width - b[k].shape[1]), value=fill[k]) for b in batches])
            for k in fill}


@pytest.mark.parametrize("chunked", [True, False])
def test_two_micro_batches_update_as_one_batch_of_both(tiny_lm_dir, tmp_path, chunked):
    """accumulate_grad_batches=2 over [a], [b] gives the gradient of one batch [a, b]: the mean over all 19 target
    tokens of the step, and train_loss is that mean."""
    examples = _examples()
    runs = []
    for batches, accumulate in (([_pad(examples)], 1), ([examples[0], examples[1]], 2)):
        torch.manual_seed(0)                      # the same random A in both runs
        module = CausalLM(tiny_lm_dir, chunked_loss=chunked, num_generate_examples=0)
        grads = _StepGrads()
        trainer = L.Trainer(max_steps=1, accumulate_grad_batches=accumulate, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                            callbacks=[LoRA(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]), grads])
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
        assert len(grads.grads) == 1
        runs.append((grads.grads[0], float(trainer.callback_metrics["train_loss"])))
    (one, loss_one), (two, loss_two) = runs
    assert sorted(one) == sorted(two) and len(one) == 8
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6)
    assert loss_one == pytest.approx(loss_two, rel=1e-6)
    # and it is the token mean (19 targets), not the mean of the two micro-batch means
    fresh = CausalLM(tiny_lm_dir)
    fresh.configure_model()
    with torch.no_grad():
        sums = [fresh.loss_sum(b) for b in examples]
    token_mean = float(sum(s for s, _ in sums) / sum(n for _, n in sums))
    mean_of_means = float(sum(s / n for s, n in sums) / 2)
    assert [int(n) for _, n in sums] == [4, 15]
    assert loss_two == pytest.approx(token_mean, rel=1e-5) and abs(token_mean - mean_of_means) > 1e-3


TOKEN_MEAN_DDP = """
import sys, torch, lightning as L
from lightning_lora import LoRA
from lightning_lora.tasks import CausalLM
from test_tasks import _StepGrads, _examples
model_dir, out = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
grads = _StepGrads()
trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                    enable_model_summary=False, enable_checkpointing=False, default_root_dir=out,
                    callbacks=[LoRA(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"],
                                    merge_on_fit_end=False), grads])
module = CausalLM(model_dir, num_generate_examples=0)
trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(_examples(), batch_size=None))
if trainer.is_global_zero:
    torch.save({"grads": grads.grads[0], "loss": float(trainer.callback_metrics["train_loss"])}, out + "/ddp.pt")
if torch.distributed.is_initialized():  # stop gloo's threads before the interpreter exits (else: std::terminate)
    torch.distributed.destroy_process_group()
"""


@pytest.mark.integration
def test_two_ddp_ranks_update_as_one_batch_of_both(tiny_lm_dir, tmp_path):
    """Rank 0 learns 4 target tokens, rank 1 15: the averaged gradient is the mean over all 19 (as one process
    with the batch of both), not the mean of the ranks' means."""
    run_ddp_script(tmp_path, TOKEN_MEAN_DDP, tiny_lm_dir, str(tmp_path))
    ddp = torch.load(tmp_path / "ddp.pt")
    torch.manual_seed(0)
    module = CausalLM(tiny_lm_dir, num_generate_examples=0)
    grads = _StepGrads()
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[LoRA(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]), grads])
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([_pad(_examples())], batch_size=None))
    assert sorted(ddp["grads"]) == sorted(grads.grads[0])
    for name, g in grads.grads[0].items():
        torch.testing.assert_close(ddp["grads"][name], g, rtol=1e-5, atol=1e-6)
    assert ddp["loss"] == pytest.approx(float(trainer.callback_metrics["train_loss"]), rel=1e-6)


class _StopAfterFirstMicroBatch(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        trainer.should_stop = True   # as Timer (max_time) does: the fit ends in the middle of the accumulation window


def test_a_fit_stopped_mid_window_leaves_nothing_to_the_next(tiny_lm_dir, tmp_path):
    """The first fit stops after 1 of 2 micro-batches (its tokens are counted but never stepped); the next fit of
    the same module computes the same gradient as a fresh module."""
    examples = _examples()
    runs = []
    for interrupted_first in (False, True):
        torch.manual_seed(0)
        module = CausalLM(tiny_lm_dir, num_generate_examples=0)
        if interrupted_first:
            stop = L.Trainer(max_steps=1, accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                             callbacks=[LoRA(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"],
                                             merge_on_fit_end=False), _StopAfterFirstMicroBatch()])
            stop.fit(module, train_dataloaders=torch.utils.data.DataLoader(examples, batch_size=None))
            assert stop.global_step == 0 and int(module._step_tokens) == 4    # counted, never stepped
        grads = _StepGrads()
        trainer = L.Trainer(max_steps=1, accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                            callbacks=[LoRA(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]), grads])
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(examples, batch_size=None))
        runs.append((grads.grads[0], float(trainer.callback_metrics["train_loss"])))
    (fresh, loss_fresh), (again, loss_again) = runs
    assert loss_again == pytest.approx(loss_fresh, rel=1e-6)
    for name in fresh:
        torch.testing.assert_close(again[name], fresh[name], rtol=1e-5, atol=1e-7)
