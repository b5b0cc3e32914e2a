"""``bench/peers_cpu.py`` (issue 19): TRL's completion-only loss on the prompt-completion form of
``builtin:arith`` supervises exactly fastmid's tokens, and the benchmark's FLOP count.

The benchmark itself (several minutes) is not run here. TRL is in the ``[dev]`` extra (and the
``[bench]`` one), so the test that runs TRL's own dataset preparation runs in CI; it is skipped
only where TRL is absent. The others check the same property with the tokenizer alone.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from bench_scripts import load_bench_script

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "peers_cpu.py"
ROWS = 16


def load_script() -> ModuleType:
    return load_bench_script("peers_cpu.py", "peers_cpu")


@pytest.fixture(scope="module")
def peers() -> ModuleType:
    return load_script()


@pytest.fixture(scope="module")
def rows(peers: ModuleType, smol_tokenizer: Any) -> list[dict[str, Any]]:
    """The first of the benchmark's data: fastmid's default training examples in its epoch-0
    order (the benchmark also checks all of them against ``build_sft_examples``; too slow here on
    a cold tokenization cache)."""
    return peers.prepare_data(smol_tokenizer, limit=ROWS, verify=False)


def test_data_is_fastmids_training_order(rows: list[dict[str, Any]]) -> None:
    assert len(rows) == ROWS
    first = rows[0]
    assert first["prompt"].startswith("<|im_start|>system\n")
    assert first["prompt"].endswith("<|im_start|>assistant\n")
    assert first["completion"].endswith("#### 32<|im_end|>")
    assert first["labels"][0] == -100


def test_string_prompt_completion_supervises_fastmids_tokens(
    peers: ModuleType, rows: list[dict[str, Any]], smol_tokenizer: Any
) -> None:
    """TRL's non-conversational path: the prompt and prompt + completion tokenized as text, the
    completion where they part (``trl.data_utils.common_prefix_length``)."""
    theirs = []
    for r in rows[:ROWS]:
        prompt = smol_tokenizer(r["prompt"])["input_ids"]
        full = smol_tokenizer(r["prompt"] + r["completion"])["input_ids"]
        start = next(
            (k for k, (a, b) in enumerate(zip(prompt, full, strict=False)) if a != b), len(prompt)
        )
        theirs.append({"input_ids": full, "labels": [-100] * start + full[start:]})
    check = peers.compare_labels(rows[:ROWS], theirs)
    assert check["identical_input_ids"] == ROWS
    assert check["identical_supervised_tokens"] == ROWS
    assert check["first_difference"] is None


def test_conversational_form_would_also_train_the_newline(
    peers: ModuleType, rows: list[dict[str, Any]], smol_tokenizer: Any
) -> None:
    """Why the benchmark gives TRL strings: its conversational prompt-completion form renders the
    whole conversation, whose ChatML ends in a newline after ``<|im_end|>``, and trains it."""
    r = rows[0]
    answer = r["completion"][: -len(smol_tokenizer.eos_token)]
    question = r["prompt"].split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    full = smol_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)
    full = list(full["input_ids"])
    assert full[: len(r["input_ids"])] == r["input_ids"]
    assert smol_tokenizer.decode(full[len(r["input_ids"]) :]) == "\n"
    theirs = {"input_ids": full, "labels": [-100] * 1 + full[1:]}
    assert peers.compare_labels(rows[:1], [theirs])["identical_input_ids"] == 0


def test_trl_prepares_fastmids_tokens(
    peers: ModuleType, rows: list[dict[str, Any]], tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """TRL's own preparation (``SFTTrainer`` with the benchmark's ``SFTConfig``) on a tiny model
    with SmolLM2's tokenizer: every example's input ids and supervised tokens are fastmid's."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    spec = {"run_dir": str(tmp_path / "trl"), "steps": 1}
    args = SFTConfig(**peers.trl_config("trl", spec))
    data = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    assert trainer.completion_only_loss
    prepared = [trainer.train_dataset[k] for k in range(ROWS)]
    check = peers.compare_labels(rows[:ROWS], prepared)
    assert check["identical_input_ids"] == ROWS, check
    assert check["identical_supervised_tokens"] == ROWS, check


def test_flop_count(peers: ModuleType) -> None:
    """SmolLM2-135M's default band: 2 P below, 6 P in, 4 P above per token; attention with the
    causal context; the frozen head twice (forward, input gradient) at supervised tokens."""
    config = {
        "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
        "num_key_value_heads": 3, "head_dim": 64, "num_hidden_layers": 30, "vocab_size": 49152,
    }  # fmt: skip
    dims = peers.model_dims(config)
    assert dims["layer_parameters"] * 18 == 63_721_728  # the band's trainable parameters
    band = list(range(6, 24))
    one = peers.step_flops(dims, band, tokens=1, supervised=0, context_sum=0)
    assert one["total"] == dims["layer_parameters"] * (2 * 6 + 6 * 18 + 4 * 6)
    attention = peers.step_flops(dims, band, tokens=0, supervised=0, context_sum=10)["attention"]
    assert attention == 4 * 576 * 10 * (6 + 3 * 18 + 3 * 6)
    head = peers.step_flops(dims, band, tokens=0, supervised=1, context_sum=0)["head"]
    assert head == 4 * 576 * 49152
    shapes = peers.gemm_shapes(dims, 100)
    flops = sum(2 * s["m"] * s["k"] * s["n"] * s["count"] for s in shapes)
    assert flops == 6 * 100 * (dims["layer_parameters"] - 2 * 576)  # a band layer's 6 P (no norms)
