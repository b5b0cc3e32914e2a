"""GSM8K-style exact-match accuracy and held-out loss.

Accuracy follows the GSM8K convention (Cobbe et al. 2021, "Training Verifiers to Solve Math Word
Problems"): the reference answer is the number after ``####``; a generated answer is scored by
its *last* number (commas removed); they must be equal as numbers. Generation is greedy, batched
and left-padded, with the chat template's generation prompt; a row stops at its end-of-turn token
or once its ``#### <number>`` line has ended (:class:`AnswerLineStop`).

The 95% confidence interval is the Wilson score interval (Wilson 1927, "Probable inference, the law
of succession, and statistical inference", JASA 22:209), which behaves at accuracies near 0 or 1
where the normal approximation does not.

Held-out loss: :func:`token_mean_loss` is the one loop for every held-out loss fastmid reports
(the periodic ``eval_loss`` of a training run and the answer loss here), with the training
tokenization and label rules, so the numbers compare with the training loss.

Several processes (an FSDP2-sharded model, :mod:`fastmid.train.distributed`): every forward pass
all-gathers weights collectively, so every rank must run the same number of them. The generation
is split (:func:`generate_answers` with ``rank``/``world_size``): each global chunk of
``batch_size x world_size`` problems is dealt round-robin, a rank with no problem in a chunk
generates a dummy batch, and ``generate(synced_gpus=True)`` keeps a rank that has finished its
batch running forwards until every rank has; the completions are gathered back into problem order.
The answer loss is not split: every rank computes every batch (same forwards, same number).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console
from scipy.stats import binomtest
from transformers import StoppingCriteria, StoppingCriteriaList

from fastmid.data import collate_batch, pad_token_id
from fastmid.data.chat_template import ChatRenderer, end_of_turn_ids
from fastmid.errors import FastmidError
from fastmid.models.loading import load_model_and_tokenizer
from fastmid.models.loss import batch_loss_sum
from fastmid.progress import make_progress


class EvalError(FastmidError, ValueError):
    """Settings or data the accuracy eval cannot run with; the message names the flag or file."""


def check_eval_settings(n: int, max_new_tokens: int, batch_size: int) -> None:
    """Refuse a count below 1 before any model loads or generates (``--n 0`` would score
    nothing and ``--batch-size 0`` would loop forever or crash inside transformers).

    Raises:
        EvalError: naming the flag of ``fastmid eval``.
    """
    for name, value in (
        ("--n", n),
        ("--max-new-tokens", max_new_tokens),
        ("--batch-size", batch_size),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise EvalError(f"{name}: must be a positive integer, got {value!r}")


def check_ranks(rank: int, world_size: int) -> None:
    """Refuse a ``rank``/``world_size`` pair that is not this process's place in the default
    process group (a wrong pair would deal the problems twice or not at all, or hang).

    ``world_size == 1`` (with ``rank == 0``) is the one-process run and needs no group.

    Raises:
        EvalError: ``world_size < 1``, ``rank`` outside ``[0, world_size)``, or ``world_size > 1``
            without an initialized ``torch.distributed`` group of that size and rank.
    """
    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise EvalError(f"{name}: must be an integer, got {value!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise EvalError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if world_size == 1:
        return
    if not (dist.is_available() and dist.is_initialized()):
        raise EvalError(f"world_size={world_size} needs an initialized torch.distributed group")
    if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
        raise EvalError(
            f"rank={rank}, world_size={world_size} differ from the process group's "
            f"rank {dist.get_rank()} of {dist.get_world_size()}"
        )


def wilson_interval(correct: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``correct / n`` (scipy's
    ``binomtest(...).proportion_ci(method="wilson")``, no continuity correction).

    ``(p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)`` with z the normal quantile of
    ``confidence`` (1.96 for 95%).

    Raises:
        ValueError: ``n < 1`` or ``correct`` outside ``[0, n]``.
    """
    if n < 1 or not 0 <= correct <= n:
        raise ValueError(f"need 0 <= correct <= n and n >= 1, got correct={correct}, n={n}")
    ci = binomtest(correct, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


@dataclass
class AccuracyResult:
    """Exact-match result.

    Attributes:
        n: problems scored; correct: how many matched.
        accuracy: ``correct / n``; ci95: Wilson 95% interval (low, high).
        eval_loss: mean token loss on the reference answers (nats/token), if computed.
        samples: the first few (prompt, generated, predicted, reference) for inspection.
        per_problem: one record per scored problem, in problem order: ``reference`` (str),
            ``predicted`` (str or None) and ``correct`` (bool); what paired statistics over
            problems need (``fastmid ablate``).
    """

    n: int
    correct: int
    accuracy: float
    ci95: tuple[float, float]
    eval_loss: float | None = None
    generation_s: float = 0.0
    samples: list[dict[str, Any]] = field(default_factory=list)
    per_problem: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self, per_problem: bool = False) -> dict[str, Any]:
        """JSON-ready dict (``ci95`` as a list); ``per_problem`` only when asked, so summaries
        and ``fastmid eval --json`` keep their size."""
        out = {**asdict(self), "ci95": list(self.ci95)}
        if not per_problem:
            del out["per_problem"]
        return out


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[list[dict[str, str]]],
    max_new_tokens: int = 256,
    batch_size: int = 16,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> list[str]:
    """Greedy, batched, left-padded generation from chat prompts.

    With ``world_size > 1`` this is a collective: every rank must call it with the same
    ``prompts`` and settings. The prompts are cut into global chunks of ``batch_size x
    world_size``; rank ``r`` generates ``chunk[r::world_size]`` as one batch (the chunk's first
    prompt, discarded, when that share is empty), so every rank makes the same number of
    ``generate`` calls, each with ``synced_gpus=True``; the completions are all-gathered
    (``all_gather_object``) and every rank returns all of them, in prompt order.

    Args:
        prompts: message lists ending with the user turn.
        max_new_tokens: generation budget per prompt, in tokens.
        batch_size: prompts per ``generate`` call (per rank).
        rank, world_size: this process's place in the default process group (0 and 1: one
            process, no group).

    Returns:
        The decoded completions (special tokens removed), one per prompt, in the order of
        ``prompts``.

    Raises:
        EvalError: a ``rank``/``world_size`` pair that does not match the process group
            (:func:`check_ranks`).
    """
    check_ranks(rank, world_size)
    if world_size == 1:
        batches = [prompts[s : s + batch_size] for s in range(0, len(prompts), batch_size)]
        return [
            o for out in _generate_batches(model, tokenizer, batches, max_new_tokens) for o in out
        ]
    step = batch_size * world_size
    chunks = [prompts[s : s + step] for s in range(0, len(prompts), step)]
    shares = [chunk[rank::world_size] for chunk in chunks]
    # An empty share still runs one generate call (on the chunk's first prompt): the other ranks'
    # forwards all-gather weight shards from this rank, so it must run forwards with them.
    batches = [share or chunk[:1] for share, chunk in zip(shares, chunks, strict=True)]
    outs = _generate_batches(model, tokenizer, batches, max_new_tokens, synced_gpus=True)
    mine = [out if share else [] for out, share in zip(outs, shares, strict=True)]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, mine)
    completions: list[str] = [""] * len(prompts)
    for c in range(len(chunks)):
        for r, per_chunk in enumerate(gathered):
            # rank r's k-th completion of chunk c is prompt c*step + r + k*world_size
            for k, text in enumerate(per_chunk[c]):
                completions[c * step + r + k * world_size] = text
    return completions


# the final-answer line is complete: "####", a number on the same line, then the line's end
_ANSWER_LINE = re.compile(r"####[^\n]*\d[^\n]*\n")


class AnswerLineStop(StoppingCriteria):
    """Stop a row of a greedy ``generate`` batch once its final-answer line is complete.

    GSM8K's format ends a solution with ``#### <number>``; once a completion holds a ``####``
    line with a digit in it and that line has ended (a newline), the answer is fixed and what
    follows cannot change a correct score into another one except by writing a second ``####``
    line. A model that keeps writing after its answer line (an untuned model often does: a
    restated question, another solution) would spend the rest of the token budget for nothing,
    and a batch runs until its slowest row stops. The end-of-turn token still stops a row on its
    own (``eos_token_id``).

    Scoring is unchanged in meaning: :func:`fastmid.data.extract_final_answer` takes the number
    after the last ``####``, which is now the first answer line the model wrote.

    Args:
        tokenizer: decodes the generated ids.
        prompt_len: the (left-padded) prompt length of the batch, in tokens; ids from there on
            are the generated ones.
    """

    def __init__(self, tokenizer: Any, prompt_len: int) -> None:
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any
    ) -> torch.BoolTensor:
        """Per-row stop flags, shape ``(batch,)``, dtype bool."""
        texts = self.tokenizer.batch_decode(
            input_ids[:, self.prompt_len :], skip_special_tokens=True
        )
        done = [_ANSWER_LINE.search(t) is not None for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _generate_batches(
    model: torch.nn.Module,
    tokenizer: Any,
    batches: list[list[list[dict[str, str]]]],
    max_new_tokens: int,
    synced_gpus: bool = False,
) -> list[list[str]]:
    """One greedy ``generate`` call per batch of prompts; the decoded completions per batch.

    ``synced_gpus`` is passed to ``generate`` only when true, so a one-process run calls
    ``generate`` exactly as before. Under several processes it is passed explicitly: transformers
    also turns it on by itself for a module carrying ``_is_fsdp_managed_module`` (which torch's
    ``fully_shard`` sets today), but a rank that stops its forwards early hangs the others, so
    this does not rest on either library's detection.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad_id = pad_token_id(tokenizer)
    sync = {"synced_gpus": True} if synced_gpus else {}
    # the renderer training uses: a base model without a chat template is prompted in the same
    # ChatML fallback it was trained in (apply_chat_template raises on it)
    renderer = ChatRenderer(tokenizer)
    outputs: list[list[str]] = []
    try:
        for chunk in batches:
            texts = [renderer.render(m, add_generation_prompt=True) for m in chunk]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(device) for k, v in enc.items()}
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=end_of_turn_ids(tokenizer),
                pad_token_id=pad_id,
                stopping_criteria=StoppingCriteriaList(
                    [AnswerLineStop(tokenizer, enc["input_ids"].shape[1])]
                ),
                **sync,
            )
            new = gen[:, enc["input_ids"].shape[1] :]
            outputs.append(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


def evaluate_accuracy(
    model: torch.nn.Module,
    tokenizer: Any,
    data: str = "builtin:arith:test",
    n: int = 100,
    max_new_tokens: int = 96,
    batch_size: int = 50,
    with_loss: bool = True,
    keep_samples: int = 3,
    skip_bad_rows: bool = False,
    flag: str = "--data",
    *,
    console: Console | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> AccuracyResult:
    """Exact-match accuracy (and mean answer loss) of ``model`` on GSM8K-style problems.

    Shows the problems generated so far (``eval done/total``, over all ranks) on ``console``: a
    rich bar on a terminal, a plain line per batch (and at least once a minute) otherwise.

    With ``world_size > 1`` (an FSDP2-sharded ``model``, one process per rank) this is a
    collective: every rank calls it with the same arguments (``console`` aside: pass a silent one,
    ``Console(quiet=True)``, on ranks other than 0). The generation is split between the ranks
    (:func:`generate_answers`), the answer loss is computed whole on every rank, and every rank
    returns the same result, equal to a one-process run's up to the batching of the generation
    (``generation_s`` is the slowest rank's).

    Args:
        data: ``builtin:arith:test`` or a GSM8K-format JSONL (``question``, ``answer`` with
            ``#### <number>``).
        n: number of problems (the first ``n``).
        skip_bad_rows: skip (and leave out) malformed rows and references without a number
            instead of stopping at the first one.
        flag: the option that gave ``data``, named in its errors: ``--data`` (``fastmid eval``)
            or ``--eval-accuracy-data`` (``fastmid train``).
        console: where the progress goes (a stderr ``rich.console.Console`` when None).
        rank, world_size: this process's place in the default process group (0 and 1: one
            process, no group).

    Raises:
        EvalError: ``n``, ``max_new_tokens`` or ``batch_size`` below 1; a ``rank``/``world_size``
            pair that does not match the process group; the data source yields no problem.
        fastmid.data.DataError: unreadable data (names the file and row).
    """
    import time

    from fastmid.data import extract_final_answer, load_eval_problems

    check_eval_settings(n, max_new_tokens, batch_size)
    check_ranks(rank, world_size)
    problems = load_eval_problems(data, n, skip_bad_rows=skip_bad_rows, flag=flag)
    if not problems:
        raise EvalError(f"{flag} {data}: no evaluation problem found")
    prompts = [p for p, _ in problems]
    console = console if console is not None else Console(stderr=True)
    t0 = time.perf_counter()
    completions: list[str] = []
    # One batch per rank per call, so the bar moves per global batch (the batches are those of
    # one call). A one-process run calls generate_answers without the rank arguments.
    step = batch_size * world_size
    ranks = {} if world_size == 1 else {"rank": rank, "world_size": world_size}
    with make_progress(console, label="eval", eta=True, plain_every=step) as progress:
        task = progress.add_task("eval", total=len(prompts))
        for start in range(0, len(prompts), step):
            chunk = prompts[start : start + step]
            completions += generate_answers(
                model, tokenizer, chunk, max_new_tokens, batch_size, **ranks
            )
            progress.update(task, advance=len(chunk))
    elapsed = time.perf_counter() - t0
    if world_size > 1:
        # the slowest rank's time, so that every rank returns the same result
        times: list[Any] = [None] * world_size
        dist.all_gather_object(times, elapsed)
        elapsed = max(times)
    correct = 0
    samples = []
    per_problem = []
    for (prompt, ref), completion in zip(problems, completions, strict=True):
        pred = extract_final_answer(completion)
        ok = pred is not None and pred == ref
        correct += ok
        per_problem.append({"reference": ref, "predicted": pred, "correct": ok})
        if len(samples) < keep_samples:
            samples.append(
                {
                    "question": prompt[-1]["content"],
                    "completion": completion,
                    "predicted": pred,
                    "reference": ref,
                    "correct": ok,
                }
            )
    loss = (
        answer_loss(
            model,
            tokenizer,
            data,
            len(problems),
            batch_size,
            skip_bad_rows=skip_bad_rows,
            flag=flag,
        )
        if with_loss
        else None
    )
    return AccuracyResult(
        len(problems),
        correct,
        correct / len(problems),
        wilson_interval(correct, len(problems)),
        loss,
        elapsed,
        samples,
        per_problem,
    )


@torch.no_grad()
def answer_loss(
    model: torch.nn.Module,
    tokenizer: Any,
    data: str,
    n: int,
    batch_size: int,
    *,
    skip_bad_rows: bool = False,
    flag: str = "--data",
) -> float | None:
    """Mean token loss (nats per supervised token) of the reference solutions given the prompts.

    Uses the training tokenization and label rules (:func:`fastmid.data.build_sft_examples`) on
    the first ``n`` examples of ``data`` (its ``test`` split unless ``data`` names one);
    ``skip_bad_rows`` and ``flag`` as in :func:`evaluate_accuracy`.

    On an FSDP2-sharded model every rank must call it with the same arguments: each computes
    every batch (the same forwards on every rank) and gets the same value.
    """
    from fastmid.data import build_sft_examples, pad_token_id

    examples, _ = build_sft_examples(
        data, tokenizer, split="test", max_examples=n, skip_bad_rows=skip_bad_rows, flag=flag
    )
    return token_mean_loss(model, examples, batch_size, pad_token_id(tokenizer))


def run_eval(
    model_source: str,
    data: str = "builtin:arith:test",
    n: int = 100,
    max_new_tokens: int = 96,
    batch_size: int = 50,
    skip_bad_rows: bool = False,
    *,
    console: Console | None = None,
) -> AccuracyResult:
    """Load ``model_source`` and run :func:`evaluate_accuracy` (the ``fastmid eval`` command).

    The defaults are ``TrainConfig``'s ``eval_*`` defaults (the accuracy in a run's summary);
    ``skip_bad_rows`` is ``--skip-bad-rows`` (skip malformed problems instead of stopping);
    ``console`` shows the progress (stderr when None).

    Raises:
        EvalError: as :func:`evaluate_accuracy`, checked before the model loads.
        ModelSourceError: an unloadable ``model_source``.
    """
    check_eval_settings(n, max_new_tokens, batch_size)
    model, tokenizer = load_model_and_tokenizer(model_source)
    return evaluate_accuracy(
        model,
        tokenizer,
        data,
        n,
        max_new_tokens,
        batch_size,
        skip_bad_rows=skip_bad_rows,
        console=console,
    )


@torch.no_grad()
def token_mean_loss(
    model: torch.nn.Module,
    examples: Sequence[dict[str, Sequence[int]]],
    batch_size: int,
    pad_id: int,
    *,
    max_batches: int | None = None,
    fused: bool = False,
) -> float | None:
    """Mean next-token loss over every supervised token of ``examples`` (nats per token).

    ``sum of token losses / number of supervised tokens`` over all batches, not a mean of batch
    means, so the result does not depend on ``batch_size``. The model runs in eval mode and gets
    its previous mode back.

    Args:
        model: a ``*ForCausalLM`` of a supported family.
        examples: ``{"input_ids", "labels"}`` dicts (labels ``-100`` where untrained).
        batch_size: examples per forward pass, in order.
        pad_id: the padding id (:func:`fastmid.data.pad_token_id`).
        max_batches: score only the first this many batches (None: all).
        fused: use the fused linear cross-entropy kernel.

    Returns:
        The token-mean loss, or None when there is no supervised token.

    On an FSDP2-sharded model this is a collective: every rank must call it with the same
    ``examples`` and settings (same forwards on every rank; each gets the same value).
    """
    n_batches = math.ceil(len(examples) / batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for b in range(n_batches):
            batch = collate_batch(examples[b * batch_size : (b + 1) * batch_size], pad_id)
            loss_sum, n = batch_loss_sum(model, {k: v.to(device) for k, v in batch.items()}, fused)
            total += float(loss_sum)
            count += int(n)
    finally:
        model.train(was_training)
    return total / count if count else None
