"""Time to data-ready and memory at step 1 on a large synthetic SFT set, first run vs cached run.

    python bench/data_scale.py [--sizes 20000 200000] [--sweep 2000 5000 20000]

What it measures (each phase in a fresh Python process, as a new ``fastmid train`` would be):

* a synthetic JSON-lines file of N conversations (``messages`` format; seeded; 1 or 2 turns
  of 5-30-word questions and 10-60-word answers drawn from 300 common English words; about
  120 SmolLM2 tokens per conversation with the template's default system message);
* ``first``: an empty tokenization cache (``HF_DATASETS_CACHE`` in a scratch folder), then
  ``cached``: the same cache again. In each: import torch and load SmolLM2-135M-Instruct
  (timed apart), then time ``build_sft_examples`` + ``split_eval`` (what ``fastmid train``
  does before step 1; ``import datasets`` included) = time to data-ready;
* anonymous memory (``RssAnon`` of ``/proc/self/status``: pages of a memory-mapped file count
  in ``RssFile`` once touched, not here) when the data is ready and right after a step 1: the
  lengths of every training example and a seeded permutation (what the recipe's data order
  holds), then a Mid-Block forward and backward (band 0.2:0.8, as ``fastmid train``) of the
  first 8 training examples of that order;
* ``--sweep``: tokenizing time with 1 and with 2 processes for a few sizes (the evidence for
  :func:`fastmid.data.cache.tokenizing_processes`).

Writes ``bench/results/data_scale.json`` and ``bench/results/data_scale.md``. Runs on the 2
shared CPU cores of this project's machine; the data files and caches live in ``--work``
(default ``/tmp/fastmid-data-scale``, about 0.5 GB for 200k conversations).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


# common English words: they tokenize to about one token each, like real chat text
WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from "
    "or one had by word but not what all were we when your can said there use an each which "
    "she do how their if will up other about out many then them these so some her would make "
    "like him into time has look two more write go see number no way could people my than "
    "first water been call who oil its now find long down day did get come made may part over "
    "new sound take only little work know place year live me back give most very after thing "
    "our just name good sentence man think say great where help through much before line right "
    "too mean old any same tell boy follow came want show also around form three small set put "
    "end does another well large must big even such because turn here why ask went men read "
    "need land different home us move try kind hand picture again change off play spell air "
    "away animal house point page letter mother answer found study still learn should america "
    "world high every near add food between own below country plant last school father keep "
    "tree never start city earth eye light thought head under story saw left few while along "
    "might close something seem next hard open example begin life always those both paper "
    "together got group often run important until children side feet car mile night walk white"
).split()


def write_dataset(path: Path, n: int, seed: int = 0) -> None:
    """``n`` synthetic conversations as JSON lines (messages format), the same for a seed."""
    words, rng = WORDS, random.Random(seed)
    with path.open("w", encoding="utf-8") as out:
        for _ in range(n):
            messages = []
            for _ in range(rng.randint(1, 2)):
                question = " ".join(rng.choices(words, k=rng.randint(5, 30))) + "?"
                answer = " ".join(rng.choices(words, k=rng.randint(10, 60))) + "."
                messages += [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": answer},
                ]
            out.write(json.dumps({"messages": messages}) + "\n")


def _rss_anon_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def phase(data: str, cache: str, num_proc: int | None, max_seq_len: int) -> dict:
    """One run (in this process): model load, data-ready, step 1. Returns the measurements."""
    os.environ["HF_DATASETS_CACHE"] = cache
    load = os.getloadavg()[0]
    begin = time.perf_counter()
    import torch

    from fastmid.models.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("default", device="cpu")
    model_s = time.perf_counter() - begin
    anon_model = _rss_anon_mib()

    start = time.perf_counter()
    from fastmid.data import build_sft_examples, collate_batch, pad_token_id, split_eval

    examples, stats = build_sft_examples(
        data, tokenizer, max_seq_len=max_seq_len, shuffle_seed=0, num_proc=num_proc
    )
    train, held_out = split_eval(examples, 0.05, 0)
    ready_s = time.perf_counter() - start
    anon_ready = _rss_anon_mib()

    # step 1 as fastmid train takes it: band 0.2:0.8, prefix under no_grad, logits only at
    # supervised positions, on the first micro-batch of 8 of a seeded order
    from fastmid.models.band import BandPlan, apply_band, install_execution_policy
    from fastmid.models.loss import causal_lm_loss_sum

    plan = BandPlan.from_fractions(model.config.num_hidden_layers, 0.2, 0.8)
    apply_band(model, plan)
    install_execution_policy(model, plan)
    lengths = train.lengths().tolist()  # what length grouping / packing read
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
    batch = collate_batch([train[i] for i in order[:8]], pad_token_id(tokenizer))
    total, count = causal_lm_loss_sum(
        model, batch["input_ids"], batch["attention_mask"], batch["labels"]
    )
    (total / count).backward()
    return {
        "examples": len(examples),
        "train_examples": len(train),
        "held_out_examples": len(held_out),
        "tokens": int(sum(lengths)),
        "cache": stats.cache,
        "load_average": round(load, 1),
        "model_load_s": round(model_s, 2),
        "data_ready_s": round(ready_s, 2),
        "rss_anon_mib_after_model": round(anon_model, 1),
        "rss_anon_mib_data_ready": round(anon_ready, 1),
        "rss_anon_mib_step1": round(_rss_anon_mib(), 1),
    }


def _run_phase(data: Path, cache: Path, num_proc: int | None, max_seq_len: int) -> dict:
    command = [
        sys.executable,
        __file__,
        "--phase",
        str(data),
        str(cache),
        str(num_proc or 0),
        str(max_seq_len),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cpu_s() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def sweep(work: Path, sizes: list[int], rounds: int = 2) -> list[dict]:
    """Tokenizing time (first run, data-ready) with 1 and 2 processes per size, interleaved
    round by round so that the other work on the machine hits both alike; the fastest round
    is kept, with its CPU seconds (this process and its workers) and the load average."""
    from fastmid.data import build_sft_examples
    from fastmid.models.loading import load_tokenizer

    tokenizer = load_tokenizer("default")
    best: dict[tuple[int, int], dict] = {}
    for n in sizes:
        write_dataset(work / f"sweep_{n}.jsonl", n, seed=1)
    for _ in range(rounds):
        for n in sizes:
            for procs in (1, 2):
                cache = work / f"sweep-cache-{n}-{procs}"
                shutil.rmtree(cache, ignore_errors=True)
                os.environ["HF_DATASETS_CACHE"] = str(cache)
                load, cpu, start = os.getloadavg()[0], _cpu_s(), time.perf_counter()
                data = str(work / f"sweep_{n}.jsonl")
                build_sft_examples(data, tokenizer, max_seq_len=2048, num_proc=procs)
                wall, cpu = time.perf_counter() - start, _cpu_s() - cpu
                shutil.rmtree(cache, ignore_errors=True)
                if (n, procs) not in best or wall < best[(n, procs)]["wall_s"]:
                    best[(n, procs)] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                                        "load": round(load, 1)}  # fmt: skip
    rows = []
    for n in sizes:
        row = {"conversations": n, **{f"procs_{p}": best[(n, p)] for p in (1, 2)}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--sweep", type=int, nargs="*", default=[2_000, 5_000, 20_000])
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--work", type=Path, default=Path("/tmp/fastmid-data-scale"))
    parser.add_argument("--phase", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        data, cache, procs, max_len = args.phase
        result = phase(data, cache, int(procs) or None, int(max_len))
        print(json.dumps(result), flush=True)
        return

    args.work.mkdir(parents=True, exist_ok=True)
    runs = []
    for n in args.sizes:
        data = args.work / f"conversations_{n}.jsonl"
        start = time.perf_counter()
        write_dataset(data, n)
        print(
            f"{n}: wrote {data.stat().st_size / 2**20:.0f} MiB in {time.perf_counter() - start:.0f} s"
        )
        cache = args.work / f"cache-{n}"
        shutil.rmtree(cache, ignore_errors=True)
        for name in ("first", "cached"):
            result = _run_phase(data, cache, None, args.max_seq_len)
            result.update(conversations=n, run=name, file_mib=round(data.stat().st_size / 2**20, 1))
            runs.append(result)
            print(json.dumps(result), flush=True)
    sweep_rows = sweep(args.work, args.sweep) if args.sweep else []
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "note": "this project's machine: 2 shared CPU cores (other work may run alongside)",
            "python": platform.python_version(),
        },
        "max_seq_len": args.max_seq_len,
        "runs": runs,
        "num_proc_sweep": sweep_rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "data_scale.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / "data_scale.md").write_text(_markdown(report))
    print((RESULTS / "data_scale.md").read_text())


def _markdown(report: dict) -> str:
    lines = [
        "# Data scale: tokenize once, then read the cache",
        "",
        f"`python bench/data_scale.py` on {report['machine']['note']}; SmolLM2-135M-Instruct's "
        f"tokenizer, `--max-seq-len {report['max_seq_len']}`, synthetic `messages` JSON lines "
        "(1-2 turns, about 120 tokens each). Data-ready = `build_sft_examples` + `split_eval` (after importing torch "
        "and loading the model, timed apart). RssAnon = anonymous resident memory "
        "(memory-mapped Arrow pages are file-backed and not in it); step 1 = a Mid-Block forward "
        "and backward (band 0.2:0.8) of 8 examples.",
        "",
        "| conversations | file | run | processes | load avg | data-ready | model load | "
        "RssAnon after model | RssAnon data-ready | RssAnon step 1 | examples | tokens |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["runs"]:
        lines.append(
            f"| {r['conversations']:,} | {r['file_mib']} MiB | {r['run']} | "
            f"{r['cache']['num_proc']} | {r['load_average']} | {r['data_ready_s']} s | "
            f"{r['model_load_s']} s | "
            f"{r['rss_anon_mib_after_model']} MiB | {r['rss_anon_mib_data_ready']} MiB | "
            f"{r['rss_anon_mib_step1']} MiB | {r['examples']:,} | {r['tokens']:,} |"
        )
    sizes = sorted({r["conversations"] for r in report["runs"]})
    if len(sizes) >= 2:
        small, large = sizes[0], sizes[-1]
        lines.append("")
        for column, what in (
            ("rss_anon_mib_step1", "at step 1"),
            ("rss_anon_mib_data_ready", "when the data is ready"),
        ):
            value = {(r["conversations"], r["run"]): r[column] for r in report["runs"]}
            for run in ("first", "cached"):
                if (small, run) in value and (large, run) in value:
                    growth = value[(large, run)] / value[(small, run)] - 1
                    lines.append(
                        f"- RssAnon {what}, {run} run: {small:,} -> {large:,} conversations: "
                        f"{value[(small, run)]} -> {value[(large, run)]} MiB ({growth:+.1%})."
                    )
        lines += [
            "",
            "Step 1's own memory (the model's forward and backward on CPU: about 1.2-1.5 GiB, "
            "varying by a few hundred MiB from run to run) dwarfs the data's; the RssAnon "
            "when the data is ready is the data's share.",
        ]
    if report["num_proc_sweep"]:
        lines += [
            "",
            "Tokenizing (first run, data-ready, no model loaded) with 1 and 2 processes, the "
            "faster of 2 interleaved rounds (wall clock / CPU seconds of the process and its "
            "workers / 1-minute load average when it started):",
            "",
            "| conversations | 1 process | 2 processes |",
            "| ---: | ---: | ---: |",
        ]
        for row in report["num_proc_sweep"]:
            cells = [
                f"{r['wall_s']} s / {r['cpu_s']} CPU-s / load {r['load']}"
                for r in (row["procs_1"], row["procs_2"])
            ]
            lines.append(f"| {row['conversations']:,} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
