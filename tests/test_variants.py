"""Variants answer their whole protocol, on every layer type that can carry them; layer types answer for
themselves (`delta_from` is what a real merge adds)."""

from __future__ import annotations

import ast
import copy
import dataclasses
import pathlib
import re

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lightning_lora
from lightning_lora import LoRAConfig, LoRAConfigError, inject_lora
from lightning_lora.layers import LoRAConv1D, LoRAEmbedding, LoRALayer, LoRALinear
from lightning_lora.peft_format.keys import _VARIANT_PEFT_KEYS
from lightning_lora.quantization import LoRANF4Linear, NF4Linear
from lightning_lora.variants import (
    VARIANTS,
    LoRAVariant,
    config_fields,
    resolve_variants,
    unsupported_targets,
    variant_tensor_names,
)
from lightning_lora.variants.dora import weight_norm

IN, OUT, R = 64, 32, 4


def _linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(IN, OUT)


def _conv1d() -> nn.Module:
    torch.manual_seed(0)
    layer = Conv1D(OUT, IN)
    nn.init.normal_(layer.weight, std=0.2)
    return layer


def _embedding() -> nn.Module:
    torch.manual_seed(0)
    return nn.Embedding(IN, OUT)


def _nf4() -> nn.Module:
    pytest.importorskip("torchao")
    return NF4Linear.from_linear(_linear())


#: layer type -> (base factory, adapter class, input factory)
LAYER_TYPES = {
    "linear": (_linear, LoRALinear, lambda: torch.randn(3, IN)),
    "conv1d": (_conv1d, LoRAConv1D, lambda: torch.randn(3, IN)),
    "embedding": (_embedding, LoRAEmbedding, lambda: torch.tensor([[1, 5, 63]])),
    "nf4": (_nf4, LoRANF4Linear, lambda: torch.randn(3, IN)),
}


def _build(kind: str, **fields) -> tuple[nn.Module, LoRALayer, torch.Tensor]:
    factory, cls, inputs = LAYER_TYPES[kind]
    base = factory()
    reference = copy.deepcopy(base)
    torch.manual_seed(1)
    layer = cls(base, r=R, alpha=8.0, **fields)
    return reference, layer, inputs()


def _randomize(layer: LoRALayer) -> None:
    with torch.no_grad():
        torch.manual_seed(3)
        for p in (layer.lora_A.weight, layer.lora_B.weight):
            p.add_(torch.randn_like(p) * 0.1)
        magnitude = getattr(layer, "lora_magnitude_vector", None)
        if magnitude is not None:
            magnitude.mul_(1.1)


def _within(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a.float(), b.float(), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("variant_cls", VARIANTS, ids=lambda c: c.name)
def test_every_variant_declares_its_selection(variant_cls):
    assert issubclass(variant_cls, LoRAVariant) and variant_cls.name and variant_cls.config_fields
    fields = {f.name for f in dataclasses.fields(LoRAConfig)}
    assert set(variant_cls.config_fields) <= fields and set(variant_cls.example) <= set(variant_cls.config_fields)
    LoRAConfig(**variant_cls.example)  # a valid config
    variant = variant_cls.from_config(**variant_cls.example)
    assert isinstance(variant, variant_cls) and variant.option() and variant.extra_repr()
    assert variant_cls.from_config(**{f: LoRAConfig.__dataclass_fields__[f].default for f in variant_cls.config_fields}) \
        is None  # the defaults select no variant
    assert set(variant_cls.config_fields) <= set(config_fields())


@pytest.mark.parametrize("kind", sorted(LAYER_TYPES))
@pytest.mark.parametrize("variant_cls", VARIANTS, ids=lambda c: c.name)
def test_variant_conformance(variant_cls, kind):
    """Every variant on every layer type: refused with its option named, or it answers its whole protocol."""
    _, cls, _ = LAYER_TYPES[kind]
    variant = variant_cls.from_config(**variant_cls.example)
    if kind == "nf4" and variant.sets_adapters:
        # a base-changing init cannot start from a quantized weight (refused by the config and by the weight check)
        with pytest.raises(LoRAConfigError, match="cannot be combined with quantize_base"):
            LoRAConfig(quantize_base="nf4", **variant_cls.example)
        return
    if not variant.supports(cls):
        with pytest.raises(LoRAConfigError, match=re.escape(variant.option())):
            _build(kind, **variant_cls.example)
        return
    reference, layer, x = _build(kind, **variant_cls.example)
    assert [type(v) for v in layer.variants] == [variant_cls]
    assert variant.extra_repr() in repr(layer)
    in_features, out_features = cls.features(reference)
    state = layer.state_dict()
    declared = variant.extra_tensors(in_features, out_features, R)
    for t in declared:
        tensor = getattr(layer, t.name)
        assert tuple(tensor.shape) == t.shape and t.name in state and t.name in variant_tensor_names()
        assert isinstance(tensor, nn.Parameter) == t.trainable and tensor.requires_grad == t.trainable
        assert _VARIANT_PEFT_KEYS.get(t.name) == t.peft_key
    trainable_extra = sum(p.numel() for n, p in layer.named_parameters() if n in {t.name for t in declared})
    assert variant.extra_parameters(in_features, out_features, R) == trainable_extra
    with torch.no_grad():
        base_out = reference(x)
        _within(layer(x), base_out)  # step 0: the base function (within rounding for a base-changing init)
        _randomize(layer)
        adapted = layer(x)
        layer.lora_enabled = False
        _within(layer(x), base_out)  # adapters disabled: the original base function
        layer.lora_enabled = True
        before = layer.weight.detach().clone() if kind != "nf4" else None
        layer.merge()
        _within(layer(x), adapted)
        layer.unmerge()
        _within(layer(x), adapted)
        if before is not None:
            _within(layer.weight, before)


@pytest.mark.parametrize("kind", sorted(LAYER_TYPES))
def test_delta_from_is_what_a_real_merge_adds(kind):
    reference, layer, _ = _build(kind)
    _randomize(layer)
    expected = type(layer).delta_from(layer.lora_A.weight, layer.lora_B.weight, layer.scaling)
    assert torch.equal(expected, layer.delta_weight()) and expected.dtype == torch.float32
    base_weight = layer.dequantized_weight() if kind == "nf4" else layer.weight.detach().clone()
    layer.merge()
    assert expected.shape == layer.weight.shape
    _within(layer.weight.float() - base_weight.float(), expected)
    a_shape, b_shape = type(layer).adapter_shapes(reference, R)
    assert (tuple(layer.lora_A.weight.shape), tuple(layer.lora_B.weight.shape)) == (a_shape, b_shape)


def test_layer_types_answer_for_themselves():
    assert (LoRALinear.peft_layer_type, LoRAConv1D.peft_layer_type, LoRAEmbedding.peft_layer_type) == (
        "linear", "linear", "embedding")
    assert (LoRALinear.fan_in_fan_out, LoRAConv1D.fan_in_fan_out, LoRAEmbedding.fan_in_fan_out) == (False, True, False)
    assert LoRAConv1D.features(Conv1D(OUT, IN)) == (IN, OUT) and LoRAEmbedding.features(nn.Embedding(5, 3)) == (5, 3)
    assert LoRAEmbedding.peft_tensor_names() == {"lora_A.weight": "lora_embedding_A", "lora_B.weight": "lora_embedding_B"}


def test_variant_refusals_keep_their_text():
    with pytest.raises(LoRAConfigError, match=r"^use_dora=True cannot adapt an nn.Embedding \(Embedding\(4, 2\)\): "):
        LoRAEmbedding(nn.Embedding(4, 2), r=1, alpha=1, use_dora=True, init="pissa")  # DoRA is reported first
    with pytest.raises(LoRAConfigError, match=r"^init='olora' cannot initialise an nn.Embedding adapter"):
        resolve_variants(LoRAEmbedding, nn.Embedding(4, 2), init="olora")
    variant, names = unsupported_targets({"q": LoRALinear, "e": LoRAEmbedding}, init="pissa")
    assert variant.name == "pissa" and names == ["e"]
    assert unsupported_targets({"q": LoRALinear}, use_dora=True, init="pissa") is None


@pytest.mark.parametrize("fields", [{"use_dora": True}, {"init": "olora"}, {"use_dora": True, "init": "pissa"}])
def test_targets_error_is_the_injection_error(fields):
    model = nn.Sequential()
    model.add_module("emb", nn.Embedding(8, 4))
    model.add_module("q_proj", nn.Linear(4, 4))
    with pytest.raises(LoRAConfigError) as err:
        inject_lora(model, LoRAConfig(r=2, target_modules=["emb", "q_proj"], **fields))
    variant, names = unsupported_targets({"emb": LoRAEmbedding, "q_proj": LoRALinear}, **fields)
    assert str(err.value) == str(variant.targets_error(names))


def test_dora_and_pissa_combine_as_before():
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT)
    layer = LoRALinear(base, r=R, alpha=8.0, use_dora=True, init="pissa")
    assert [v.name for v in layer.variants] == ["dora", "pissa"]
    assert repr(layer).split("\n")[1].strip().endswith("use_dora=True, init='pissa'")
    # PiSSA initialises first: the magnitude starts from the residual base and the adapters it set
    torch.testing.assert_close(layer.lora_magnitude_vector.detach(),
                               weight_norm(layer.weight, layer.lora_A.weight, layer.lora_B.weight, layer.scaling))


PACKAGE = pathlib.Path(lightning_lora.__file__).parent


def _imports(path: pathlib.Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_layers_and_variants_never_import_quantization_and_variants_never_import_layers():
    for sub, banned in (("layers", ("lightning_lora.quantization", "lightning_lora.surgery")),
                        ("variants", ("lightning_lora.layers", "lightning_lora.quantization"))):
        for path in (PACKAGE / sub).glob("*.py"):
            bad = [m for m in _imports(path) if m.startswith(banned)]
            assert not bad, f"{path.name} imports {bad}"


def test_quantization_bitsandbytes_name_is_the_function():
    import lightning_lora.quantization as q

    assert callable(q.bitsandbytes) and not isinstance(q.bitsandbytes, type(q))
