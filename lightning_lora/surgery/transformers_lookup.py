"""What the transformers models inside any module look like: their embeddings and output heads, the
heads a task model adds, the vocabulary (rows now and of the base), and PEFT's task type. Nothing here
knows about adapters; without transformers every lookup finds nothing.

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> m = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...     num_attention_heads=2, vocab_size=64))
    >>> sorted(output_head_names(m)), infer_task_type(m), vocab_rows(m)
    (['lm_head'], 'CAUSAL_LM', 64)
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from lightning_lora.matching import is_inside
from lightning_lora.surgery._paths import _join

#: last path components that are output heads, never adapted by "all-linear"
HEAD_NAMES = ("lm_head", "score", "classifier", "qa_outputs", "embed_out", "output")


def embedding_of(module: nn.Module, which: str) -> nn.Module | None:
    """What `module.get_input_embeddings()` (`which="input"`) or `get_output_embeddings()` (`"output"`)
    returns when it is a module; None for a module without that getter, or whose getter raises
    (transformers' base models raise `NotImplementedError` for the output embeddings).

    Example:
        >>> from torch import nn
        >>> embedding_of(nn.Linear(2, 2), "input") is None
        True
    """
    getter = getattr(module, f"get_{which}_embeddings", None)
    if not callable(getter):
        return None
    try:
        found = getter()
    except Exception:  # noqa: BLE001 - any failing getter means: no such embedding to use
        return None
    return found if isinstance(found, nn.Module) else None


def output_head_names(model: nn.Module) -> set[str]:
    """Paths of the output heads in `model`: what `get_output_embeddings()` returns for every model
    inside it (e.g. BERT's `cls.predictions.decoder`), and modules named like a head (`lm_head`,
    `score`, `classifier`, ...). "all-linear" never adapts them (PEFT's rule).

    Example:
        >>> from torch import nn
        >>> m = nn.Sequential(); m.add_module("lm_head", nn.Linear(2, 2))
        >>> output_head_names(m)
        {'lm_head'}
    """
    outs = [out for module in model.modules() if (out := embedding_of(module, "output")) is not None]
    return {name for name, module in model.named_modules()
            if any(module is o for o in outs) or name.rsplit(".", 1)[-1] in HEAD_NAMES}


#: output heads a task model adds to its base, by PEFT task type (PEFT's `classifier_module_names`,
#: `qa_module_names`): trained and saved with `task_heads=True`
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
              "QUESTION_ANS": ("qa_outputs",)}


def _pretrained_models(model: nn.Module, skip: Sequence[str] = ()) -> list[tuple[str, nn.Module]]:
    """`(path, module)` of the outermost transformers models inside `model` (outside `skip`)."""
    try:
        from transformers import PreTrainedModel
    except Exception:  # pragma: no cover
        return []
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, PreTrainedModel) and not is_inside(n, skip)]
    return [(n, m) for n, m in found if not any(o != n and (o == "" or n.startswith(o + ".")) for o, _ in found)]


def task_head_names(model: nn.Module, skip: Sequence[str] = ()) -> list[str]:
    """Paths of the heads that the task models inside `model` add (`score` of a
    `LlamaForSequenceClassification`, `classifier` of a `BertForTokenClassification`, `qa_outputs`).

    Example:
        >>> from transformers import LlamaConfig, LlamaForSequenceClassification
        >>> m = LlamaForSequenceClassification(LlamaConfig(hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=1, num_attention_heads=2, vocab_size=64, num_labels=3, pad_token_id=0))
        >>> task_head_names(m)
        ['score']
    """
    heads = []
    for path, network in _pretrained_models(model, skip):
        for head in TASK_HEADS.get(infer_task_type(network) or "", ()):
            if isinstance(getattr(network, head, None), nn.Module):
                heads.append(_join(path, head))
    return heads


def embedding_keys(model: nn.Module, skip: Sequence[str] = ()) -> list[str]:
    """State-dict keys of the input and output embedding matrices (and an output bias) of the
    transformers models inside `model`: what `save_embedding_layers` carries.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> m = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...     num_attention_heads=2, vocab_size=64))
        >>> embedding_keys(m)
        ['model.embed_tokens.weight', 'lm_head.weight']
    """
    keys: list[str] = []
    for path, network in _pretrained_models(model, skip):
        for which in ("input", "output"):
            emb = embedding_of(network, which)
            for name, module in network.named_modules():
                if emb is not None and module is emb:
                    keys += [_join(_join(path, name), k) for k, v in module.named_parameters(recurse=False)
                             if v is not None]
    return list(dict.fromkeys(keys))


def vocab_rows(model: nn.Module) -> int | None:
    """Rows of the input embedding of the (first) transformers model inside `model`, or None.

    Example:
        >>> from torch import nn
        >>> vocab_rows(nn.Linear(2, 2)) is None
        True
    """
    for _, network in _pretrained_models(model):
        embedding = embedding_of(network, "input")
        rows = getattr(embedding, "num_embeddings", None)  # FSDP1 leaves `weight` a flat shard outside forward
        weight = getattr(embedding, "weight", None)
        if isinstance(rows, int) or isinstance(weight, torch.Tensor):
            return int(rows) if isinstance(rows, int) else int(weight.shape[0])
    return None


def base_vocab_size(model: nn.Module) -> int | None:
    """The vocabulary size of the base model that the transformers model inside `model` was made
    from, before any `resize_token_embeddings`: its `config.json` (found offline from
    `name_or_path`, PEFT's rule), else the `vocab_size` its inner modules were built with; None when
    neither is known.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> m = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...     num_attention_heads=2, vocab_size=64))
        >>> _ = m.resize_token_embeddings(70, mean_resizing=False)
        >>> base_vocab_size(m), vocab_rows(m)
        (64, 70)
    """
    networks = _pretrained_models(model)
    if not networks:
        return None
    network = networks[0][1]
    name = str(getattr(network, "name_or_path", "") or "")
    if name:
        with contextlib.suppress(Exception):
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(name, local_files_only=True)
            size = getattr(cfg.get_text_config(), "vocab_size", None)
            if isinstance(size, int):
                return size
    sizes = [v for m in network.modules() if isinstance(v := m.__dict__.get("vocab_size"), int) and v > 0]
    return min(sizes) if sizes else None


#: PEFT task types and the transformers auto-mapping that tells them from a model class
_TASK_MAPPINGS = (
    ("CAUSAL_LM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", ("ForCausalLM", "LMHeadModel")),
    ("SEQ_CLS", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", ("ForSequenceClassification",)),
    ("SEQ_2_SEQ_LM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", ("ForSeq2SeqLM",)),
    ("TOKEN_CLS", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", ("ForTokenClassification",)),
    ("QUESTION_ANS", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", ("ForQuestionAnswering",)),
    ("FEATURE_EXTRACTION", "MODEL_MAPPING_NAMES", ()),
)


def infer_task_type(model: nn.Module) -> str | None:
    """PEFT's task type (`"CAUSAL_LM"`, `"SEQ_CLS"`, ...) for a transformers model class, else None.

    Example:
        >>> from torch import nn
        >>> infer_task_type(nn.Linear(2, 2)) is None
        True
    """
    cls_name = type(model).__name__
    try:
        from transformers.models.auto import modeling_auto
    except Exception:  # pragma: no cover
        modeling_auto = None
    for task, mapping_name, suffixes in _TASK_MAPPINGS:
        mapping = getattr(modeling_auto, mapping_name, {}) if modeling_auto is not None else {}
        for value in mapping.values():
            names = value if isinstance(value, (tuple, list)) else (value,)
            if cls_name in names:
                return task
        if any(cls_name.endswith(s) for s in suffixes):
            return task
    return None
