"""`fastmid analyze` progress: a rich bar on a terminal, plain lines over the (layer group, batch)
steps and the gradient-norm batches when the console is a log."""

from __future__ import annotations

import re
from io import StringIO

import pytest
from analysis_tiny import perturbed_from, tiny_llama
from rich.console import Console
from tiny import save_tiny

from fastmid.analysis.analyze import run_analysis

ANSI = "\x1b["
PLAIN = re.compile(
    r"^analyze: (layer statistics|gradient norms) (\d+)/(\d+) elapsed \d+:\d\d:\d\d"
    r"( ETA \d+:\d\d:\d\d)?$"
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, smol_tokenizer):
    """A tiny 4-layer Llama and a perturbed copy with SmolLM2's tokenizer, as HF folders."""
    root = tmp_path_factory.mktemp("progress-models")
    base = tiny_llama(4)
    base.config.vocab_size = len(smol_tokenizer)
    base.resize_token_embeddings(len(smol_tokenizer))
    tuned = perturbed_from(base, first_layer=2)
    return [str(save_tiny(root / n, m, smol_tokenizer)) for n, m in (("b", base), ("t", tuned))]


def _analyze(folders, terminal: bool) -> str:
    out = StringIO()
    run_analysis(
        *folders,
        "builtin:arith",
        max_tokens=480,
        max_seq_len=64,
        batch_size=2,
        grad_norms=True,
        output_dir=None,
        console=Console(file=out, force_terminal=terminal, width=160),
        device="cpu",
        memory_budget_bytes=1,  # one layer per group: 4 groups x the batches
    )
    return out.getvalue()


def test_a_log_gets_plain_lines_over_layer_groups_and_batches(folders):
    text = _analyze(folders, terminal=False)
    assert ANSI not in text
    found = [m for m in map(PLAIN.match, text.splitlines()) if m]
    stats = [(int(m[2]), int(m[3])) for m in found if m[1] == "layer statistics"]
    grads = [(int(m[2]), int(m[3])) for m in found if m[1] == "gradient norms"]
    batches = grads[-1][1]
    assert batches >= 2
    total = 4 * batches  # 4 single-layer groups, each over every batch
    # a line per tenth of the steps (every ceil(total / 10) steps) and one at the end
    step = -(-total // 10)
    assert stats == [(d, total) for d in (*range(step, total, step), total)]
    assert grads[-1] == (batches, batches) and len(grads) <= 11
    assert "recommended band" in text  # the table follows the progress


def test_a_terminal_gets_the_rich_bar(folders):
    text = _analyze(folders, terminal=True)
    assert ANSI in text and "━" in text
    assert "analyze: layer statistics" in text and "analyze: gradient norms" in text
    assert "elapsed" not in text  # no plain line
