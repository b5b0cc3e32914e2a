"""Render conversations to text with the tokenizer's chat template, or ChatML when it has none.

The ChatML fallback (``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, generation prompt
``<|im_start|>assistant\\n``) is the format of Qwen, SmolLM and many other instruction models. It
inserts no default system message. Using it warns once per renderer, at the first rendering
(one warning per :func:`fastmid.data.build_sft_examples` call on chat data, and Python's default
warning filter shows a given warning once per process).
"""

from __future__ import annotations

import warnings
from typing import Any

from fastmid.data.schema import BadRowError, RowOrigin

CHATML_START = "<|im_start|>"
CHATML_END = "<|im_end|>"


class ChatTemplateFallbackWarning(UserWarning):
    """The tokenizer has no chat template; fastmid renders conversations as ChatML."""


def render_chatml(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """Render messages as ChatML text.

    Args:
        messages: ``[{"role", "content"}, ...]``.
        add_generation_prompt: append ``<|im_start|>assistant\\n`` (the prompt of a reply).

    Returns:
        The rendered string; ``render_chatml(m[:k], ...)`` is a prefix of ``render_chatml(m, ...)``.
    """
    parts = [f"{CHATML_START}{m['role']}\n{m['content']}{CHATML_END}\n" for m in messages]
    if add_generation_prompt:
        parts.append(f"{CHATML_START}assistant\n")
    return "".join(parts)


class ChatRenderer:
    """Renders message lists to strings for one tokenizer.

    Attributes:
        tokenizer: the Hugging Face tokenizer.
        uses_fallback: True when the tokenizer has no chat template and ChatML is used.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.uses_fallback = not getattr(tokenizer, "chat_template", None)
        self._warned = False

    def render(
        self,
        messages: list[dict[str, str]],
        add_generation_prompt: bool,
        origin: RowOrigin | None = None,
    ) -> str:
        """Render ``messages`` to text (not tokenized).

        Args:
            messages: ``[{"role", "content"}, ...]``.
            add_generation_prompt: append the assistant header that precedes a reply.
            origin: the row, for error messages.

        Returns:
            The rendered string.

        Raises:
            BadRowError: kind ``template_rejected`` when the template raises on these messages
                (e.g. a template that insists on strictly alternating roles).
        """
        if self.uses_fallback:
            if not self._warned:  # warn at first use: text-only data never renders
                self._warned = True
                warnings.warn(
                    f"{type(self.tokenizer).__name__} has no chat template: rendering "
                    "conversations as ChatML (<|im_start|>role ... <|im_end|>); set "
                    "tokenizer.chat_template to train in the model's own format",
                    ChatTemplateFallbackWarning,
                    stacklevel=2,
                )
            return render_chatml(messages, add_generation_prompt)
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as exc:  # jinja raises TemplateError or whatever the template raises
            raise BadRowError(
                "template_rejected", origin, f"the chat template rejected this conversation: {exc}"
            ) from exc
        if not isinstance(text, str):  # pragma: no cover - transformers returns str here
            raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
        return text


END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>")


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an assistant turn: EOS plus the end-of-turn tokens of the common chat
    templates (ChatML, Gemma, Llama 3) that the vocabulary holds; sorted, for ``generate``'s
    ``eos_token_id`` and the exported ``generation_config.json``."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    ids.update(int(vocab[tok]) for tok in END_OF_TURN_TOKENS if tok in vocab)
    return sorted(ids)
