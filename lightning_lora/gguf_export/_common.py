"""Shared pieces of the GGUF export: the supported architectures, outtypes, thresholds, `require_gguf`, and
the atomic file writer every artifact goes through."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_lora.errors import (
    LoRAError,
    OutputExistsError,
    UnsupportedArchitectureError,
    require_module,
)

#: transformers `model_type` -> llama.cpp `general.architecture`
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
}
#: `--outtype` values -> llama.cpp's `general.file_type` (`gguf.LlamaFileType`)
OUTTYPES: dict[str, int] = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}
#: the minimum cosine between the merged model's logits and the reloaded file's
MIN_COSINE: dict[str, float] = {"f32": 0.9999, "f16": 0.9999, "bf16": 0.9999, "q8_0": 0.999}
#: the text whose token ids must be the same with the original tokenizer and the one read from the file
TOKENIZER_CHECK_TEXT = "Hello world! 1234 <|im_start|> naïve café 🙂\n\tindent"
#: architectures whose q/k projection rows llama.cpp permutes (its rotary embedding pairs adjacent dims)
_PERMUTE_QK = {"llama"}
#: architectures whose RMSNorm weights llama.cpp stores as `1 + w` (Gemma's norm computes `x * (1 + w)`)
_NORM_PLUS_ONE = {"gemma2", "gemma3"}


def require_gguf() -> Any:
    """The `gguf` module, or a `MissingDependencyError` naming the install command.

    Example:
        >>> require_gguf().__name__
        'gguf'
    """
    return require_module("gguf", "Writing GGUF files needs the gguf package, which is not installed; install "
                                  "it with: pip install gguf")


def gguf_architecture(config: Any) -> str:
    """llama.cpp's architecture name for a transformers config.

    Raises:
        UnsupportedArchitectureError: the model type is not one of `SUPPORTED_ARCHITECTURES`.

    Example:
        >>> from transformers import MistralConfig
        >>> gguf_architecture(MistralConfig())
        'llama'
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"model_type={model_type!r} cannot be written as GGUF; supported architectures: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}. Merge to a transformers directory instead (--format hf) and "
            "convert it with llama.cpp's convert_hf_to_gguf.py.")
    return SUPPORTED_ARCHITECTURES[model_type]


def check_outtype(outtype: str) -> str:
    """`outtype` when it is one of `OUTTYPES`, else a `LoRAError` naming them.

    Example:
        >>> check_outtype("q8_0")
        'q8_0'
    """
    if outtype not in OUTTYPES:
        raise LoRAError(f"outtype={outtype!r} is not supported; expected one of {', '.join(OUTTYPES)}, e.g. "
                        "outtype='q8_0'.")
    return outtype


@dataclass
class _AtomicFile:
    """A temporary file next to `target`, renamed onto it by `commit` (removed by `discard`)."""

    target: Path
    tmp: Path

    @classmethod
    def open(cls, target: str | os.PathLike, overwrite: bool) -> _AtomicFile:
        target = Path(target).expanduser().absolute()
        if target.exists() and not overwrite:
            raise OutputExistsError(f"{target} already exists; pass overwrite=True (--overwrite) to replace it, or "
                                    "choose another file name.")
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
        os.close(fd)
        return cls(target, Path(tmp))

    def commit(self) -> Path:
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(self.tmp, 0o666 & ~mask)
        os.replace(self.tmp, self.target)
        return self.target

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)
