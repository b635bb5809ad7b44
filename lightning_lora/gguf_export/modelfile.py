"""The Ollama `Modelfile` next to a model GGUF (`write_modelfile`, `ollama_template`)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning_lora.gguf_export._common import _AtomicFile

# ====================================================================== Ollama Modelfile
#: (marker in the Jinja chat template, Ollama Go template, stop tokens)
_OLLAMA_TEMPLATES: list[tuple[str, str, list[str]]] = [
    ("<|im_start|>",
     "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
     ["<|im_start|>", "<|im_end|>"]),
    ("<|start_header_id|>",
     ("{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
      "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"),
     ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    ("<start_of_turn>",  # Gemma has no system turn: its template puts a system message into a user turn
     ("{{- range .Messages }}<start_of_turn>{{ if eq .Role \"assistant\" }}model{{ else }}user{{ end }}\n"
      "{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n"),
     ["<start_of_turn>", "<end_of_turn>"]),
    ("[INST]",
     ("{{- range .Messages }}{{ if eq .Role \"user\" }}[INST] {{ .Content }} [/INST]{{ else if eq .Role "
      "\"assistant\" }}{{ .Content }}</s>{{ end }}{{ end }}"),
     ["[INST]", "[/INST]"]),
]


def ollama_template(chat_template: str | None) -> tuple[str | None, list[str]]:
    """Ollama's Go template and stop tokens for a Jinja chat template of a known format (ChatML,
    Llama 3, Gemma, Mistral [INST]); `(None, [])` for another format (Ollama then uses the template it
    detects from the GGUF's `tokenizer.chat_template`).

    Example:
        >>> ollama_template("{{ '<|im_start|>' + m['role'] }}")[1]
        ['<|im_start|>', '<|im_end|>']
    """
    for marker, template, stops in _OLLAMA_TEMPLATES:
        if chat_template and marker in chat_template:
            return template, list(stops)
    return None, []


def _system_prompt(chat_template: str | None) -> str | None:
    """A default system prompt the Jinja template inserts (SmolLM2's), so Ollama's matches it."""
    if not chat_template:
        return None
    found = re.search(r"<\|im_start\|>system(?:\\n|\n)([^'\"{}+]+?)<\|im_end\|>", chat_template)
    return found.group(1) if found else None


def write_modelfile(gguf_path: str | os.PathLike, tokenizer: Any = None, chat_template: str | None = None,
                    overwrite: bool = False) -> Path:
    """Write an Ollama `Modelfile` next to `gguf_path` (atomically): `FROM ./<file>`, the chat template
    in Ollama's syntax and `PARAMETER stop` lines (the end-of-turn markers and the tokenizer's eos), so
    `ollama create NAME -f Modelfile` works in that directory as it stands.

    Returns:
        The path of the Modelfile.

    Example:
        >>> write_modelfile("out/model.q8_0.gguf", tokenizer)   # doctest: +SKIP
        PosixPath('/abs/out/Modelfile')
    """
    gguf_path = Path(gguf_path).expanduser().absolute()
    template_text = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    if isinstance(template_text, Mapping):
        template_text = template_text.get("default") or next(iter(template_text.values()), None)
    template, stops = ollama_template(template_text)
    eos = getattr(tokenizer, "eos_token", None)
    if eos and eos not in stops:
        stops.append(eos)
    lines = ["# Ollama Modelfile written by lightning-lora; in this directory run: ollama create NAME -f Modelfile",
             f"FROM ./{gguf_path.name}"]
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
        system = _system_prompt(template_text)
        if system:
            lines.append(f'SYSTEM """{system}"""')
    else:
        lines.append("# chat template: Ollama reads it from the GGUF's tokenizer.chat_template")
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in stops]
    out = _AtomicFile.open(gguf_path.parent / "Modelfile", overwrite)
    try:
        out.tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return out.commit()
    finally:
        out.discard()


