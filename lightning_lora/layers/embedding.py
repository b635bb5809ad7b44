"""The adapter layer around `nn.Embedding` (`LoRAEmbedding`).

Example:
    >>> from torch import nn
    >>> LoRAEmbedding.peft_layer_type, LoRAEmbedding.features(nn.Embedding(100, 16))
    ('embedding', (100, 16))
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lora.errors import LoRAError
from lightning_lora.layers.base import LoRALayer


class LoRAEmbedding(LoRALayer):
    """LoRA around `nn.Embedding`: `E[x] + scaling * (A^T[x]) B^T` (no dropout on token ids).

    A has shape (r, num_embeddings) and B (embedding_dim, r), stored as `lora_A.weight` and
    `lora_B.weight`; PEFT calls them `lora_embedding_A` and `lora_embedding_B`. DoRA and PiSSA/OLoRA are
    refused (their `layer_types` do not include "embedding").

    Example:
        >>> import torch
        >>> layer = LoRAEmbedding(nn.Embedding(100, 16), r=4, alpha=8)
        >>> layer(torch.tensor([[1, 2]])).shape
        torch.Size([1, 2, 16])
    """

    _base_attrs = ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                   "scale_grad_by_freq", "sparse")
    peft_layer_type: ClassVar[str] = "embedding"

    def __init__(self, base: nn.Embedding, r: int, alpha: float, **kwargs: Any) -> None:
        kwargs["dropout"] = 0.0
        super().__init__(base, *type(self).features(base), r, alpha, **kwargs)

    @classmethod
    def features(cls, base: nn.Module) -> tuple[int, int]:
        return int(base.num_embeddings), int(base.embedding_dim)

    @classmethod
    def delta_from(cls, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
        return super().delta_from(a, b, scaling).T

    @classmethod
    def peft_tensor_names(cls) -> dict[str, str]:
        return {"lora_A.weight": "lora_embedding_A", "lora_B.weight": "lora_embedding_B"}

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        after_a = F.embedding(x, self.lora_A.weight.T, self.padding_idx, self.max_norm, self.norm_type,
                              self.scale_grad_by_freq, self.sparse)
        return self.lora_B(after_a) * self.scaling

    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "kaiming") -> None:
        """A zero and B ~ N(0, 1), for either `init` (PEFT's and loralib's embedding initialisation:
        the update starts at zero either way)."""
        if init not in ("kaiming", "gaussian"):
            raise LoRAError(f"init={init!r} is invalid; expected 'kaiming' or 'gaussian'.")
        nn.init.zeros_(self.lora_A.weight)
        nn.init.normal_(self.lora_B.weight)


__all__ = ["LoRAEmbedding"]
