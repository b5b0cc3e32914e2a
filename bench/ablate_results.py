"""Commit a ``fastmid ablate`` output: copy its ``ablate.json``/``.csv``/``.png`` under
``bench/results/ablate_<name>.*`` and write ``ablate_<name>.md`` (the command, the machine, the
wall time, the learning-rate sweeps, the table and one sentence per comparison against ``mid``).

    python bench/ablate_results.py runs/ablate-smollm2 smollm2 \
        --command "fastmid ablate --output runs/ablate-smollm2" [--partial "why"] [--note "..."]

The wall time is the span from the first file the ablation wrote (``ablate_settings.json``) to
``ablate.json``; an ablation resumed after a pause counts the pause too, so pass ``--wall`` with
the measured time in that case. Everything else is read from ``ablate.json``; nothing is
recomputed here.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_name

RESULTS = Path(__file__).resolve().parent / "results"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _clock(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _params(n: int | None) -> str:
    return "0" if not n else f"{n / 1e6:.2f}M"


def render(
    doc: dict[str, Any],
    command: str,
    wall_s: float,
    partial: str | None,
    note: str | None = None,
) -> str:
    """The markdown page of one ablation (``doc``: ``ablate.json``'s content); ``partial`` and
    ``note`` are printed at the top when given."""
    proto = doc["protocol"]
    rows = doc["rows"]
    runs = doc["runs"]
    train_s = sum(r.get("train_time_s") or 0.0 for r in runs)
    precisions = set()
    for r in runs:  # the resolved precision (the settings keep "auto") from each run's summary
        summary = Path(r["folder"]) / "summary.json"
        if summary.is_file():
            precisions.add(json.loads(summary.read_text()).get("precision", "?"))
    precision = ", ".join(sorted(precisions)) or "?"
    out = [
        f"# fastmid ablate: {Path(str(doc['model'])).name} ({doc['model_type']}, "
        f"{doc['num_hidden_layers']} layers)",
        "",
    ]
    if partial:
        out += [f"**Partial:** {partial}", ""]
    if note:
        out += [f"**Note:** {note}", ""]
    out += [
        f"`{command}` on {cpu_name()}, {dt.date.today().isoformat()}. Wall time "
        f"{_clock(wall_s)} for {len(runs)} training runs (training alone {_clock(train_s)}; the "
        "rest is loading and exact-match generation).",
        "",
        f"Every arm: {proto['max_steps']} steps, micro-batch {proto['micro_batch']} x grad-accum "
        f"{proto['grad_accum']}, sequences up to {proto['max_seq_len']} tokens, the same examples "
        f"in the same order per seed; precision `{precision}`. Test: the first "
        f"{proto['test']['problems']} problems of `{proto['test']['data']}` "
        f"({proto['test']['prompts_also_in_training_data']} of their prompts also in the training "
        f"data), greedy, {proto['eval_max_new_tokens']} new tokens at most. Validation: "
        f"{proto['validation']['validation_problems']} "
        "problems carved from the training data.",
        "",
        (
            f"## Learning rates: one fixed rate per arm, no selection (validation exact match, %, "
            f"seed {proto['seeds'][0]})"
            if proto.get("lr_grids") and all(len(g) == 1 for g in proto["lr_grids"].values())
            else f"## Learning-rate selection (validation exact match, %, seed {proto['seeds'][0]})"
        ),
        "",
        "| arm | " + " | ".join(["rates tried -> validation exact match", "chosen"]) + " |",
        "| --- | --- | ---: |",
    ]
    for row in rows:
        if row["arm"] == "base":
            continue
        sweep = ", ".join(
            f"{s['lr']:g}: {_pct(s['validation_accuracy'])}"
            + ("" if s["status"] == "finished" else f" ({s['status']})")
            for s in sorted(row.get("lr_sweep", []), key=lambda s: s["lr"])
        )
        note = f" ({row['lr_note']})" if row.get("lr_note") else ""
        chosen = "-" if row.get("lr") is None else f"{row['lr']:g}"
        out.append(f"| {row['arm']} | {sweep}{note} | {chosen} |")
    out += [
        "",
        "## Test exact match (%)",
        "",
        "Mean and 95% interval: percentile bootstrap over problems of the seed-averaged "
        "correctness. `mid - arm`: paired bootstrap over problems, Holm-adjusted over the "
        f"comparisons against mid ({doc['statistics']['bootstrap_resamples']} resamples).",
    ]
    # the test answer loss (nats per answer token, mean over seeds), where ablate.json has it
    loss = any(row.get("answer_loss_mean") is not None for row in rows)
    if loss:
        out[-1] += (
            " Answer loss: mean cross-entropy per reference-answer token (nats, teacher-forced), "
            "mean over seeds; no interval."
        )
    out += [
        "",
        "| arm | layers | how | trainable | tokens | lr | per seed | mean [95% CI] | "
        "mid - arm [95% CI] | p (Holm) |" + (" answer loss |" if loss else ""),
        "| --- | --- | --- | ---: | ---: | ---: | --- | --- | --- | ---: |"
        + (" ---: |" if loss else ""),
    ]
    for row in rows:
        ci, vs = row.get("ci95"), row.get("vs_mid")
        mean = "-" if ci is None else f"{_pct(row['accuracy_mean'])} [{_pct(ci[0])}, {_pct(ci[1])}]"
        diff = (
            "-"
            if not vs
            else f"{100 * vs['difference']:+.1f} [{100 * vs['ci95'][0]:+.1f}, "
            f"{100 * vs['ci95'][1]:+.1f}]"
        )
        tokens = "-" if not row.get("training_tokens") else f"{row['training_tokens']:,.0f}"
        lr = "-" if row.get("lr") is None else f"{row['lr']:g}"
        seeds = " ".join(_pct(a) for a in row.get("accuracy_per_seed", [])) or "-"
        p_holm = "-" if not vs else f"{vs['p_holm']:.3g}"
        out.append(
            f"| {row['arm']} | {row.get('layers_text', '')} | {row.get('how', '')} | "
            f"{_params(row.get('trainable_parameters'))} | {tokens} | {lr} | {seeds} | {mean} | "
            f"{diff} | {p_holm} |"
            + (
                ""
                if not loss
                else " - |"
                if row.get("answer_loss_mean") is None
                else f" {row['answer_loss_mean']:.3f} |"
            )
        )
    out += ["", "## Comparisons against mid", ""]
    out += [f"- {c['sentence']}" for c in doc.get("comparisons", [])]
    out += ["", f"Figure: `ablate_{'{name}'}.png`.", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path, help="the ablation's --output")
    p.add_argument("name", help="results name: bench/results/ablate_<name>.*")
    p.add_argument("--command", required=True, help="the fastmid ablate command that ran")
    p.add_argument("--partial", help="why these results are partial (printed at the top)")
    p.add_argument("--wall", type=float, help="measured wall time in seconds")
    p.add_argument("--note", help="how this run relates to others (printed at the top)")
    args = p.parse_args(argv)
    doc_path = args.folder / "ablate.json"
    if not doc_path.is_file():
        print(f"{doc_path}: not found; run fastmid ablate to the end first", file=sys.stderr)
        return 2
    doc = json.loads(doc_path.read_text())
    start = (args.folder / "ablate_settings.json").stat().st_mtime
    wall = args.wall if args.wall is not None else doc_path.stat().st_mtime - start
    RESULTS.mkdir(parents=True, exist_ok=True)
    for ext in ("json", "csv", "png"):
        src = args.folder / f"ablate.{ext}"
        if src.is_file():
            shutil.copyfile(src, RESULTS / f"ablate_{args.name}.{ext}")
    text = render(doc, args.command, wall, args.partial, args.note).replace("{name}", args.name)
    (RESULTS / f"ablate_{args.name}.md").write_text(text)
    print(f"wrote {RESULTS}/ablate_{args.name}.{{json,csv,png,md}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
