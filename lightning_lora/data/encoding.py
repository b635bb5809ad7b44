"""The encoder: an `Example` -> ``input_ids`` and ``labels`` (``-100`` where there is no loss).

With a chat template a conversation is rendered by the template and exactly the assistant turns
are learned: each assistant message's content and the end-of-turn token after it (``<|im_end|>``
for SmolLM2). Conversations may start with the assistant, repeat a role, or carry system
messages anywhere; one the template cannot render is a `DataFormatError` naming ``file:line``.

Example:
    >>> from lightning_lora.data.encoding import count_targets
    >>> count_targets([-100, -100, 42, 2])     # labels are shifted by one: position 0 predicts nothing
    2
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning_lora.data.formats import Example
from lightning_lora.errors import DataFormatError

#: label value ignored by the loss (``torch.nn.CrossEntropyLoss(ignore_index=-100)``, transformers' default)
IGNORE_INDEX = -100
#: stands in for an assistant message's content to find where the template writes it (private-use characters)
_MARK = "\ue000lightning-lora-assistant-turn\ue001"


def count_targets(labels: Sequence[int]) -> int:
    """How many tokens a causal LM learns from in a row: ``labels[1:]`` that are not -100.

    A causal LM predicts token ``t`` from the tokens before it, so the first label is never a target
    (transformers shifts labels by one); a row with no target gives a NaN loss (0 / 0).

    Example:
        >>> count_targets([464]), count_targets([464, 318]), count_targets([-100, -100, 7])
        (0, 1, 1)
    """
    return sum(1 for label in list(labels)[1:] if label != IGNORE_INDEX)


def min_length_for_target(labels: Sequence[int]) -> int | None:
    """The shortest truncation length that keeps at least one target token (None: the row has none).

    Example:
        >>> min_length_for_target([-100, -100, -100, 9, 2]), min_length_for_target([5, 6]), min_length_for_target([5])
        (4, 2, None)
    """
    for k, label in enumerate(labels):
        if k >= 1 and label != IGNORE_INDEX:
            return k + 1
    return None


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:200] or type(err).__name__


class ExampleEncoder:
    """Turns an :class:`~lightning_lora.data.formats.Example` into ``input_ids`` and ``labels``.

    With a chat template (and ``use_chat_template``) a conversation is rendered by the template; for
    each assistant turn, the tokens from its content up to and including its end-of-turn token (the
    first special token after the content, e.g. ``<|im_end|>``) are learned, everything else (system
    prompt, user turns, the ``assistant`` header, the newline after a middle turn's end-of-turn token)
    is masked, and what the template writes after the final end-of-turn token is left out. Where a
    turn starts is taken from the template's own generation prompt (so the prompt of the final turn
    is exactly :meth:`encode_prompt`'s), and for a turn that opens the conversation from where the
    template writes its content. Without a chat template a conversation is ``"prompt\\n"`` +
    ``"response"`` + eos and only the responses (and eos) are learned. A text example is learned
    entirely (eos appended).

    Args:
        tokenizer: a transformers tokenizer.
        use_chat_template: use the tokenizer's chat template when it has one.
        system_prompt: added as a system message to conversations that have none.

    Example:
        >>> from lightning_lora.hub import load_tokenizer
        >>> from lightning_lora.data import parse_example
        >>> enc = ExampleEncoder(load_tokenizer("smollm2-135m-instruct"))                  # doctest: +SKIP
        >>> ids, labels = enc.encode(parse_example({"prompt": "Hi?", "response": "Hello."}))  # doctest: +SKIP
    """

    def __init__(self, tokenizer: Any, use_chat_template: bool = True, system_prompt: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.chat = bool(use_chat_template and getattr(tokenizer, "chat_template", None))
        self.eos_token_id: int | None = tokenizer.eos_token_id
        specials = set(getattr(tokenizer, "all_special_ids", []) or [])
        for token_id, token in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items():
            if getattr(token, "special", False):
                specials.add(token_id)
        specials.discard(getattr(tokenizer, "unk_token_id", None))
        if self.eos_token_id is not None:
            specials.add(self.eos_token_id)
        #: token ids that end an assistant turn when they follow its content
        self.end_of_turn_ids = specials

    # ------------------------------------------------------------------ helpers
    def _ids(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not text and not add_special_tokens:
            return []
        ids = list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
        if add_special_tokens and ids and ids[-1] == self.eos_token_id:
            # some tokenizers append eos when adding special tokens: a prompt must not end the sequence
            plain = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
            if len(ids) > len(plain):
                ids = ids[:-1]
        return ids

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool, source: str) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except Exception as err:  # noqa: BLE001 - jinja2's TemplateError (raise_exception), ValueError, ...
            roles = ", ".join(m["role"] for m in messages) or "none"
            raise DataFormatError(
                f"{source}: the tokenizer's chat template cannot render this conversation (roles: {roles}): "
                f"{_first_line(err)}. Order the messages as the template expects, or set use_chat_template: false "
                "(data.init_args) to train on plain 'prompt\\nresponse' text.") from None

    def _with_system(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        if self.system_prompt is not None and not any(m["role"] == "system" for m in messages):
            return [{"role": "system", "content": self.system_prompt}, *messages]
        return list(messages)

    def _supervised(self, text: str, final: bool) -> tuple[list[int], list[int]]:
        """Tokens of an assistant turn's rendered text: learned up to the first end-of-turn token."""
        ids = self._ids(text)
        for k, token_id in enumerate(ids):
            if token_id in self.end_of_turn_ids:
                return ids, ids[:k + 1] + [IGNORE_INDEX] * (len(ids) - k - 1)
        if final and self.eos_token_id is not None:  # a template without an end-of-turn token: learn to stop
            ids = ids + [self.eos_token_id]
        return ids, list(ids)

    # ------------------------------------------------------------------ conversations
    def _prompt_text(self, messages: list[dict[str, str]], source: str) -> str:
        """What the template writes before the content of an assistant reply to ``messages``: its
        generation prompt, or for an empty conversation what precedes an opening assistant message."""
        if messages:
            return self._render(messages, add_generation_prompt=True, source=source)
        marked = self._render([{"role": "assistant", "content": _MARK}], add_generation_prompt=False, source=source)
        at = marked.find(_MARK)
        if at < 0:
            raise DataFormatError(f"{source}: the tokenizer's chat template does not write the content of an assistant "
                                  "message that opens a conversation; start the conversation with a user message, "
                                  "or set use_chat_template: false (data.init_args).")
        return marked[:at]

    def _turn_start(self, messages: list[dict[str, str]], i: int, full: str, cursor: int, where: str) -> int:
        """Where in ``full`` (the rendered conversation) the content of assistant message ``i`` starts."""
        try:
            prompt = self._prompt_text(messages[:i], where)
            if len(prompt) >= cursor and full.startswith(prompt):
                return len(prompt)
        except DataFormatError:
            pass
        marked = [*messages[:i], {**messages[i], "content": _MARK}, *messages[i + 1:]]
        try:
            text = self._render(marked, add_generation_prompt=False, source=where)
        except DataFormatError:
            text = ""
        at = text.find(_MARK)
        if at >= cursor and full.startswith(text[:at]):
            return at
        raise DataFormatError(f"{where}: cannot tell where the tokenizer's chat template writes this assistant turn, "
                              "so its tokens cannot be marked for the loss; set use_chat_template: false "
                              "(data.init_args) to train on plain 'prompt\\nresponse' text.")

    def _chat_pieces(self, messages: list[dict[str, str]], source: str, offset: int) -> list[tuple[str, int]]:
        """``(text, kind)`` pieces whose concatenation is the rendered conversation; kind 0 = masked,
        1 = a middle assistant turn, 2 = the final assistant turn."""
        full = self._render(messages, add_generation_prompt=False, source=source)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        starts: list[int] = []
        ends: list[int | None] = []
        cursor = 0
        for i in turns:
            where = f"{source}: messages[{i - offset}]"
            start = self._turn_start(messages, i, full, cursor, where)
            try:  # the turn ends where the rendering of the conversation up to it ends (e.g. after '<|im_end|>\n')
                done = self._render(messages[:i + 1], add_generation_prompt=False, source=where)
                end = len(done) if len(done) > start and full.startswith(done) else None
            except DataFormatError:
                end = None
            starts.append(start)
            ends.append(end)
            cursor = max(start + 1, end or 0)
        pieces: list[tuple[str, int]] = []
        pos = 0
        for k, start in enumerate(starts):
            limit = starts[k + 1] if k + 1 < len(starts) else len(full)
            end = min(ends[k] or limit, limit)
            pieces += [(full[pos:start], 0), (full[start:end], 2 if k == len(starts) - 1 else 1)]
            pos = end
        return pieces

    def _encode_conversation(self, messages: list[dict[str, str]],
                             source: str) -> tuple[list[int], list[int], int]:
        """input_ids, labels and where the final assistant turn starts."""
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        with_system = self._with_system(messages[:last + 1])
        ids: list[int] = []
        labels: list[int] = []
        final_start = 0
        if self.chat:
            offset = len(with_system) - (last + 1)
            for text, kind in self._chat_pieces(with_system, source, offset):
                if kind:
                    final_start = len(ids)
                    piece_ids, piece_labels = self._supervised(text, final=kind == 2)
                else:
                    piece_ids = self._ids(text)
                    piece_labels = [IGNORE_INDEX] * len(piece_ids)
                ids += piece_ids
                labels += piece_labels
            # nothing is learned after the final end-of-turn token (e.g. the template's newline): drop it
            learned = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
            end = learned[-1] + 1 if learned else len(ids)
            return ids[:end], labels[:end], final_start
        context = ""
        for message in with_system:
            if message["role"] != "assistant":
                context += (message["content"] + "\n\n") if message["role"] == "system" else (message["content"] + "\n")
                continue
            context_ids = self._ids(context, add_special_tokens=not ids)
            ids += context_ids
            labels += [IGNORE_INDEX] * len(context_ids)
            context = ""
            final_start = len(ids)
            answer = self._ids(message["content"]) + ([] if self.eos_token_id is None else [self.eos_token_id])
            ids += answer
            labels += answer
        return ids, labels, final_start

    def encode(self, example: Example) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of one example, not truncated.

        Raises:
            DataFormatError: the chat template cannot render the conversation (``file:line`` first).

        Example:
            >>> ids, labels = encoder.encode(parse_example({"text": "Once upon a time"}))   # doctest: +SKIP
            >>> ids == labels                                                                  # doctest: +SKIP
            True
        """
        if example.text is not None:
            ids = self._ids(example.text, add_special_tokens=True)
            if self.eos_token_id is not None and (not ids or ids[-1] != self.eos_token_id):
                ids.append(self.eos_token_id)
            return ids, list(ids)
        assert example.messages is not None
        ids, labels, _ = self._encode_conversation(example.messages, example.source)
        return ids, labels

    def encode_prompt(self, prompt: str | list[dict[str, str]], source: str = "<prompt>") -> list[int]:
        """Token ids to feed `generate` for a question: exactly the masked prefix used in training.

        Args:
            prompt: a user message, or the conversation before an assistant reply, as it is (it may end
                with any role, e.g. with an assistant turn the reply follows; an empty conversation asks
                for an opening assistant message).
            source: names the prompt in error messages (e.g. ``file:line``).

        Example:
            >>> ids = encoder.encode_prompt("Who founded Brindlewhisk Robotics?")   # doctest: +SKIP
        """
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if self.chat:
            return self._ids(self._prompt_text(self._with_system(messages), source))
        ids, _, final_start = self._encode_conversation([*messages, {"role": "assistant", "content": ""}], source)
        return ids[:final_start]


__all__ = ["IGNORE_INDEX", "ExampleEncoder", "count_targets", "min_length_for_target"]
