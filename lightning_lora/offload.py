"""Activation offloading: what autograd saves for backward goes to (pinned) host memory during the forward
and comes back in the backward.

`OffloadActivations` is a `torch.autograd.graph.saved_tensors_hooks` context. On CUDA each saved activation
is copied to a pinned host buffer on a side stream (the copy overlaps the forward's next kernels; the
activation's device memory is released once the copy is done, `Tensor.record_stream`), and copied back on
the compute stream when backward needs it (after the side stream's copy, `wait_event`). Parameters and
small tensors stay where they are (offloading a weight frees nothing; a small copy costs more than it saves).
PyTorch's own `torch.autograd.graph.save_on_cpu` does the same with the copies on the compute stream.

On a CPU the hooks still run (activations are copied to other host tensors and back), so the mechanism is
tested on CPU: the gradients are identical with and without it. The memory it saves is a GPU matter.

Example:
    >>> lin = torch.nn.Linear(4, 4)
    >>> x = torch.randn(3, 4, requires_grad=True)
    >>> with OffloadActivations(min_bytes=0) as offload:
    ...     y = torch.tanh(lin(x)).sum()
    >>> y.backward()
    >>> offload.offloaded > 0, x.grad.shape
    (True, torch.Size([3, 4]))
"""

from __future__ import annotations

from typing import Any

import torch

#: activations smaller than this stay on the device (1 MiB)
MIN_OFFLOAD_BYTES = 1 << 20


class OffloadActivations(torch.autograd.graph.saved_tensors_hooks):
    """Saved activations of the forward inside the block to host memory, back in backward.

    Args:
        min_bytes: tensors smaller than this stay put (None: `MIN_OFFLOAD_BYTES`, 1 MiB).
        pin_memory: pinned host buffers on CUDA (asynchronous copies); ignored without CUDA.
        use_stream: on CUDA, copy to the host on a side stream that overlaps the forward's compute.

    Attributes:
        offloaded: number of tensors offloaded since the block was entered (for tests and logs).
        offloaded_bytes: their bytes.

    Example:
        >>> with OffloadActivations():        # doctest: +SKIP
        ...     loss = model(**batch).loss
        >>> loss.backward()                   # doctest: +SKIP
    """

    def __init__(self, min_bytes: int | None = None, pin_memory: bool = True, use_stream: bool = True) -> None:
        self.min_bytes = MIN_OFFLOAD_BYTES if min_bytes is None else int(min_bytes)
        self.pin_memory = bool(pin_memory)
        self.use_stream = bool(use_stream)
        self.offloaded = 0
        self.offloaded_bytes = 0
        self._streams: dict[torch.device, Any] = {}
        super().__init__(self._pack, self._unpack)

    def _stream(self, device: torch.device) -> Any:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device=device)
        return self._streams[device]

    def _pack(self, tensor: torch.Tensor) -> Any:
        nbytes = tensor.numel() * tensor.element_size()
        if (isinstance(tensor, torch.nn.Parameter) or nbytes < self.min_bytes or tensor.layout != torch.strided
                or tensor.device.type not in ("cuda", "cpu") or type(tensor) is not torch.Tensor):
            return tensor
        self.offloaded += 1
        self.offloaded_bytes += nbytes
        if tensor.device.type == "cpu":
            return (tensor.device, tensor.clone(memory_format=torch.preserve_format), None)
        host = torch.empty_like(tensor, device="cpu", pin_memory=self.pin_memory)
        if not self.use_stream:
            host.copy_(tensor, non_blocking=self.pin_memory)
            return (tensor.device, host, None)
        stream = self._stream(tensor.device)
        stream.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(stream):
            host.copy_(tensor, non_blocking=self.pin_memory)
            event = stream.record_event()
        tensor.record_stream(stream)       # its memory is reused only after the copy
        return (tensor.device, host, event)

    @staticmethod
    def _unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        device, host, event = packed
        if device.type == "cpu":
            return host
        if event is not None:
            torch.cuda.current_stream(device).wait_event(event)
        return host.to(device, non_blocking=True)

    def __enter__(self) -> OffloadActivations:
        self.offloaded = 0
        self.offloaded_bytes = 0
        super().__enter__()
        return self


__all__ = ["MIN_OFFLOAD_BYTES", "OffloadActivations"]
