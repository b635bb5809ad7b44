"""The estimate's results and how they are shown: `MemoryBreakdown`, `Estimate`, rich tables, JSON.

`Estimate` holds one `MemoryBreakdown` per column (full fine-tune, LoRA and, with `quantize`, QLoRA),
the per-module parameter rows (`lightning_lora.surgery.parameter_summary`'s `LayerRow`) and the
settings; `to_dict()` is the JSON, `tables()` / `render()` / `str()` the tables.

Example:
    >>> b = MemoryBreakdown(10, 10, 40, 40, 80, 100, 0, 220)
    >>> b.sum_of_parts, format_bytes(3 * 1024**3)
    (260, '3.00 GiB')
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from typing import Any

from lightning_lora.surgery import LayerRow

GIB = 1024**3
MIB = 1024**2


@dataclass
class MemoryBreakdown:
    """Parameters and peak training memory (bytes) of one strategy, on one device.

    With `devices > 1` every number is per device (per rank): FSDP shards weights, gradients and
    optimizer state; activations are those of the rank's own batch.

    Attributes:
        trainable_params: parameters the optimizer updates (DoRA: adapters plus magnitudes).
        total_params: all parameters (tied ones once), adapters included.
        weights: every parameter (and buffer) as stored: its dtype, or 4-bit codes plus scales.
        gradients: one gradient per trainable parameter, in its dtype.
        optimizer: optimizer state (AdamW: two moments per trainable parameter).
        activations: peak of what the forward saves for backward plus backward's largest transient
            (dequantising a 4-bit weight and DoRA's weight norm included).
        optimizer_step_temp: temporaries on top of all the gradients: `optimizer.step()`'s (foreach
            AdamW: one moment-sized list) or, with tied embeddings, autograd summing the shared
            weight's two gradients.
        total: the peak: weights + optimizer state + the most that activations and gradients hold at
            once (at the loss's backward, in the last and first layer's backward, or in the optimizer
            step), plus `communication`. Compare `sum_of_parts`, the usual rule of thumb, which ignores
            that backward frees activations while gradients appear, and ignores the temporaries.
        quantized_weights: the part of `weights` stored in 4 bits (codes, scales, per-tensor state).
        dequant_temp: the largest dequantisation of one 4-bit weight (part of `activations`).
        magnitude_params: DoRA's magnitude parameters (part of `trainable_params`).
        communication: FSDP: the all-gathered (unsharded) units in flight plus one unit's unsharded
            gradients before the reduce-scatter; DDP: the gradient buckets.
        effective_weights: `target_parameters` adapters: the `W + delta` copies of the adapted parameters
            (an expert stack each) that the forward builds and keeps for backward, plus the gradient of the
            largest in backward (part of `activations`).
        frozen_adapter_params: the parameters of the frozen adapters carried next to the trained one
            (`estimate_memory(frozen_adapters=N)`: N copies of the adapter; part of `total_params`).
        frozen_adapter_weights: their bytes (part of `weights`); they have no gradients and no optimizer state.

    Example:
        >>> b = MemoryBreakdown(10, 10, 40, 40, 80, 100, 0, 220)
        >>> b.sum_of_parts
        260
    """

    trainable_params: int
    total_params: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    optimizer_step_temp: int
    total: int
    quantized_weights: int = 0
    dequant_temp: int = 0
    magnitude_params: int = 0
    communication: int = 0
    effective_weights: int = 0
    frozen_adapter_params: int = 0
    frozen_adapter_weights: int = 0

    @property
    def sum_of_parts(self) -> int:
        """`weights + gradients + optimizer + activations (+ communication)`, the naive sum (not the peak)."""
        return self.weights + self.gradients + self.optimizer + self.activations + self.communication


@dataclass
class Estimate:
    """Full fine-tune vs LoRA (and QLoRA) for one model and one set of training settings.

    `str(estimate)` is the rendered table; `estimate.to_dict()` has every number (bytes, params).
    `modules` are `parameter_summary`'s rows: `full` and `lora` are summed over the `count` modules.

    Example:
        >>> from lightning_lora.estimate import estimate_memory
        >>> est = estimate_memory("smollm2-135m", seq_len=512)
        >>> est.lora.total < est.full.total
        True
        >>> sorted(est.to_dict())
        ['config', 'full', 'lora', 'model', 'modules', 'settings']
    """

    model: str
    config: dict[str, Any]
    settings: dict[str, Any]
    full: MemoryBreakdown
    lora: MemoryBreakdown
    modules: list[LayerRow] = field(default_factory=list)
    qlora: MemoryBreakdown | None = None
    notes: list[str] = field(default_factory=list)

    def columns(self) -> list[tuple[str, MemoryBreakdown]]:
        """`(JSON key, breakdown)` per column: full, lora, and qlora when quantised."""
        cols = [("full", self.full), ("lora", self.lora)]
        return cols + ([("qlora", self.qlora)] if self.qlora is not None else [])

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (sizes in bytes, counts in parameters)."""
        out: dict[str, Any] = {"model": self.model, "config": dict(self.config), "settings": dict(self.settings)}
        for key, part in self.columns():
            d = asdict(part)
            out[key] = {**{k: v for k, v in d.items() if k.endswith("params")},
                        **{f"{k}_bytes": v for k, v in d.items() if not k.endswith("params")},
                        "sum_of_parts_bytes": part.sum_of_parts}
        out["modules"] = [{"name": m.name, "shape": list(m.shape), "count": m.count, "r": m.r,
                           "full_params": m.full // max(m.count, 1), "lora_params": m.lora // max(m.count, 1),
                           "reduction_percent": round(_reduction(m), 4)} for m in self.modules]
        if self.notes:
            out["notes"] = list(self.notes)
        return out

    def render(self, per_layer: bool = False, width: int = 100) -> str:
        """The table (and with `per_layer` the per-module table) as plain text."""
        return render(self, per_layer=per_layer, width=width)

    def tables(self, per_layer: bool = False) -> list[Any]:
        """`rich.table.Table` objects: the memory table, then the per-module one if asked."""
        return tables(self, per_layer=per_layer)

    def __str__(self) -> str:
        return self.render()


def format_bytes(n: int) -> str:
    """`n` bytes as GiB (>= 1 GiB) or MiB.

    Example:
        >>> format_bytes(3 * 1024**3), format_bytes(5 * 1024**2)
        ('3.00 GiB', '5.0 MiB')
    """
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


def _pct(part: int, whole: int) -> str:
    pct = 100.0 * part / whole if whole else 0.0
    return f"{pct:.4f}%" if pct < 1 else f"{pct:.2f}%"


def _reduction(row: LayerRow) -> float:
    """How many fewer parameters the adapter trains than the full weight, in percent."""
    return 100.0 * (1 - row.lora / row.full) if row.full else 0.0


def _title(est: Estimate) -> str:
    s = est.settings
    title = (f"{est.model}, {s['precision']}, batch {s['batch_size']} x {s['seq_len']} tokens, "
             f"{'checkpointing, ' if s['gradient_checkpointing'] else ''}{s['optimizer']} ({s['optimizer_impl']})")
    if s.get("strategy", "single") != "single":
        title += f", {s['strategy']} x {s['devices']} GPUs"
    return title


def _column_names(est: Estimate) -> list[str]:
    s = est.settings
    targets = s["target_modules"] if isinstance(s["target_modules"], str) else ", ".join(s["target_modules"])
    kind = "DoRA" if s.get("use_dora") else "LoRA"
    frozen = s.get("frozen_adapters", 0)
    more = f" + {frozen} frozen" if frozen else ""  # adapters of the same config, next to the trained one
    names = ["full fine-tune", f"{kind} r={s['r']} ({targets}){more}"]
    if est.qlora is not None:
        names.append(f"Q{kind} ({s['quantize']}, {s['quantize_modules']}){more}")
    return names


def tables(est: Estimate, per_layer: bool = False) -> list[Any]:
    """`rich.table.Table` objects for `est`: the memory table, then the per-module one if asked.

    Example:
        >>> from lightning_lora.estimate import estimate_memory
        >>> [t.title.split(" ")[0] for t in tables(estimate_memory("smollm2-135m", seq_len=64), per_layer=True)]
        ['smollm2-135m,', 'per']
    """
    from rich.table import Table

    s = est.settings
    extra = {"fsdp": " + the units in flight", "ddp": " + the gradient buckets"}.get(s.get("strategy", ""), "")
    caption = (f"peak total = weights + optimizer state{extra} + the most that activations and gradients hold at "
               f"once (backward frees activations as gradients appear); {'per GPU; ' if extra else ''}"
               "1 GiB = 2^30 bytes")
    table = Table(title=_title(est), title_justify="left", caption=caption)
    table.add_column("")
    cols = [part for _, part in est.columns()]
    for name in _column_names(est):
        table.add_column(name, justify="right", no_wrap=True)

    def row(label: str, values: list[str], **kw: Any) -> None:
        table.add_row(label, *values, **kw)

    row("parameters to train", [f"{c.trainable_params:,}" for c in cols])
    if any(c.magnitude_params for c in cols):
        row("  of which DoRA magnitudes", [f"{c.magnitude_params:,}" if c.magnitude_params else "-" for c in cols])
    row("  share of all parameters", [_pct(c.trainable_params, c.total_params) for c in cols])
    row("total parameters", [f"{c.total_params:,}" for c in cols])
    row("weights", [format_bytes(c.weights) for c in cols])
    if any(c.quantized_weights for c in cols):
        row("  of which 4-bit (codes + scales)",
            [format_bytes(c.quantized_weights) if c.quantized_weights else "-" for c in cols])
    frozen = s.get("frozen_adapters", 0)
    if frozen and any(c.frozen_adapter_params for c in cols):
        row(f"  of which {frozen} frozen adapter{'s' if frozen > 1 else ''}",
            [f"{format_bytes(c.frozen_adapter_weights)} ({c.frozen_adapter_params:,} params)"
             if c.frozen_adapter_params else "-" for c in cols])
    for label, key in (("gradients", "gradients"), ("optimizer state", "optimizer"), ("activations", "activations")):
        row(label, [format_bytes(getattr(c, key)) for c in cols])
    if any(c.dequant_temp for c in cols):
        row("  largest 4-bit dequantisation", [format_bytes(c.dequant_temp) if c.dequant_temp else "-" for c in cols])
    if any(c.effective_weights for c in cols):
        row("  W + delta (target_parameters)",
            [format_bytes(c.effective_weights) if c.effective_weights else "-" for c in cols])
    if any(c.optimizer_step_temp for c in cols):
        row("  temporaries with all gradients", [format_bytes(c.optimizer_step_temp) for c in cols])
    if any(c.communication for c in cols):
        label = "all-gathered units in flight" if s.get("strategy") == "fsdp" else "gradient buckets"
        row(label, [format_bytes(c.communication) for c in cols])
    row("peak total", [format_bytes(c.total) for c in cols], style="bold")
    out = [table]
    if per_layer:
        per = Table(title="per adapted module (each one; 'x' = how many)", title_justify="left")
        for name, justify in (("module", "left"), ("shape (out x in)", "right"), ("x", "right"), ("r", "right"),
                              ("full params", "right"), ("LoRA params", "right"), ("fewer", "right")):
            per.add_column(name, justify=justify, no_wrap=True)
        for m in est.modules:
            n = max(m.count, 1)
            per.add_row(m.name, f"{m.shape[0]} x {m.shape[1]}", str(m.count), str(m.r), f"{m.full // n:,}",
                        f"{m.lora // n:,}", f"{_reduction(m):.1f}%")
        out.append(per)
    return out


def render(est: Estimate, per_layer: bool = False, width: int = 100) -> str:
    """`tables(est)` as plain text, followed by the estimate's notes.

    Example:
        >>> from lightning_lora.estimate import estimate_memory
        >>> "peak total" in render(estimate_memory("smollm2-135m", seq_len=64))
        True
    """
    from rich.console import Console

    buf = io.StringIO()
    console = Console(file=buf, width=width, force_terminal=False, color_system=None, soft_wrap=False)
    parts = tables(est, per_layer)
    wide = Console(file=io.StringIO(), width=1000)
    console.width = max([width] + [wide.measure(t).maximum for t in parts])  # never wrap a row
    for table in parts:
        console.print(table)
    for note in est.notes:
        console.print(f"note: {note}")
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines()) + "\n"


__all__ = ["GIB", "MIB", "Estimate", "MemoryBreakdown", "format_bytes", "render", "tables"]
