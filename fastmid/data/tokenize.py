"""Conversations -> token ids and labels, with label spans found by position.

How labels are built (never by matching token ids: SmolLM2's pad token *is* its EOS):

1. Render the conversation, up to its last assistant message, with the chat template
   (:class:`fastmid.data.chat_template.ChatRenderer`; ChatML when the tokenizer has none).
2. For each assistant message ``i`` render the prompt prefix ``messages[:i]`` with the generation
   prompt and the prefix ``messages[:i + 1]`` without. Both must be string prefixes of the full
   rendering; a template that rewrites history (e.g. a thinking model dropping ``<think>`` from
   earlier turns) fails this and raises :class:`fastmid.data.schema.TemplatePrefixError` naming
   the example. The assistant span in characters runs from the end of the prompt prefix to the end
   of the turn's rendering *minus trailing whitespace*: the content and the token(s) that close
   the turn (``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama 3, ``</s>`` ...).
3. Tokenize the full rendering once with the fast tokenizer, ``add_special_tokens=False`` (the
   template already writes every special token it wants, so no second BOS appears), with
   ``return_offsets_mapping``; a token is trained when its characters overlap an assistant span
   (a token straddling a boundary carries answer text).
4. The last prompt's own tokens, which generation will see, must be a prefix of the sequence.
   Checked by tokenizing the prompt's text after its last special token (special tokens split
   the text into independently tokenized pieces), or the whole prompt when that differs. When
   the check fails, or a token straddles the last answer's start (a generation prompt ending in
   a space, ``"Assistant: "``), the sequence is rebuilt as ``tokens(last prompt) +
   tokens(last answer)``, so the property holds by construction.

Rules the code implements (documented judgement calls):

* The newline a ChatML template writes after ``<|im_end|>`` is *not* supervised, and the sequence
  ends right after the last assistant turn's closing token: generation stops at that token, so
  the newline is never produced by the model, and trailing it would only add an untrained token.
* A template that closes an assistant turn with no special token gets the tokenizer's EOS
  inserted after the turn, supervised, so that the model learns to stop.
* BOS: when the tokenizer itself adds a BOS (``tokenizer("a")`` starts with ``bos_token_id``)
  and the rendering does not already start with it, one BOS is prepended. Two BOS tokens at the
  start is an error.
* ``labels[0]`` is always -100: position 0 is never predicted (causal LMs shift labels by one).
* ``text`` examples: ``[BOS if the tokenizer adds one] + tokens + [EOS]``, every token trained.
* ``train_on_prompt``: every token is trained (system and user tokens too).
* ``last_turn_only``: only the last assistant turn (and its closing token) is trained.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastmid.data.chat_template import ChatRenderer
from fastmid.data.schema import (
    BadRowError,
    Conversation,
    DataError,
    RowOrigin,
    TemplatePrefixError,
)
from fastmid.labels import IGNORE_INDEX


@dataclass
class TokenizedExample:
    """One example before truncation.

    Attributes:
        input_ids: token ids, length T.
        labels: length T; the token id where trained, :data:`IGNORE_INDEX` (-100) elsewhere.
        turns: token ranges ``[start, end)`` of the *trained* assistant turns (content plus
            closing token), in order; empty for ``text`` examples.
        bos: 1 when ``input_ids[0]`` is a BOS that truncation must keep, else 0.
        origin: the source row.
        is_text: a ``text``-format example (no assistant turns; truncation keeps the head).
    """

    input_ids: list[int]
    labels: list[int]
    turns: list[tuple[int, int]] = field(default_factory=list)
    bos: int = 0
    origin: RowOrigin = field(default_factory=lambda: RowOrigin("<memory>", 0))
    is_text: bool = False


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether ``tokenizer(text)`` (``add_special_tokens=True``) prepends ``bos_token_id``.

    Args:
        tokenizer: a Hugging Face tokenizer.

    Returns:
        True when the default call adds a BOS token in front of the text's tokens.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return len(with_special) > len(without) and with_special[0] == bos and without[:1] != [bos]


class ExampleTokenizer:
    """Tokenizes conversations for SFT, with labels (see the module docstring).

    Args:
        tokenizer: a *fast* Hugging Face tokenizer (offsets are needed to place labels).
        train_on_prompt: train every token, not only the assistant's.
        last_turn_only: train only the last assistant turn.

    Raises:
        DataError: the tokenizer is not a fast tokenizer, or has no EOS token.
    """

    def __init__(
        self, tokenizer: Any, *, train_on_prompt: bool = False, last_turn_only: bool = False
    ) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise DataError(
                f"{type(tokenizer).__name__} is a slow tokenizer; fastmid places labels with "
                "character offsets, which need a fast tokenizer (AutoTokenizer with use_fast=True)"
            )
        if getattr(tokenizer, "eos_token_id", None) is None:
            raise DataError("the tokenizer has no eos_token: set tokenizer.eos_token first")
        self.tokenizer = tokenizer
        self.train_on_prompt = train_on_prompt
        self.last_turn_only = last_turn_only
        self.renderer = ChatRenderer(tokenizer)
        self.bos_id: int | None = getattr(tokenizer, "bos_token_id", None)
        self.eos_id: int = tokenizer.eos_token_id
        self.adds_bos = tokenizer_adds_bos(tokenizer)
        specials = set(getattr(tokenizer, "all_special_ids", []) or [])
        for token_id, token in getattr(tokenizer, "added_tokens_decoder", {}).items():
            if getattr(token, "special", False):
                specials.add(token_id)
        self.special_ids = frozenset(specials)

    def __call__(self, conversation: Conversation) -> TokenizedExample:
        """Tokenize one conversation.

        Args:
            conversation: a validated :class:`Conversation` (chat or text).

        Returns:
            The :class:`TokenizedExample` (not truncated).

        Raises:
            TemplatePrefixError: the template renders a prefix that is not a prefix of the
                full conversation (names the example and the turn).
            BadRowError: ``template_rejected``.
            DataError: the rendering starts with two BOS tokens.
        """
        result = self.encode_batch([conversation])[0]
        if isinstance(result, BadRowError):
            raise result
        return result

    def encode_batch(
        self, conversations: list[Conversation]
    ) -> list[TokenizedExample | BadRowError]:
        """Tokenize several conversations with one batched tokenizer call (faster: the Rust
        tokenizer encodes a batch on all cores).

        Args:
            conversations: validated conversations.

        Returns:
            One entry per conversation, in order: the :class:`TokenizedExample`, or the
            :class:`BadRowError` (``template_rejected``) that row raised,
            for the caller to raise or count.

        Raises:
            TemplatePrefixError, DataError: as :meth:`__call__` (these concern the template,
                not a row, so they are raised, not returned).
        """
        results: list[TokenizedExample | BadRowError | None] = [None] * len(conversations)
        rendered: list[tuple[int, list[tuple[int, int]], str]] = []
        texts: list[str] = []
        for position, conversation in enumerate(conversations):
            if conversation.is_text:
                assert conversation.text is not None
                texts.append(conversation.text)
                rendered.append((position, [], ""))
                continue
            try:
                full, spans, last_prompt = self._char_spans(conversation)
            except BadRowError as err:
                results[position] = err
                continue
            texts.append(full[: spans[-1][1]])
            rendered.append((position, spans, last_prompt))
        if texts:
            encoding = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
            for row, (position, spans, last_prompt) in enumerate(rendered):
                ids = list(encoding["input_ids"][row])
                conversation = conversations[position]
                if conversation.is_text:
                    results[position] = self._text(ids, conversation.origin)
                    continue
                offsets = [tuple(o) for o in encoding["offset_mapping"][row]]
                try:
                    results[position] = self._chat(
                        ids, offsets, spans, last_prompt, texts[row], conversation.origin
                    )
                except BadRowError as err:
                    results[position] = err
        return [r for r in results if r is not None]

    def _text(self, ids: list[int], origin: RowOrigin) -> TokenizedExample:
        ids = ([self.bos_id] if self.adds_bos else []) + ids + [self.eos_id]
        labels = list(ids)
        labels[0] = IGNORE_INDEX
        return TokenizedExample(ids, labels, [], int(self.adds_bos), origin, True)

    def _char_spans(self, conversation: Conversation) -> tuple[str, list[tuple[int, int]], str]:
        """Full rendering (up to the last assistant message), the character spans of the
        assistant turns to label, and the prompt of the last assistant turn."""
        origin = conversation.origin
        messages = conversation.messages
        indices = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        messages = messages[: indices[-1] + 1]
        if self.last_turn_only:
            indices = indices[-1:]
        render = self.renderer.render
        full = render(messages, False, origin)
        spans: list[tuple[int, int]] = []
        prompt = ""
        for index in indices:
            prompt = render(messages[:index], True, origin)
            turn = (
                full if index == len(messages) - 1 else render(messages[: index + 1], False, origin)
            )
            if not (turn.startswith(prompt) and full.startswith(turn)):
                raise TemplatePrefixError(
                    f"{origin}: the chat template does not render assistant turn {index} as a "
                    "continuation of its prompt (the prompt with the generation prompt, or the "
                    "conversation up to this turn, is not a prefix of the full conversation); "
                    "thinking-model templates that rewrite earlier turns do this. Pass "
                    "--last-turn-only (only the last turn is then checked and trained) or use a "
                    "template that renders history unchanged"
                )
            end = max(len(prompt), len(turn.rstrip()))
            spans.append((len(prompt), end))
        return full, spans, prompt

    def _chat(
        self,
        ids: list[int],
        offsets: list[tuple[int, int]],
        spans: list[tuple[int, int]],
        last_prompt: str,
        text: str,
        origin: RowOrigin,
    ) -> TokenizedExample:
        token_spans = self._token_spans(spans, offsets)
        boundary = token_spans[-1][0]
        straddles = boundary < len(offsets) and offsets[boundary][0] < spans[-1][0]
        if straddles or not self._prompt_is_prefix(last_prompt, ids, offsets, boundary):
            ids, token_spans = self._two_piece(last_prompt, text, spans)
        # Every span in token_spans is trained (with last_turn_only it holds the last turn only).
        prompt_labels = list(ids) if self.train_on_prompt else [IGNORE_INDEX] * len(ids)
        out_ids: list[int] = []
        out_labels: list[int] = []
        turns: list[tuple[int, int]] = []
        cursor = 0
        for start, end in token_spans:
            out_ids.extend(ids[cursor:start])
            out_labels.extend(prompt_labels[cursor:start])
            turn_start = len(out_ids)
            out_ids.extend(ids[start:end])
            out_labels.extend(ids[start:end])
            if not (end > start and ids[end - 1] in self.special_ids):
                # the template closed this turn with no special token: EOS teaches the stop
                out_ids.append(self.eos_id)
                out_labels.append(self.eos_id)
            turns.append((turn_start, len(out_ids)))
            cursor = end
        bos = 0
        if self.bos_id is not None:
            if self.adds_bos and out_ids[:1] != [self.bos_id]:
                out_ids.insert(0, self.bos_id)
                out_labels.insert(0, IGNORE_INDEX)
                turns = [(s + 1, e + 1) for s, e in turns]
            if out_ids[:2] == [self.bos_id, self.bos_id]:
                raise DataError(
                    f"{origin}: the rendered conversation starts with two BOS tokens "
                    f"({self.tokenizer.bos_token!r}); the chat template and the tokenizer both add "
                    "one: remove it from the template"
                )
            bos = int(out_ids[:1] == [self.bos_id])
        out_labels[0] = IGNORE_INDEX
        return TokenizedExample(out_ids, out_labels, turns, bos, origin)

    def _prompt_is_prefix(
        self, prompt: str, ids: list[int], offsets: list[tuple[int, int]], boundary: int
    ) -> bool:
        """Whether ``prompt`` tokenized alone gives ``ids[:boundary]``.

        Fast tokenizers split special tokens out before anything else, so the text after the
        last special token tokenizes independently of what precedes it: comparing that tail is
        enough. When the tail differs (a pre-tokenizer that treats a text's first segment
        specially, e.g. SentencePiece's prefix space), the whole prompt is compared.
        """
        last_special = next(
            (j for j in range(boundary - 1, -1, -1) if ids[j] in self.special_ids), None
        )
        if last_special is not None:
            tail = prompt[offsets[last_special][1] :]
            tail_ids = self.tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
            if list(tail_ids) == ids[last_special + 1 : boundary]:
                return True
        whole = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return list(whole) == ids[:boundary]

    def _two_piece(
        self, last_prompt: str, text: str, spans: list[tuple[int, int]]
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """Tokenize the last prompt and the last answer separately and concatenate.

        Used when tokenizing the whole text merges the last prompt's tail with the answer's
        head (e.g. a generation prompt ending in a space, ``"Assistant: "``): the prompt's own
        tokens, which generation will see, then form the prefix by construction.
        """
        text_end = spans[-1][1]
        pieces = self.tokenizer(
            [last_prompt, text[len(last_prompt) : text_end]],
            add_special_tokens=False,
            return_offsets_mapping=True,
        )
        prompt_ids = list(pieces["input_ids"][0])
        prompt_offsets = [tuple(o) for o in pieces["offset_mapping"][0]]
        answer_ids = list(pieces["input_ids"][1])
        token_spans = self._token_spans(spans[:-1], prompt_offsets)
        token_spans.append((len(prompt_ids), len(prompt_ids) + len(answer_ids)))
        return prompt_ids + answer_ids, token_spans

    @staticmethod
    def _token_spans(
        spans: list[tuple[int, int]], offsets: list[tuple[int, int]]
    ) -> list[tuple[int, int]]:
        """Token ranges ``[start, end)`` of character spans: the tokens that overlap each span.

        A token that straddles a span boundary carries answer text, so it belongs to the span.
        """
        result = []
        position = 0
        count = len(offsets)
        for char_start, char_end in spans:
            while position < count and offsets[position][1] <= char_start:
                position += 1
            start = position
            while position < count and offsets[position][0] < char_end:
                position += 1
            result.append((start, position))
        return result
