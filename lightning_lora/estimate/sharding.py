"""Per-device memory over several GPUs: DDP replicas and FSDP2 (`fully_shard`) shards.

FSDP is counted as PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`, what Lightning's
`ModelParallelStrategy` applies) lays it out:

* every parameter is split along dim 0 into `world_size` chunks padded to equal size, so each rank
  holds `ceil(rows / world_size)` rows (`shard_bytes`); gradients (reduce-scattered) and optimizer
  state follow the parameter shards;
* units (`fully_shard` groups) are the decoder layers, the input embedding and the output head (as
  torchtune's and LitGPT's recipes wrap them), and the root (final norm and anything else), which
  FSDP2 does not reshard after forward;
* in flight at once: the root unsharded, the unit computing and the next one being all-gathered
  (FSDP2's forward prefetch / one-unit backward prefetch), and one unit's unsharded gradients
  before its reduce-scatter (`in_flight`).

DDP keeps a full replica per GPU plus its gradient buckets (`gradient_as_bucket_view=False`,
Lightning's default): one more copy of the trainable parameters' gradients.

Example:
    >>> shard_bytes(numel=1024 * 8192, rows=1024, elem=2, world_size=8)   # a 70B k_proj
    2097152
    >>> in_flight(["embed", "layer.0", "layer.1", "head"], {"embed": 5, "layer.0": 3, "layer.1": 3, "head": 6},
    ...           root=1, unit_grads={"layer.0": 2})
    12
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise

from lightning_lora.errors import LoRAError

#: `--strategy` choices: `auto` = one device, or DDP over several (Lightning's default)
STRATEGIES = ("auto", "ddp", "fsdp")


@dataclass(frozen=True)
class Layout:
    """How the model is spread: `strategy` is `single`, `ddp` or `fsdp` over `devices` GPUs.

    Example:
        >>> Layout.resolve("auto", 8), Layout.resolve("fsdp", 8).world_size
        (Layout(strategy='ddp', devices=8), 8)
    """

    strategy: str = "single"
    devices: int = 1

    @property
    def world_size(self) -> int:
        """How many ranks share each parameter (FSDP), else 1."""
        return self.devices if self.strategy == "fsdp" else 1

    @classmethod
    def resolve(cls, strategy: str, devices: int) -> Layout:
        """Validate `--strategy` / `--devices`: `auto` is one device, or DDP over several.

        Raises:
            LoRAError: an unknown strategy or a device count that is not an integer >= 1.
        """
        if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
            raise LoRAError(f"devices={devices!r} is invalid; expected an integer >= 1 (GPUs in the run).")
        if strategy not in STRATEGIES:
            raise LoRAError(f"strategy={strategy!r} is not supported; expected one of {', '.join(STRATEGIES)}.")
        if strategy == "auto":
            return cls("single" if devices == 1 else "ddp", devices)
        return cls(strategy, devices)


def shard_bytes(numel: int, rows: int, elem: int, world_size: int) -> int:
    """Bytes of the largest dim-0 shard of a tensor (`numel` elements, `rows` along dim 0) on one rank.

    Example:
        >>> shard_bytes(numel=10, rows=10, elem=4, world_size=4)   # ceil(10 / 4) = 3 rows of 4 bytes
        12
    """
    if world_size <= 1 or rows <= 0:
        return numel * elem
    return -(-rows // world_size) * (numel // rows) * elem


def in_flight(order: Sequence[str], unsharded: Mapping[str, int], root: int,
              unit_grads: Mapping[str, int]) -> int:
    """Bytes FSDP holds unsharded at once: the root, the worst pair of consecutive units (the one
    computing and the one being all-gathered), and the largest unit's unsharded gradients.

    Example:
        >>> in_flight(["a", "b", "c"], {"a": 1, "b": 4, "c": 2}, root=0, unit_grads={})
        6
    """
    units = [u for u in order if unsharded.get(u, 0)]
    pair = max((unsharded[a] + (unsharded[b] if b != a else 0) for a, b in pairwise(units)), default=0)
    pair = max(pair, max((unsharded[u] for u in units), default=0))
    return root + pair + max(unit_grads.values(), default=0)


__all__ = ["STRATEGIES", "Layout", "in_flight", "shard_bytes"]
