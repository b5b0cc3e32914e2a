"""GSM8K-style exact-match accuracy and held-out loss.

Accuracy follows the GSM8K convention (Cobbe et al. 2021, "Training Verifiers to Solve Math Word
Problems"): the reference answer is the number after ``####``; a generated answer is scored by
its *last* number (commas removed); they must be equal as numbers. Generation is greedy, batched
and left-padded, with the chat template's generation prompt.

The 95% confidence interval is the Wilson score interval (Wilson 1927, "Probable inference, the law
of succession, and statistical inference", JASA 22:209), which behaves at accuracies near 0 or 1
where the normal approximation does not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from fastmid.data.chat_template import end_of_turn_ids
from fastmid.models.loading import load_model_and_tokenizer


def wilson_interval(correct: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``correct / n``.

    ``(p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)``; z = 1.96 gives 95%.

    Raises:
        ValueError: ``n < 1`` or ``correct`` outside ``[0, n]``.
    """
    if n < 1 or not 0 <= correct <= n:
        raise ValueError(f"need 0 <= correct <= n and n >= 1, got correct={correct}, n={n}")
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class AccuracyResult:
    """Exact-match result.

    Attributes:
        n: problems scored; correct: how many matched.
        accuracy: ``correct / n``; ci95: Wilson 95% interval (low, high).
        eval_loss: mean token loss on the reference answers (nats/token), if computed.
        samples: the first few (prompt, generated, predicted, reference) for inspection.
    """

    n: int
    correct: int
    accuracy: float
    ci95: tuple[float, float]
    eval_loss: float | None = None
    generation_s: float = 0.0
    samples: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "n": self.n,
            "correct": self.correct,
            "accuracy": self.accuracy,
            "ci95": list(self.ci95),
            "eval_loss": self.eval_loss,
            "generation_s": self.generation_s,
            "samples": self.samples,
        }


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[list[dict[str, str]]],
    max_new_tokens: int = 256,
    batch_size: int = 16,
) -> list[str]:
    """Greedy, batched, left-padded generation from chat prompts.

    Args:
        prompts: message lists ending with the user turn.
        max_new_tokens: generation budget per prompt, in tokens.

    Returns:
        The decoded completions (special tokens removed), one per prompt.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    outputs: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            texts = [
                tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
                for m in chunk
            ]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(device) for k, v in enc.items()}
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=end_of_turn_ids(tokenizer),
                pad_token_id=pad_id,
            )
            new = gen[:, enc["input_ids"].shape[1] :]
            outputs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


def evaluate_accuracy(
    model: torch.nn.Module,
    tokenizer: Any,
    data: str = "builtin:arith:test",
    n: int = 200,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    with_loss: bool = True,
    keep_samples: int = 3,
) -> AccuracyResult:
    """Exact-match accuracy (and mean answer loss) of ``model`` on GSM8K-style problems.

    Args:
        data: ``builtin:arith:test`` or a GSM8K-format JSONL (``question``, ``answer`` with
            ``#### <number>``).
        n: number of problems (the first ``n``).

    Raises:
        ValueError: the data source yields no problem.
    """
    import time

    from fastmid.data import extract_final_answer, load_eval_problems

    problems = load_eval_problems(data, n)
    if not problems:
        raise ValueError(f"--data {data}: no evaluation problem found")
    prompts = [p for p, _ in problems]
    t0 = time.perf_counter()
    completions = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size)
    elapsed = time.perf_counter() - t0
    correct = 0
    samples = []
    for (prompt, ref), completion in zip(problems, completions, strict=True):
        pred = extract_final_answer(completion)
        ok = pred is not None and pred == ref
        correct += ok
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
    loss = answer_loss(model, tokenizer, data, len(problems), batch_size) if with_loss else None
    return AccuracyResult(
        len(problems),
        correct,
        correct / len(problems),
        wilson_interval(correct, len(problems)),
        loss,
        elapsed,
        samples,
    )


@torch.no_grad()
def answer_loss(
    model: torch.nn.Module, tokenizer: Any, data: str, n: int, batch_size: int
) -> float | None:
    """Mean token loss (nats per supervised token) of the reference solutions given the prompts.

    Uses the training tokenization and label rules (:func:`fastmid.data.build_sft_examples`) on
    the first ``n`` examples of ``data`` (its ``test`` split unless ``data`` names one).
    """
    from fastmid.data import build_sft_examples, collate_batch
    from fastmid.models.loss import causal_lm_loss_sum

    examples, _ = build_sft_examples(data, tokenizer, split="test", max_examples=n)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate_batch(examples[start : start + batch_size], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        loss_sum, k = causal_lm_loss_sum(
            model, batch["input_ids"], batch["attention_mask"], batch["labels"]
        )
        total += float(loss_sum)
        count += int(k)
    model.train(was_training)
    return total / count if count else None


def run_eval(
    model_source: str,
    data: str = "builtin:arith:test",
    n: int = 200,
    max_new_tokens: int = 256,
    batch_size: int = 16,
) -> AccuracyResult:
    """Load ``model_source`` and run :func:`evaluate_accuracy` (the ``fastmid eval`` command)."""
    model, tokenizer = load_model_and_tokenizer(model_source)
    return evaluate_accuracy(model, tokenizer, data, n, max_new_tokens, batch_size)
