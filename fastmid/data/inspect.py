"""``fastmid data inspect``: counts, token statistics and label masks, printed with rich.

The report shows what a training run would see before any GPU time is spent: the detected format,
rows read and bad rows skipped (per kind), the fields the format ignores (per field: rows), the
ShareGPT cleanup counts, kept / truncated / dropped examples (per reason, ``empty_answer``
included), token and trained-token statistics (mean, p50, p95, max), and ``n`` examples decoded
with the trained tokens highlighted. Without colour (``NO_COLOR``, ``color_system=None``) or off a
terminal (piped, redirected), trained spans are also marked in the text as ``[[...]]``.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from fastmid.data.packing import PackingStats, packing_stats
from fastmid.data.pipeline import build_sft_examples
from fastmid.data.stats import DataStats, summarize
from fastmid.labels import IGNORE_INDEX

TRAINED_STYLE = "bold black on green"
PROMPT_STYLE = "dim"
_ELIDE_CHARS = 1200  # longer runs of text are shown as head ... tail
MARK_OPEN, MARK_CLOSE = "[[", "]]"  # trained spans, where colour cannot show them


def needs_text_marks(console: Console) -> bool:
    """True when ``console`` cannot show the trained-token colour: colour is off or it does not
    write to a terminal."""
    return console.no_color or console.color_system is None or not console.is_terminal


def label_runs(input_ids: list[int], labels: list[int], tokenizer: Any) -> list[tuple[str, bool]]:
    """Decode an example into runs of trained and untrained text.

    Consecutive tokens with the same trained/untrained state are decoded together, so multi-byte
    characters split across tokens decode whole.

    Args:
        input_ids: token ids, length T.
        labels: length T; -100 where not trained.
        tokenizer: the tokenizer (``decode`` with special tokens kept).

    Returns:
        ``[(text, trained), ...]`` covering the whole example in order.
    """
    runs: list[tuple[str, bool]] = []
    start = 0
    for index in range(1, len(input_ids) + 1):
        if index == len(input_ids) or (labels[index] != IGNORE_INDEX) != (
            labels[start] != IGNORE_INDEX
        ):
            text = tokenizer.decode(input_ids[start:index], skip_special_tokens=False)
            runs.append((text, labels[start] != IGNORE_INDEX))
            start = index
    return runs


def _elide(text: str) -> str:
    if len(text) <= _ELIDE_CHARS:
        return text
    half = _ELIDE_CHARS // 2
    return f"{text[:half]} [... {len(text) - 2 * half} characters ...] {text[-half:]}"


def render_example(example: dict[str, list[int]], tokenizer: Any, *, marks: bool = False) -> Text:
    """A rich ``Text`` of one example with trained tokens highlighted.

    Args:
        example: ``{"input_ids", "labels"}``.
        tokenizer: the tokenizer used to build it.
        marks: also wrap each trained run in ``[[`` ... ``]]`` (for output without colour).

    Returns:
        The text; runs longer than 1200 characters are shortened to their head and tail.
    """
    text = Text()
    for chunk, trained in label_runs(example["input_ids"], example["labels"], tokenizer):
        chunk = _elide(chunk)
        if trained and marks:
            chunk = f"{MARK_OPEN}{chunk}{MARK_CLOSE}"
        text.append(chunk, style=TRAINED_STYLE if trained else PROMPT_STYLE)
    return text


def legend_text(marks: bool) -> Text:
    """The legend printed above the examples (naming the ``[[...]]`` marks when used)."""
    legend = Text("legend: ")
    trained = f"{MARK_OPEN}trained tokens{MARK_CLOSE}" if marks else "trained tokens"
    legend.append(trained, style=TRAINED_STYLE)
    legend.append("  ")
    legend.append("not trained (prompt, template)", style=PROMPT_STYLE)
    if marks:
        legend.append(f"  (trained text is marked {MARK_OPEN}...{MARK_CLOSE}: no colour here)")
    return legend


def _fmt(value: float | int | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.1f}" if isinstance(value, float) else f"{value:,}"


def stats_tables(stats: DataStats) -> list[Table]:
    """The report's tables: counts, token statistics, bad rows, ignored fields, ShareGPT
    cleanup."""
    counts = Table(title="Data", show_header=False, title_justify="left")
    counts.add_column("what", no_wrap=True)
    counts.add_column("value", justify="right", overflow="fold")
    counts.add_row("sources", ", ".join(stats.sources))
    counts.add_row("format", stats.format)
    counts.add_row("chat template", stats.chat_template)
    if getattr(stats, "cache_note", None):
        counts.add_row("cache", stats.cache_note)
    counts.add_row("rows read", _fmt(stats.rows_read))
    counts.add_row("bad rows skipped", _fmt(stats.bad_rows_skipped))
    counts.add_row("conversations", _fmt(stats.conversations))
    counts.add_row("tokenized", _fmt(stats.tokenized))
    counts.add_row("examples kept", _fmt(stats.kept))
    counts.add_row("  of which truncated", _fmt(stats.truncated))
    counts.add_row("examples dropped", _fmt(stats.dropped_total))
    for reason, count in stats.dropped.items():
        counts.add_row(f"  {reason}", _fmt(count))

    tokens = Table(title="Tokens per example", title_justify="left")
    for name in ("", "total", "mean", "p50", "p95", "max"):
        tokens.add_column(name, justify="right" if name else "left")
    for label, values in (("tokens", stats.tokens), ("trained", stats.supervised_tokens)):
        s = summarize(values)
        tokens.add_row(label, *(_fmt(s[k]) for k in ("total", "mean", "p50", "p95", "max")))

    tables = [counts, tokens]
    if stats.bad_rows:
        bad = Table(title="Bad rows skipped", title_justify="left")
        bad.add_column("kind")
        bad.add_column("rows", justify="right")
        for kind, count in sorted(stats.bad_rows.items()):
            bad.add_row(kind, _fmt(count))
        tables.append(bad)
    if stats.ignored_fields:
        ignored = Table(
            title="Fields ignored (the format does not read them)", title_justify="left"
        )
        ignored.add_column("field")
        ignored.add_column("rows", justify="right")
        for name, count in sorted(stats.ignored_fields.items()):
            ignored.add_row(name, _fmt(count))
        tables.append(ignored)
    if any(fmt == "sharegpt" for fmt in stats.formats.values()):
        cleanup = Table(title="ShareGPT cleanup", title_justify="left")
        cleanup.add_column("rule")
        cleanup.add_column("count", justify="right")
        for rule, count in stats.sharegpt.items():
            cleanup.add_row(rule, _fmt(count))
        tables.append(cleanup)
    return tables


def packing_table(stats: PackingStats) -> Table:
    """The ``--packing`` report: rows, fill ratio, tokens computed on with and without packing."""
    table = Table(title=f"--packing: rows of {stats.max_len} tokens", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("examples", f"{stats.examples:,}")
    table.add_row("rows", f"{stats.rows:,}")
    table.add_row("fill ratio", f"{stats.fill_ratio:.1%}")
    table.add_row("real tokens", f"{stats.tokens:,}")
    table.add_row("tokens computed, unpacked", f"{stats.padded_tokens_unpacked:,}")
    table.add_row("tokens computed, packed", f"{stats.padded_tokens_packed:,}")
    saved = stats.padded_tokens_unpacked - stats.padded_tokens_packed
    share = saved / stats.padded_tokens_unpacked if stats.padded_tokens_unpacked else 0.0
    table.add_row("padding saved", f"{saved:,} ({share:.1%})")
    return table


def inspect_data(
    data: str,
    tokenizer: Any,
    max_seq_len: int = 512,
    n: int = 2,
    *,
    split: str = "train",
    format: str | None = None,
    skip_bad_rows: bool = False,
    truncation: str = "prompt-left",
    train_on_prompt: bool = False,
    last_turn_only: bool = False,
    max_examples: int | None = 2000,
    shuffle_seed: int = 0,
    packing: bool = False,
    micro_batch: int = 8,
    console: Console | None = None,
) -> DataStats:
    """Build the examples of ``data`` and print the inspection report.

    Args:
        data: a data string (see :func:`fastmid.data.build_sft_examples`).
        tokenizer: the model's tokenizer.
        max_seq_len: tokens per example, as in training (the defaults are ``TrainConfig``'s).
        n: examples to print with their label mask (the first ``n`` kept); 0 prints none.
        split, format, skip_bad_rows, truncation, train_on_prompt, last_turn_only,
            max_examples, shuffle_seed: as in :func:`fastmid.data.build_sft_examples`
            (``shuffle_seed=0`` as ``fastmid train``, so the same examples are chosen).
        packing: also show what ``--packing`` makes of the examples: rows of ``max_seq_len``
            tokens, their fill ratio, and the padding it saves against micro-batches of
            ``micro_batch`` examples padded to their longest (:func:`fastmid.data.packing_stats`).
        console: where to print the report, and the tokenization progress of large data
            (``console`` of :func:`fastmid.data.build_sft_examples`); a fresh
            ``rich.console.Console`` when None.

    Returns:
        The :class:`DataStats` of the build.

    Raises:
        DataError: as :func:`fastmid.data.build_sft_examples` (an empty result is reported,
            not raised).
    """
    console = console or Console()
    examples, stats = build_sft_examples(
        data,
        tokenizer,
        split=split,
        max_seq_len=max_seq_len,
        format=format,
        max_examples=max_examples,
        shuffle_seed=shuffle_seed,
        truncation=truncation,
        train_on_prompt=train_on_prompt,
        last_turn_only=last_turn_only,
        skip_bad_rows=skip_bad_rows,
        require_examples=False,
        console=console,  # progress for large data, as in training
    )
    for table in stats_tables(stats):
        console.print(table)
    if packing and examples:
        console.print(
            packing_table(
                packing_stats([len(e["input_ids"]) for e in examples], max_seq_len, micro_batch)
            )
        )
    marks = needs_text_marks(console)
    if n > 0 and examples:
        console.print(legend_text(marks))
    for number, example in enumerate(examples[: max(n, 0)]):
        trained = sum(label != IGNORE_INDEX for label in example["labels"])
        title = f"example {number}: {len(example['input_ids'])} tokens, {trained} trained"
        console.print(
            Panel(render_example(example, tokenizer, marks=marks), title=title, title_align="left")
        )
    if not examples:
        console.print("[bold red]no example left[/]: see the drop counts above")
    return stats
