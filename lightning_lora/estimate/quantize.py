"""Bytes of a frozen weight stored in 4 bits (QLoRA), and of its dequantisation in the forward.

Two layouts are counted exactly, tensor by tensor, as the libraries build them:

* `nf4` -- torchao's `to_nf4(weight, block_size=64, scaler_block_size=256)` (torchao 0.18.0,
  `torchao/quantization/quantize_/workflows/nf4/nf4_tensor.py`, re-exported as
  `torchao.dtypes.nf4tensor`), for a weight of `n` elements in a dtype of `d` bytes:

  | inner tensor | dtype | elements |
  | --- | --- | --- |
  | `quantized_data` (two 4-bit codes per byte) | uint8 | n / 2 |
  | `quantized_scalers` (one absmax per block of 64, minus their mean, quantised) | int8 | n / 64 |
  | `quantization_factor` (one per block of 256 scalers) | the weight's | n / 16384 |
  | `scaler_mean` | the weight's | 1 |
  | `nf4` (the 16-value lookup table, one per tensor) | the weight's | 16 |

  `to_nf4` asserts `n % 64 == 0` and `(n / 64) % 256 == 0` (n a multiple of 16,384); a weight that is
  not is left unquantised. Under FSDP2 the first three are split over the ranks, the last two are
  replicated. The forward (`linear_nf4`, also behind `F.linear` on an `NF4Tensor`) dequantises with
  `NF4Tensor.get_original_weight`, which in eager mode holds, at its peak, both int64 index tensors
  (n / 2 elements each), the two looked-up halves, the two scaled halves and the stacked result:
  `n * (8 + 3 d)` bytes (14 bytes per weight in bf16), plus the dequantised scalers; the backward
  dequantises again. (`torch.compile` fuses this away; the estimate counts eager.)

* `bnb-nf4` -- bitsandbytes' `Params4bit` (`Linear4bit`, what `BitsAndBytesConfig(load_in_4bit=True,
  bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)` builds; bitsandbytes 0.50.2,
  `functional.quantize_4bit` with `compress_statistics=True`):

  | tensor | dtype | elements |
  | --- | --- | --- |
  | packed weight (`quant_storage=uint8`) | uint8 | ceil(n / 2) |
  | `absmax` (one per block of 64, minus their mean, 8-bit blockwise-quantised) | uint8 | b = ceil(n / 64) |
  | `state2.absmax` (one per block of 256 absmax values) | fp32 | ceil(b / 256) |
  | `state2.code` (the 8-bit dynamic map, copied per tensor) | fp32 | 256 |
  | `offset` (the absmax mean) | fp32 | 1 |
  | `code` (the NF4 table, one per tensor) | fp32 | 16 |

  Any size is accepted. Under FSDP only the packed weight is a sharded parameter; the quantisation
  state stays on every rank. The CUDA matmul at more than 1536 tokens (and the backward at any size)
  dequantises the absmax to fp32 (twice, in the forward fallback) and the weight to the compute
  dtype: `n * c + 8 * b` bytes at most.

Example:
    >>> nf4 = nf4_layout(1024 * 4096, dtype_bytes=2)       # a Llama-3-8B v_proj in bf16
    >>> nf4.packed, nf4.scales, nf4.replicated, nf4.total
    (2097152, 66048, 34, 2163234)
    >>> bnb_nf4_layout(1024 * 4096).total
    2164804
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_lora.errors import LoRAError

#: `--quantize` choices: torchao's NF4 tensor, bitsandbytes' 4-bit NF4 parameter
QUANTIZE = ("nf4", "bnb-nf4")
#: which linear layers hold a 4-bit weight: the adapted ones, or every linear layer except the output head
QUANTIZE_MODULES = ("adapted", "all-linear")
NF4_BLOCK_SIZE = 64
NF4_SCALER_BLOCK_SIZE = 256
BNB_BLOCK_SIZE = 64
BNB_NESTED_BLOCK_SIZE = 256


@dataclass(frozen=True)
class QuantLayout:
    """Bytes of one 4-bit weight: `packed` codes and `scales` (split over FSDP ranks) and
    `replicated` per-tensor state (on every rank).

    Example:
        >>> QuantLayout(packed=8, scales=2, replicated=34, shardable_scales=True).total
        44
    """

    packed: int
    scales: int
    replicated: int
    shardable_scales: bool  # torchao shards its scalers with the data; bitsandbytes keeps them per rank

    @property
    def total(self) -> int:
        """All bytes of the quantised weight on one device (unsharded)."""
        return self.packed + self.scales + self.replicated

    def per_rank(self, world_size: int) -> int:
        """Bytes one of `world_size` FSDP ranks holds (the largest shard).

        Example:
            >>> nf4_layout(1024 * 4096, 2).per_rank(8)
            270434
        """
        if world_size <= 1:
            return self.total
        if self.shardable_scales:
            return -(-self.packed // world_size) + -(-self.scales // world_size) + self.replicated
        return -(-self.packed // world_size) + self.scales + self.replicated


def nf4_quantizable(numel: int) -> bool:
    """Whether torchao's `to_nf4` (blocks of 64, scaler blocks of 256) accepts a weight of `numel` elements.

    Example:
        >>> nf4_quantizable(4096 * 4096), nf4_quantizable(576 * 576)
        (True, False)
    """
    block = NF4_BLOCK_SIZE * NF4_SCALER_BLOCK_SIZE
    return numel > 0 and numel % block == 0


def nf4_layout(numel: int, dtype_bytes: int) -> QuantLayout:
    """torchao NF4 bytes of a weight of `numel` elements quantised from a `dtype_bytes`-byte dtype.

    Raises:
        LoRAError: `numel` is not a multiple of 64 x 256 (torchao's `to_nf4` refuses it).

    Example:
        >>> nf4_layout(4096 * 4096, 2).total     # 8,388,608 + 262,144 + 2,048 + 34
        8652834
    """
    if not nf4_quantizable(numel):
        raise LoRAError(f"a weight of {numel} elements cannot be stored as torchao NF4: to_nf4 needs a multiple "
                        f"of {NF4_BLOCK_SIZE} x {NF4_SCALER_BLOCK_SIZE} = {NF4_BLOCK_SIZE * NF4_SCALER_BLOCK_SIZE}.")
    n_blocks = numel // NF4_BLOCK_SIZE
    n_scaler_blocks = n_blocks // NF4_SCALER_BLOCK_SIZE
    return QuantLayout(packed=numel // 2, scales=n_blocks + n_scaler_blocks * dtype_bytes,
                       replicated=dtype_bytes + 16 * dtype_bytes, shardable_scales=True)


def bnb_nf4_layout(numel: int) -> QuantLayout:
    """bitsandbytes `Params4bit` bytes (NF4, blocksize 64, nested absmax blocksize 256, uint8 storage).

    Example:
        >>> bnb_nf4_layout(4096 * 4096).total    # 8,388,608 + 262,144 + 4,096 + 1,024 + 4 + 64
        8655940
    """
    blocks = -(-numel // BNB_BLOCK_SIZE)
    nested = -(-blocks // BNB_NESTED_BLOCK_SIZE)
    return QuantLayout(packed=-(-numel // 2), scales=blocks + 4 * nested, replicated=4 * 256 + 4 + 4 * 16,
                       shardable_scales=False)


def quant_layout(method: str, numel: int, dtype_bytes: int) -> QuantLayout:
    """The layout of `method` (`"nf4"` or `"bnb-nf4"`).

    Example:
        >>> quant_layout("bnb-nf4", 64, 2).packed
        32
    """
    if method == "nf4":
        return nf4_layout(numel, dtype_bytes)
    if method == "bnb-nf4":
        return bnb_nf4_layout(numel)
    raise LoRAError(f"quantize={method!r} is not supported; expected one of {', '.join(QUANTIZE)}.")


def dequant_transient(method: str, numel: int, dtype_bytes: int, compute_bytes: int) -> int:
    """Peak bytes allocated while one 4-bit weight is dequantised for a matmul (freed right after).

    Example:
        >>> dequant_transient("nf4", 4096 * 4096, 2, 2)          # 14 bytes per weight + scalers
        235405312
        >>> dequant_transient("bnb-nf4", 4096 * 4096, 2, 2)      # bf16 weight + 2 fp32 absmax copies
        35651584
    """
    if method == "nf4":
        n_blocks = numel // NF4_BLOCK_SIZE
        # get_original_weight: 2 int64 index halves, 2 looked-up + 2 scaled halves, the stacked result,
        # plus the dequantised scalers; a cast to the compute dtype if it differs
        out = numel * (8 + 3 * dtype_bytes) + n_blocks * dtype_bytes
        return out + (numel * compute_bytes if compute_bytes != dtype_bytes else 0)
    blocks = -(-numel // BNB_BLOCK_SIZE)
    return numel * compute_bytes + 8 * blocks


__all__ = ["NF4_BLOCK_SIZE", "NF4_SCALER_BLOCK_SIZE", "QUANTIZE", "QUANTIZE_MODULES", "QuantLayout",
           "bnb_nf4_layout", "dequant_transient", "nf4_layout", "nf4_quantizable", "quant_layout"]
