"""Labels by position, the closing token, BOS, template fallbacks and template errors."""

from __future__ import annotations

import warnings

import pytest

from fastmid.data import (
    ChatTemplateFallbackWarning,
    Conversation,
    DataError,
    TemplatePrefixError,
    build_sft_examples,
    collate_batch,
)
from fastmid.data.schema import BadRowError, RowOrigin
from fastmid.data.tokenize import ExampleTokenizer

SYSTEM = "You answer in one word."
THREE_TURNS = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
    {"role": "user", "content": "And of Spain?"},
    {"role": "assistant", "content": "Madrid."},
]


def conv(messages, index=0):
    return Conversation(messages=messages, origin=RowOrigin("mem", index))


def trained_text(tokenizer, example):
    """Decode each maximal run of trained tokens."""
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


@pytest.mark.realmodel
def test_three_turns_with_system_supervise_exactly_the_answers(smol_tokenizer):
    example = ExampleTokenizer(smol_tokenizer)(conv(THREE_TURNS))
    # reference: the template's own rendering; expected trained text is each answer + <|im_end|>
    reference = smol_tokenizer.apply_chat_template(THREE_TURNS, tokenize=False)
    assert smol_tokenizer.decode(example.input_ids) == reference.rstrip("\n")
    assert trained_text(smol_tokenizer, example) == [
        "Paris.<|im_end|>",
        "Rome.<|im_end|>",
        "Madrid.<|im_end|>",
    ]
    im_end = smol_tokenizer.convert_tokens_to_ids("<|im_end|>")
    closing = [i for i, t in enumerate(example.input_ids) if t == im_end]
    assert len(closing) == 7  # system, 3 user and 3 assistant turns
    # exactly the three assistant turns' closing tokens are trained, the others are not
    assert [example.labels[i] != -100 for i in closing] == [
        False,
        False,
        True,
        False,
        True,
        False,
        True,
    ]
    assert example.input_ids[0] == smol_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert example.input_ids[1] != example.input_ids[0]  # one BOS-like start, not two


@pytest.mark.realmodel
def test_default_system_message_is_prompt_not_trained(smol_tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    example = ExampleTokenizer(smol_tokenizer)(conv(messages))
    text = smol_tokenizer.decode(example.input_ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert trained_text(smol_tokenizer, example) == ["Hello!<|im_end|>"]
    # the trained answer starts where the generation prompt ends (prompt tokens are a prefix)
    prompt_ids = smol_tokenizer.apply_chat_template(
        messages[:1], add_generation_prompt=True, return_dict=True
    )["input_ids"]
    assert example.input_ids[: len(prompt_ids)] == list(prompt_ids)
    assert example.labels[len(prompt_ids)] != -100 and example.labels[len(prompt_ids) - 1] == -100


@pytest.mark.realmodel
def test_train_on_prompt_and_last_turn_only(smol_tokenizer):
    everything = ExampleTokenizer(smol_tokenizer, train_on_prompt=True)(conv(THREE_TURNS))
    assert everything.labels[0] == -100  # position 0 is never predicted
    assert everything.labels[1:] == everything.input_ids[1:]
    last = ExampleTokenizer(smol_tokenizer, last_turn_only=True)(conv(THREE_TURNS))
    assert trained_text(smol_tokenizer, last) == ["Madrid.<|im_end|>"]


@pytest.mark.realmodel
def test_padding_side_left_gives_the_same_batch_as_right(smol_tokenizer, write_rows):
    path = write_rows(
        "pc.jsonl",
        [
            {"prompt": "Short?", "completion": "Yes."},
            {"prompt": "A much longer question with many more words in it?", "completion": "No."},
        ],
    )
    batches = {}
    original = smol_tokenizer.padding_side
    try:
        for side in ("left", "right"):
            smol_tokenizer.padding_side = side
            examples, _ = build_sft_examples(str(path), smol_tokenizer)
            batches[side] = collate_batch(examples, smol_tokenizer.pad_token_id)
    finally:
        smol_tokenizer.padding_side = original
    for key in ("input_ids", "attention_mask", "labels"):
        assert batches["left"][key].equal(batches["right"][key])
    mask = batches["right"]["attention_mask"]
    assert mask[0, 0] == 1 and mask[0, -1] == 0  # the short row is padded on the right


def test_toy_bos_tokenizer_gets_exactly_one_bos(toy_tokenizer):
    # a Llama-3-like template that writes the BOS itself, with a tokenizer that also adds one
    template = (
        "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    for chat_template in (template, template.replace("{{ bos_token }}", "")):
        tokenizer = toy_tokenizer(adds_bos=True, chat_template=chat_template)
        example = ExampleTokenizer(tokenizer)(conv(messages))
        assert example.input_ids[0] == tokenizer.bos_token_id
        assert example.input_ids.count(tokenizer.bos_token_id) == 1
        assert example.bos == 1 and example.labels[0] == -100


def test_chatml_fallback_warns_once_per_build(toy_tokenizer, write_rows):
    tokenizer = toy_tokenizer()
    rows = [{"question": f"what is {i}", "answer": f"the answer is {i}"} for i in range(3)]
    path = write_rows("q.jsonl", rows)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        examples, stats = build_sft_examples(str(path), tokenizer)
    fallback = [w for w in caught if issubclass(w.category, ChatTemplateFallbackWarning)]
    assert len(fallback) == 1 and stats.chat_template == "chatml-fallback"
    text = tokenizer.decode(examples[0]["input_ids"])
    assert (
        text
        == "<|im_start|>user\nwhat is 0<|im_end|>\n<|im_start|>assistant\nthe answer is 0<|im_end|>"
    )
    trained = [
        t
        for t, lab in zip(examples[0]["input_ids"], examples[0]["labels"], strict=True)
        if lab != -100
    ]
    assert tokenizer.decode(trained) == "the answer is 0<|im_end|>"


def test_template_without_closing_token_gets_a_trained_eos(toy_tokenizer):
    template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n"
        "{% else %}Assistant: {{ m['content'] }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}Assistant: {% endif %}"
    )
    tokenizer = toy_tokenizer(chat_template=template)
    messages = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "world"},
        {"role": "user", "content": "how are you"},
        {"role": "assistant", "content": "doing"},
    ]
    example = ExampleTokenizer(tokenizer)(conv(messages))
    eos = tokenizer.eos_token_id
    assert example.input_ids.count(eos) == 2 and example.input_ids[-1] == eos
    positions = [i for i, t in enumerate(example.input_ids) if t == eos]
    assert all(example.labels[i] == eos for i in positions)
    # the history answer keeps its space-merged token (" world", as generation sees history);
    # the last answer is tokenized apart from its prompt ("Assistant: " then "doing")
    assert trained_text(tokenizer, example) == [" world</s>", "doing</s>"]


THINKING = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and loop.last %}<think>\n</think>\n{% endif %}"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_history_rewriting_template_is_a_clear_error(toy_tokenizer):
    tokenizer = toy_tokenizer(chat_template=THINKING)
    messages = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "world"},
        {"role": "user", "content": "how"},
        {"role": "assistant", "content": "are"},
    ]
    with pytest.raises(TemplatePrefixError, match=r"mem, row 4: .*assistant turn 1"):
        ExampleTokenizer(tokenizer)(conv(messages, index=3))
    # only the last turn is rendered as a continuation: works with last_turn_only
    example = ExampleTokenizer(tokenizer, last_turn_only=True)(conv(messages))
    assert trained_text(tokenizer, example) == ["<think>\n</think>\nare<|im_end|>"]


def test_template_that_raises_is_a_bad_row(toy_tokenizer):
    template = "{{ raise_exception('roles must alternate') }}"
    tokenizer = toy_tokenizer(chat_template=template)
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(BadRowError, match="roles must alternate") as info:
        ExampleTokenizer(tokenizer)(conv(messages))
    assert info.value.kind == "template_rejected"


def test_tokens_overlapping_a_span_belong_to_it():
    offsets = [(0, 3), (3, 6), (6, 9), (9, 12)]
    assert ExampleTokenizer._token_spans([(3, 9)], offsets) == [(1, 3)]
    assert ExampleTokenizer._token_spans([(4, 8)], offsets) == [(1, 3)]
    assert ExampleTokenizer._token_spans([(0, 2), (7, 12)], offsets) == [(0, 1), (2, 4)]


def test_generation_prompt_ending_in_space_keeps_prompt_tokens_a_prefix(toy_tokenizer):
    template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n"
        "{% else %}Assistant: {{ m['content'] }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}Assistant: {% endif %}"
    )
    tokenizer = toy_tokenizer(chat_template=template)
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    example = ExampleTokenizer(tokenizer)(conv(messages))
    prompt_ids = tokenizer("User: hello\nAssistant: ", add_special_tokens=False)["input_ids"]
    assert example.input_ids[: len(prompt_ids)] == prompt_ids
    assert example.labels[: len(prompt_ids)] == [-100] * len(prompt_ids)
    assert trained_text(tokenizer, example) == ["world</s>"]


def test_slow_tokenizer_is_rejected():
    class Slow:
        is_fast = False

    with pytest.raises(DataError, match="fast tokenizer"):
        ExampleTokenizer(Slow())


def test_text_examples_train_every_token_and_end_with_eos(toy_tokenizer):
    tokenizer = toy_tokenizer(adds_bos=True)
    example = ExampleTokenizer(tokenizer)(Conversation(text="hello world"))
    body = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    assert example.input_ids == [tokenizer.bos_token_id, *body, tokenizer.eos_token_id]
    assert example.labels == [-100, *body, tokenizer.eos_token_id]
