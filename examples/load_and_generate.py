"""Answer a question with a fine-tuned model: a PEFT adapter on its base, or a merged model.

    python examples/load_and_generate.py --adapter runs/quickstart/adapter "Who founded Brindlewhisk Robotics?"
    python examples/load_and_generate.py --merged runs/quickstart/merged "Who founded Brindlewhisk Robotics?"

`--adapter` loads the base model named in the adapter's `adapter_config.json` (or `--base`) and
injects the adapter with `load_adapter`; `--merged` is plain transformers
(`AutoModelForCausalLM.from_pretrained`), no lightning-lora needed to use it.
The prompt is formatted like the training data: the model's chat template with the same system prompt.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

SYSTEM_PROMPT = "Answer briefly."  # the quickstart config and train_with_callback.py train with this one


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--adapter", help="PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")
    source.add_argument("--merged", help="merged model directory (config.json, model.safetensors, tokenizer files)")
    parser.add_argument("--base", help="base model for --adapter (default: base_model_name_or_path in "
                                       "adapter_config.json)")
    parser.add_argument("--system-prompt", default=SYSTEM_PROMPT, help="'' for the chat template's default")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("question", nargs="+", help="the question (quotes optional)")
    return parser.parse_args(argv)


def load(args: argparse.Namespace) -> tuple[torch.nn.Module, object]:
    """(model, tokenizer) from --merged or --adapter."""
    if args.merged:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not (Path(args.merged) / "config.json").is_file():
            raise FileNotFoundError(f"--merged {args.merged}: no config.json there; pass the merged_dir of a LoRA run.")
        return AutoModelForCausalLM.from_pretrained(args.merged), AutoTokenizer.from_pretrained(args.merged)

    from lightning_lora import load_adapter
    from lightning_lora.hub import load_causal_lm, load_tokenizer

    config_file = Path(args.adapter) / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"--adapter {args.adapter}: no adapter_config.json there; pass the adapter_dir "
                                "of a LoRA run (PEFT format).")
    base = args.base or json.loads(config_file.read_text()).get("base_model_name_or_path")
    if not base:
        raise FileNotFoundError(f"{config_file} names no base model; pass --base NAME_OR_PATH.")
    model = load_causal_lm(base)
    load_adapter(model, args.adapter)  # injects the LoRA layers and loads their weights
    return model, load_tokenizer(base)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    question = " ".join(args.question)
    try:
        model, tokenizer = load(args)
    except (FileNotFoundError, ValueError) as err:  # ModelNotFoundError, AdapterFormatError are among these
        print(f"load_and_generate: error: {err}", file=sys.stderr)
        return 2
    model.eval()
    messages = [{"role": "user", "content": question}]
    if args.system_prompt:
        messages.insert(0, {"role": "system", "content": args.system_prompt})
    input_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                              return_dict=True)["input_ids"]
    with torch.no_grad():
        output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True).strip()
    print(f"Q: {question}\nA: {answer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
