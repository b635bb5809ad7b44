"""Regional `torch.compile` of a model's training forward: one compiled function per repeated block class
(`TrainingCompile`), with dynamo's compile events counted (`CompileEvents`). Used by `CausalLM(compile=...)`.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch

from lightning_lora.replacements import replace_attribute, undo_replacements


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks (decoder layers: the classes a transformers model lists in
    `_no_split_modules`), in order; `[model]` when it names none.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> m = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3,
        ...                                  num_attention_heads=2, vocab_size=32))
        >>> [type(b).__name__ for b in repeated_blocks(m)]
        ['LlamaDecoderLayer', 'LlamaDecoderLayer', 'LlamaDecoderLayer']
    """
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    return blocks or [model]


class CompileEvents:
    """Counts torch.compile's (dynamo's) compilations while active: every frame compiled, and recompiles
    (a frame compiled again because the guards of its earlier compilations failed).

    Example:
        >>> with CompileEvents() as events:
        ...     _ = torch.compile(lambda t: t + 1, backend="eager", dynamic=True)(torch.ones(3))
        >>> events.compiles, events.recompiles
        (1, 0)
    """

    def __init__(self) -> None:
        #: dynamo's compile ids ("frame/compilation of that frame") in the order they started
        self.ids: list[str] = []

    def _started(self, args: Any) -> None:
        from torch._dynamo.callback import CallbackTrigger

        if args.callback_trigger == CallbackTrigger.DYNAMO:
            self.ids.append(str(args.compile_id))

    @property
    def compiles(self) -> int:
        return len(self.ids)

    @property
    def recompiles(self) -> int:
        return sum(1 for i in self.ids if i.split("/")[-1].split("_")[0].strip("[]") not in ("0", ""))

    def __enter__(self) -> CompileEvents:
        from torch._dynamo.callback import callback_handler

        callback_handler.register_start_callback(self._started)
        return self

    def __exit__(self, *exc: object) -> None:
        from torch._dynamo.callback import callback_handler

        callback_handler.remove_start_callback(self._started)


#: keyword arguments through which transformers hands a KV cache to a decoder layer
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def checkpointing_wrapper_of(cls: type) -> Any:
    """The forward inside transformers' activation-checkpointing wrapper of a layer class, or None.

    transformers >= 5.25 checkpoints a `GradientCheckpointingLayer` inside its class `forward` (a
    `forward_with_checkpointing` wrapper); earlier versions checkpoint in `__call__`, outside the forward.
    `TrainingCompile` compiles the forward inside the wrapper and checkpoints the compiled call itself, so the
    checkpoint stays outside the compiled region as before: its recompute then calls the same compiled graph
    (the same dropout masks), and side effects that dynamo cannot replay under a checkpoint (transformers'
    kernel registry sets a global in every attention forward) cause no graph break.

    Example:
        >>> from transformers.models.llama.modeling_llama import LlamaDecoderLayer
        >>> inner = checkpointing_wrapper_of(LlamaDecoderLayer)
        >>> inner is None or inner is not LlamaDecoderLayer.forward
        True
        >>> checkpointing_wrapper_of(torch.nn.Linear) is None
        True
    """
    forward = cls.forward
    code = getattr(forward, "__code__", None)
    if (code is not None and code.co_name == "forward_with_checkpointing"
            and getattr(forward, "__globals__", {}).get("__name__") == "transformers.modeling_layers"):
        return getattr(forward, "__wrapped__", None)
    return None


def _dispatch(switch: TrainingCompile, block: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A block's forward: compiled in training (grad enabled, module in train mode, switch on), else eager.

    The hidden states entering a block are marked as needing a gradient (for the first block of a frozen
    model they do not): every block then runs one graph, instead of the first one compiling its own. This
    costs the first block's input gradient in backward (a few GEMMs of one layer) and saves a compile.
    """
    name = type(block).__name__
    if switch.enabled and name not in switch.eager and block.training and torch.is_grad_enabled():
        if any(kwargs.get(key) is not None for key in _CACHE_KWARGS):
            # a KV cache in a training forward (transformers makes one unless `use_cache=False`): every layer
            # updates its own slot of it, so each would compile a graph of its own
            if not switch.warned_cache:
                switch.warned_cache = True
                warnings.warn("TrainingCompile: a KV cache reached the compiled layers in a training forward, so "
                              "they run eagerly; pass use_cache=False to the model (or set "
                              "model.config.use_cache = False) for training.", stacklevel=2)
            return type(block).forward(block, *args, **kwargs)
        hidden = args[0] if args else kwargs.get("hidden_states")
        if isinstance(hidden, torch.Tensor) and hidden.is_floating_point() and not hidden.requires_grad:
            hidden.requires_grad_(True)
        compiled = functools.partial(switch.functions[name], block)
        checkpointed = name in switch.checkpoint_outside and getattr(block, "gradient_checkpointing", False)
        if checkpointed and kwargs.get("use_cache"):
            kwargs["use_cache"] = False          # as transformers' wrapper: no cache under checkpointing
        try:
            if checkpointed:
                return block._gradient_checkpointing_func(functools.partial(compiled, **kwargs), *args)
            return compiled(*args, **kwargs)
        except torch._dynamo.exc.Unsupported as err:
            # fullgraph: dynamo refused the block while tracing it, before any of it ran (no random number was
            # drawn), so running it eagerly now gives this step the numbers it would have had without compile
            reason = " ".join(str(err).split())[:200]
            switch.eager[name] = reason
            warnings.warn(f"TrainingCompile: {name} cannot be compiled as one graph ({reason}); it runs eagerly "
                          "(a graph break inside a checkpointed block would recompute other dropout masks).",
                          stacklevel=2)
    return type(block).forward(block, *args, **kwargs)


class TrainingCompile:
    """`torch.compile` of a model's training forward, one repeated block at a time (regional compilation).

    Every block of a class runs through one compiled function of that class's `forward` (the block is an
    argument, its parameters graph inputs), so a 30-layer model compiles about as fast as a 1-layer one,
    instead of tracing, partitioning and lowering all 30 layers. Only training forwards (module in train
    mode, grad enabled) are compiled; validation, `generate()` (KV cache, length-1 steps) and `no_grad`
    code run eagerly.

    Each block compiles as one graph (`fullgraph=True`), or not at all: a block that dynamo cannot trace
    whole runs eagerly from then on, with a one-line warning naming the reason (`eager` maps its class to
    it). A graph break must never change the numbers, and it would under activation checkpointing: the
    recompute in backward runs outside the compiled call, so the parts after the break would draw other
    dropout masks than the forward did. transformers' activation checkpointing stays outside the compiled
    region (`checkpointing_wrapper_of`: the block's checkpointed forward is compiled, then checkpointed), so
    its recompute calls the same graph and replays the same dropout masks.

    Shapes are dynamic (`dynamic=True`): other lengths and batch sizes reuse the graph. What still makes a
    graph of its own (each once per block class): a batch without padding next to padded ones (transformers
    passes no attention mask then), and a batch of 1 next to larger ones (torch specializes sizes 0 and 1).
    So a run compiles at most 3 graphs, usually 1 or 2, whatever its lengths and its depth.

    The blocks get an instance attribute `forward` (parameter names, state dicts and checkpoints are
    unchanged); `remove()` takes it away. Set `enabled = False` to run a step eagerly (`CausalLM` does for
    the first batch of every fit: the LoRA callback's one-step probes would otherwise cost a recompile).

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> m = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        ...                                  num_attention_heads=2, vocab_size=32))
        >>> compiled = TrainingCompile(m)
        >>> len(compiled.blocks), sorted(compiled.functions), compiled.eager
        (2, ['LlamaDecoderLayer'], {})
        >>> compiled.remove()
    """

    def __init__(self, model: torch.nn.Module, dynamic: bool | None = True, **compile_kwargs: Any) -> None:
        """Args: `model`; `dynamic` and `compile_kwargs` (e.g. `backend="aot_eager"`, `mode=...`) go to
        `torch.compile` (`fullgraph` is always True)."""
        self.enabled = True
        self.warned_cache = False
        self.blocks = repeated_blocks(model)
        #: block class name -> the compiled function of its forward
        self.functions: dict[str, Any] = {}
        #: block class names whose transformers checkpointing `TrainingCompile` applies around the compiled call
        self.checkpoint_outside: set[str] = set()
        #: block class name -> why it runs eagerly (dynamo could not compile it as one graph)
        self.eager: dict[str, str] = {}
        compile_kwargs["fullgraph"] = True
        for block in self.blocks:
            cls = type(block)
            if cls.__name__ not in self.functions:
                inner = checkpointing_wrapper_of(cls)
                if inner is not None:
                    self.checkpoint_outside.add(cls.__name__)
                self.functions[cls.__name__] = torch.compile(inner or cls.forward, dynamic=dynamic, **compile_kwargs)
            replace_attribute(block, "forward", functools.partial(_dispatch, self, block), owner=__name__,
                              missing_hook="torch has no hook that runs a compiled function in place of one "
                                           "module's forward (torch.compile(module) wraps it in a new module, "
                                           "which changes the model's state-dict keys)")

    def remove(self) -> None:
        """Back to the blocks' own forward."""
        for block in self.blocks:
            undo_replacements(block, owner=__name__)
        self.blocks = []


__all__ = ["CompileEvents", "TrainingCompile", "checkpointing_wrapper_of", "repeated_blocks"]
