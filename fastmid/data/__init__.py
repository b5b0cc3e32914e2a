"""SFT data: formats, chat-template tokenization with labels, collation, built-in sets.

Public API::

    examples, stats = build_sft_examples("builtin:arith", tokenizer, max_seq_len=512)
    train, held_out = split_eval(examples, eval_fraction=0.05, seed=0)
    sampler = LengthGroupedSampler([len(e["input_ids"]) for e in train], batch_size=8, seed=0)
    batch = collate_batch(train[:8], pad_token_id=tokenizer.pad_token_id)
    problems = load_eval_problems("builtin:arith:test", n=100)   # [(messages, "42"), ...]
    inspect_data("builtin:arith", tokenizer, max_seq_len=512, n=2)  # fastmid data inspect
"""

from fastmid.data.answers import (
    EvalProblem,
    extract_final_answer,
    load_eval_problems,
    normalize_number,
)
from fastmid.data.builtin import arith_problems
from fastmid.data.chat_template import ChatTemplateFallbackWarning
from fastmid.data.collate import LengthGroupedSampler, collate_batch, pad_token_id
from fastmid.data.formats import FORMATS, detect_format
from fastmid.data.inspect import inspect_data
from fastmid.data.packing import PackingStats, collate_packed, pack_rows, packing_stats
from fastmid.data.pipeline import build_sft_examples, load_conversations, split_eval
from fastmid.data.schema import (
    BadRowError,
    Conversation,
    DataError,
    RowOrigin,
    TemplatePrefixError,
)
from fastmid.data.stats import DataStats
from fastmid.data.truncate import TRUNCATION_MODES
from fastmid.labels import IGNORE_INDEX

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "TRUNCATION_MODES",
    "BadRowError",
    "ChatTemplateFallbackWarning",
    "Conversation",
    "DataError",
    "DataStats",
    "EvalProblem",
    "LengthGroupedSampler",
    "PackingStats",
    "RowOrigin",
    "TemplatePrefixError",
    "arith_problems",
    "build_sft_examples",
    "collate_batch",
    "collate_packed",
    "detect_format",
    "extract_final_answer",
    "inspect_data",
    "load_conversations",
    "load_eval_problems",
    "normalize_number",
    "pack_rows",
    "packing_stats",
    "pad_token_id",
    "split_eval",
]
