"""The adapter layers around `nn.Conv1d`, `nn.Conv2d` and `nn.Conv3d` (`LoRAConv1d`, `LoRAConv2d`, `LoRAConv3d`).

PEFT's layout (`peft.tuners.lora.layer._ConvNd`): A is a convolution with the base layer's kernel, stride,
padding (and, ours only, dilation) from `in_channels` to `r` channels, without groups; B is a 1x1 convolution
from `r` to `out_channels` with the base layer's `groups`. The layer computes

    h = conv(x, W) + b + scaling * B(A(dropout(x)))

and merging adds `scaling * einsum("or,ri...->oi...", B, A)` to the kernel (`delta_from`). A grouped conv
(`groups > 1`) needs `r` divisible by `groups` and cannot be merged: the delta of a full A and a grouped B is
not a grouped kernel. DoRA works as PEFT's `DoraConv{1,2,3}dLayer` (magnitude stored as `(1, out, 1, ...)`,
the norm over all dimensions but the output channel), except on grouped convs; PiSSA/OLoRA are refused.

Example:
    >>> import torch
    >>> from torch import nn
    >>> layer = LoRAConv2d(nn.Conv2d(3, 8, 3, stride=2, padding=1), r=4, alpha=8)
    >>> tuple(layer.lora_A.weight.shape), tuple(layer.lora_B.weight.shape), layer.stride
    ((4, 3, 3, 3), (8, 4, 1, 1), (2, 2))
    >>> layer(torch.randn(1, 3, 8, 8)).shape
    torch.Size([1, 8, 4, 4])
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lora.errors import LoRAError
from lightning_lora.layers.base import LoRALayer


class LoRAConvNd(LoRALayer):
    """LoRA around a convolution of `spatial_dims` dimensions (the base of `LoRAConv1d/2d/3d`).

    The layer answers the base convolution's attributes (`stride`, `kernel_size`, `padding`, ...), so code that
    reads them (transformers' Whisper encoder reads `conv1.stride[0]`) runs unchanged.

    Example:
        >>> LoRAConv2d.adapter_shapes(nn.Conv2d(8, 8, 3, groups=2), 4)
        ((4, 8, 3, 3), (8, 2, 1, 1))
    """

    _base_attrs = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "transposed",
                   "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice")
    peft_layer_type: ClassVar[str] = "conv"
    #: the number of spatial dimensions (1, 2, 3)
    spatial_dims: ClassVar[int] = 0
    #: the functional convolution (`F.conv1d` ...)
    conv_fn: ClassVar[Callable[..., torch.Tensor]]
    fsdp_refusal: ClassVar[str | None] = (
        "conv adapters are not supported under FSDP (ModelParallelStrategy / FSDPStrategy) yet; train them on one "
        "device or with DDP, or exclude the conv layers from target_modules for the sharded run")

    def __init__(self, base: nn.Module, r: int, alpha: float, **kwargs: Any) -> None:
        type(self).check_target(type(base).__name__, base, r, **kwargs)
        super().__init__(base, *type(self).features(base), r, alpha, **kwargs)

    # ------------------------------------------------------------------ what the layer type is
    @classmethod
    def features(cls, base: nn.Module) -> tuple[int, int]:
        return int(base.in_channels), int(base.out_channels)

    @classmethod
    def adapter_shapes(cls, base: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        in_channels, out_channels = cls.features(base)
        return (r, in_channels, *base.kernel_size), (out_channels, r // base.groups, *(1,) * len(base.kernel_size))

    @classmethod
    def delta_from(cls, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
        """`scaling * einsum("or,ri...->oi...", B, A)` in float32: the kernel of `B(A(x))` (B is 1x1).

        Example:
            >>> LoRAConv1d.delta_from(torch.ones(1, 2, 3), torch.ones(4, 1, 1), 0.5).shape
            torch.Size([4, 2, 3])
        """
        if b.shape[1] != a.shape[0]:
            raise LoRAError(f"the adapter of a grouped conv (B {tuple(b.shape)}, A {tuple(a.shape)}) has no merged "
                            "kernel: its delta is not a grouped kernel; keep the adapters unmerged.")
        return torch.einsum("or,ri...->oi...", b.float().flatten(1), a.float()) * scaling

    @classmethod
    def check_target(cls, name: str, base: nn.Module, r: int, **options: Any) -> None:
        """Refuse what the adapter cannot compute as the merged layer would (named `name`).

        Example:
            >>> LoRAConv2d.check_target("conv", nn.Conv2d(8, 8, 3, groups=4), 6)  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            lightning_lora.errors.LoRAError: target_modules matched 'conv' (Conv2d, groups=4) with r=6; a grouped conv ...
        """
        kind = f"{type(base).__name__}, groups={base.groups}"
        if base.padding_mode != "zeros":
            raise LoRAError(f"target_modules matched {name!r} ({type(base).__name__}, "
                            f"padding_mode={base.padding_mode!r}): the adapter conv pads with zeros, so merging would "
                            "change the borders; exclude it.")
        if r % base.groups:
            fit = (r // base.groups + 1) * base.groups
            raise LoRAError(f"target_modules matched {name!r} ({kind}) with r={r}; a grouped conv needs r divisible "
                            f"by groups; use rank_pattern={{{name!r}: {fit}}} or exclude it.")
        if base.groups > 1 and options.get("use_dora"):
            raise LoRAError(f"use_dora=True cannot adapt {name!r} ({kind}): DoRA's weight norm needs the merged "
                            "kernel, which a grouped conv's adapter does not have; exclude it or set use_dora=False.")

    def check_merge(self, name: str) -> None:
        if self.groups > 1:
            raise LoRAError(f"cannot merge the adapter of {name!r} ({self.base_cls.__name__}, groups={self.groups}): "
                            "its delta is not a grouped kernel; keep the adapters (merge_on_fit_end=False) or exclude "
                            "grouped convs.")

    @classmethod
    def channel_view(cls, vector: torch.Tensor) -> torch.Tensor:
        """A per-output-channel vector shaped `(1, out, 1, ...)` to broadcast against the output (PEFT's layout of
        DoRA's magnitude).

        Example:
            >>> LoRAConv2d.channel_view(torch.ones(8)).shape
            torch.Size([1, 8, 1, 1])
        """
        return vector.reshape(1, -1, *(1,) * cls.spatial_dims)

    def adapter_modules(self, in_features: int, out_features: int, r: int, device: torch.device,
                        dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
        conv = self.base_cls
        a = conv(in_features, r, self.kernel_size, self.stride, self.padding, self.dilation, bias=False,
                 device=device, dtype=dtype)
        b = conv(r, out_features, 1, 1, groups=self.groups, bias=False, device=device, dtype=dtype)
        return a, b

    # ------------------------------------------------------------------ compute
    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return type(self).conv_fn(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def dense_base_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """The base convolution without bias, in `x`'s dtype (DoRA's dropout branch)."""
        w = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        return type(self).conv_fn(x, w, None, self.stride, self.padding, self.dilation, self.groups)

    def merge(self) -> None:
        self.check_merge("this layer")
        super().merge()


class LoRAConv1d(LoRAConvNd):
    """LoRA around `nn.Conv1d`.

    Example:
        >>> layer = LoRAConv1d(nn.Conv1d(4, 8, 3), r=2, alpha=4, use_dora=True)
        >>> tuple(layer.lora_magnitude_vector.shape)
        (1, 8, 1)
    """

    spatial_dims: ClassVar[int] = 1
    conv_fn = staticmethod(F.conv1d)


class LoRAConv2d(LoRAConvNd):
    """LoRA around `nn.Conv2d`.

    Example:
        >>> LoRAConv2d(nn.Conv2d(3, 8, 3), r=4, alpha=8).peft_layer_type
        'conv'
    """

    spatial_dims: ClassVar[int] = 2
    conv_fn = staticmethod(F.conv2d)


class LoRAConv3d(LoRAConvNd):
    """LoRA around `nn.Conv3d`.

    Example:
        >>> LoRAConv3d.adapter_shapes(nn.Conv3d(4, 8, (1, 1, 3)), 2)
        ((2, 4, 1, 1, 3), (8, 2, 1, 1, 1))
    """

    spatial_dims: ClassVar[int] = 3
    conv_fn = staticmethod(F.conv3d)


__all__ = ["LoRAConv1d", "LoRAConv2d", "LoRAConv3d", "LoRAConvNd"]
