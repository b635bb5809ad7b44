"""Ready-made LightningModules and callbacks that the configs in `configs/` name by class path.

- `CausalLM` (`tasks/causal_lm.py`): a transformers causal LM; loss, perplexity, validation generations.
- `AnswersReport` (`tasks/answers.py`): a callback that answers the datamodule's held-out questions
  before and after training and prints the table (also `answers.json` and TensorBoard).

Example:
    >>> from lightning_lora.tasks import AnswersReport, CausalLM
    >>> module = CausalLM("smollm2-135m-instruct", learning_rate=1e-3)   # doctest: +SKIP
    >>> report = AnswersReport(num_questions=24)

or in a LightningCLI config::

    trainer:
      callbacks:
        - class_path: lightning_lora.tasks.AnswersReport
          init_args: {num_questions: 24}
    model:
      class_path: lightning_lora.tasks.CausalLM
      init_args: {model_name_or_path: smollm2-135m-instruct, learning_rate: 1.0e-3}
"""

from lightning_lora.tasks._errors import TaskConfigError
from lightning_lora.tasks.answers import (
    AnswerRow,
    AnswersReport,
    answers_summary,
    contains_answer,
    generate_answers,
    print_answers_table,
    select_eval_examples,
    summary_lines,
)
from lightning_lora.tasks.causal_lm import (
    CausalLM,
    Perplexity,
    num_target_tokens,
    prompt_from_labels,
)

__all__ = [
    "AnswerRow",
    "AnswersReport",
    "CausalLM",
    "Perplexity",
    "TaskConfigError",
    "answers_summary",
    "contains_answer",
    "generate_answers",
    "num_target_tokens",
    "print_answers_table",
    "prompt_from_labels",
    "select_eval_examples",
    "summary_lines",
]
