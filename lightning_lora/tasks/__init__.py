"""Ready-made LightningModules that the configs in `configs/` name by class path.

Example:
    >>> from lightning_lora.tasks import CausalLM
    >>> module = CausalLM("smollm2-135m-instruct", learning_rate=1e-3)   # doctest: +SKIP

or in a LightningCLI config::

    model:
      class_path: lightning_lora.tasks.CausalLM
      init_args: {model_name_or_path: smollm2-135m-instruct, learning_rate: 1.0e-3}
"""

from lightning_lora.tasks.causal_lm import (
    AnswerRow,
    CausalLM,
    Perplexity,
    answers_summary,
    contains_answer,
    generate_answers,
    prompt_from_labels,
    select_eval_examples,
)

__all__ = [
    "AnswerRow",
    "CausalLM",
    "Perplexity",
    "answers_summary",
    "contains_answer",
    "generate_answers",
    "prompt_from_labels",
    "select_eval_examples",
]
