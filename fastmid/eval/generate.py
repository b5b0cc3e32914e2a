"""Generate a reply to a prompt with a model's chat template (the ``fastmid generate`` command).

A prompt becomes one user message (after an optional system message), rendered with the model's
chat template and its generation prompt by :class:`fastmid.data.chat_template.ChatRenderer` (the
renderer training uses, so a tuned model sees the format it was trained on; ChatML when the
tokenizer has no template) and tokenized without added special tokens, as the accuracy eval does
(:func:`fastmid.eval.exact_match.generate_answers`). Generation stops at the template's
end-of-turn tokens (:func:`fastmid.data.chat_template.end_of_turn_ids`) or after
``max_new_tokens``. Temperature 0 is greedy decoding (deterministic); above 0 it samples, with
nucleus (top-p) filtering and an optional seed.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TextIO

import torch

from fastmid.data import BadRowError, pad_token_id
from fastmid.data.chat_template import ChatRenderer, end_of_turn_ids
from fastmid.errors import FastmidError
from fastmid.models.loading import load_model_and_tokenizer


class GenerateError(FastmidError, ValueError):
    """A prompt or setting ``fastmid generate`` cannot run with; the message names the flag."""


@dataclass
class GenerationResult:
    """One prompt's completion.

    Attributes:
        prompt: the prompt as given (the user message).
        completion: the decoded reply, special tokens removed.
        tokens: tokens generated (the end-of-turn token included when generation stopped on one).
        seconds: wall-clock time of the generation, in seconds (model loading excluded).
    """

    prompt: str
    completion: str
    tokens: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with the keys ``prompt``, ``completion``, ``tokens``, ``seconds``."""
        return asdict(self)


def check_generate_settings(max_new_tokens: int, temperature: float, top_p: float) -> None:
    """Refuse settings ``model.generate`` would reject or misread, before any model loads.

    Args:
        max_new_tokens: generation budget per prompt, in tokens; at least 1.
        temperature: softmax temperature; 0 (greedy) or a finite positive number.
        top_p: nucleus probability mass, in ``(0, 1]``; used only when sampling.

    Raises:
        GenerateError: naming the flag of ``fastmid generate``.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise GenerateError(f"--max-new-tokens: must be a positive integer, got {max_new_tokens!r}")
    if max_new_tokens < 1:
        raise GenerateError(f"--max-new-tokens: must be a positive integer, got {max_new_tokens}")
    if not math.isfinite(temperature) or temperature < 0:
        raise GenerateError(f"--temperature: must be >= 0 (0: greedy), got {temperature}")
    if not math.isfinite(top_p) or not 0 < top_p <= 1:
        raise GenerateError(f"--top-p: must be in (0, 1], got {top_p}")


def read_prompts(prompts: Sequence[str], stdin: TextIO | None = None) -> list[str]:
    """The prompts to generate from, in order; ``-`` is the whole of standard input (trailing
    newlines removed).

    Args:
        prompts: the ``--prompt`` values.
        stdin: where ``-`` reads from (default: ``sys.stdin``).

    Raises:
        GenerateError: no prompt, an empty (or whitespace-only) prompt, or ``-`` given twice.
    """
    if not prompts:
        raise GenerateError("--prompt: give at least one prompt (or '-' to read standard input)")
    if sum(p == "-" for p in prompts) > 1:
        raise GenerateError("--prompt: '-' (standard input) can be given only once")
    out = []
    for i, prompt in enumerate(prompts, start=1):
        where = f"--prompt #{i}" if len(prompts) > 1 else "--prompt"
        if prompt == "-":
            prompt = (stdin if stdin is not None else sys.stdin).read().rstrip("\r\n")
            where += " (standard input)"
        if not prompt.strip():
            raise GenerateError(f"{where}: the prompt is empty")
        out.append(prompt)
    return out


def prompt_messages(prompt: str, system: str | None = None) -> list[dict[str, str]]:
    """``[{"role": "system", ...}, {"role": "user", "content": prompt}]``; no system message when
    ``system`` is None (the template may then add its own default, as in training)."""
    messages = [] if system is None else [{"role": "system", "content": system}]
    return [*messages, {"role": "user", "content": prompt}]


def prompt_input_ids(
    tokenizer: Any, prompt: str, system: str | None = None, renderer: ChatRenderer | None = None
) -> list[int]:
    """Token ids of ``prompt`` rendered with the chat template and the generation prompt.

    Args:
        tokenizer: the model's tokenizer.
        prompt: the user message; system: an optional system message.
        renderer: a :class:`ChatRenderer` of ``tokenizer`` to reuse (it warns once when the
            tokenizer has no template); default a new one.

    Returns:
        The ids, shape ``[prompt_len]``, special tokens only where the template writes them.

    Raises:
        GenerateError: the chat template rejects the messages.
    """
    renderer = renderer or ChatRenderer(tokenizer)
    try:
        text = renderer.render(prompt_messages(prompt, system), add_generation_prompt=True)
    except BadRowError as exc:
        raise GenerateError(
            f"--prompt: the chat template rejected the prompt: {exc.__cause__ or exc}"
        ) from None
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@torch.no_grad()
def generate_completion(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: str,
    *,
    system: str | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    renderer: ChatRenderer | None = None,
) -> GenerationResult:
    """Generate the reply to one prompt.

    Args:
        model: a ``*ForCausalLM``; runs in eval mode and gets its previous mode back.
        tokenizer: its tokenizer.
        prompt: the user message; system: an optional system message.
        max_new_tokens: generation budget, in tokens.
        temperature: 0 for greedy decoding (deterministic), else the sampling temperature.
        top_p: nucleus mass kept when sampling (1: no filtering); ignored when greedy.
        seed: seeds torch's generator before sampling, so a seeded run repeats; None: unseeded.
        renderer: as in :func:`prompt_input_ids`.

    Returns:
        The :class:`GenerationResult`.

    Raises:
        GenerateError: a bad setting, or the chat template rejects the prompt.
    """
    check_generate_settings(max_new_tokens, temperature, top_p)
    ids = prompt_input_ids(tokenizer, prompt, system, renderer)
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)  # [1, prompt_len]
    if temperature > 0:
        if seed is not None:
            torch.manual_seed(seed)
        sampling: dict[str, Any] = {"do_sample": True, "temperature": temperature, "top_p": top_p}
        sampling["top_k"] = None  # only the flags given here filter (no generation_config top_k)
    else:
        # explicit None: a model's generation_config sampling defaults neither apply nor warn
        sampling = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    was_training = model.training
    model.eval()
    try:
        t0 = time.perf_counter()
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            eos_token_id=end_of_turn_ids(tokenizer),
            pad_token_id=pad_token_id(tokenizer),
            **sampling,
        )  # [1, prompt_len + new]
        seconds = time.perf_counter() - t0
    finally:
        model.train(was_training)
    new = out[0, input_ids.shape[1] :].tolist()
    return GenerationResult(
        prompt=prompt,
        completion=tokenizer.decode(new, skip_special_tokens=True),
        tokens=len(new),
        seconds=seconds,
    )


def run_generate(
    model_source: str,
    prompts: Sequence[str],
    *,
    system: str | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stdin: TextIO | None = None,
) -> Iterator[GenerationResult]:
    """Load ``model_source`` once and generate the reply to each prompt in turn (the
    ``fastmid generate`` command).

    The settings and the prompts (standard input for ``-``) are checked before the model loads;
    results are yielded as each finishes. Arguments as in :func:`generate_completion` and
    :func:`read_prompts`.

    Raises:
        GenerateError: a bad setting or an empty prompt (before loading).
        ModelSourceError: an unloadable ``model_source``.
    """
    check_generate_settings(max_new_tokens, temperature, top_p)
    texts = read_prompts(prompts, stdin)
    model, tokenizer = load_model_and_tokenizer(model_source)
    renderer = ChatRenderer(tokenizer)
    for text in texts:
        yield generate_completion(
            model,
            tokenizer,
            text,
            system=system,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            renderer=renderer,
        )
