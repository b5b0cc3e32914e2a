"""The protocol of ``fastmid ablate``: learning-rate selection, seeds, resume, the report.

Every arm-run is an ordinary ``fastmid train`` run: a :class:`~fastmid.config.TrainConfig` made
of the shared base config (YAML and flags) plus the arm's fields (:meth:`Arm.overrides
<fastmid.ablate.arms.Arm.overrides>`), the rate and the seed, executed in this process by the
recipe (:func:`fastmid.train.recipe.run_train`), writing its run folder::

    <output>/ablate_settings.json             the settings that define the arms (checked on re-runs)
    <output>/data/train.jsonl, validation.jsonl   the carved splits (fastmid.ablate.data)
    <output>/base/eval_test.json              the untrained model on the test set (once)
    <output>/arms/<arm>/lr-<lr>/seed-<s>/     a normal run folder, plus eval_validation.json
                                              and/or eval_test.json (per-problem correctness)
    <output>/ablate.json, ablate.csv, ablate.png

Protocol (defaults; all configurable):

1. Learning rate, per arm: every rate of the arm's grid (fixed in advance: ``--lrs``; full-rank
   arms ``1e-4,3e-4,1e-3``, LoRA arms ``3e-4,1e-3,3e-3``: three values a factor of 3 apart) is
   trained once, at the first seed, and scored by exact match on the validation split carved from
   the training data. The best rate has the highest validation exact match (ties: the lower
   validation answer loss, then the lower rate). When it sits at an edge of a grid of two or more
   rates, one rate is added beyond that edge (the grid's geometric step again, :func:`next_rate`)
   and trained, up to ``--lr-extend`` times per arm.
2. Seeds: every arm at its chosen rate with ``--seeds`` seeds (the first is the selection run
   itself), scored by exact match on the test set (the same first ``--eval-n`` problems for
   every arm and the base model).
3. Statistics and outputs: :mod:`fastmid.ablate.report`.

All arms train on the same examples in the same order for the same number of steps at a given
seed (same file, ``--shuffle-seed``, ``--seed``, ``--micro-batch``, ``--max-steps``), so their
training tokens match; the table shows them.

Resume: a run with ``summary.json`` (or ``diverged.json``: a non-finite loss at that rate) is
finished and skipped; a run with checkpoints resumes from the latest (``--resume latest``); a run
that saved nothing starts again. ``ablate_settings.json`` records the settings that define the
arms; a re-run with a different one is refused, naming its flag. ``--arms`` and ``--seeds`` may
grow: new runs are added, finished ones reused.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from fastmid.ablate.arms import (
    ARMS,
    BASE_ROW,
    FAMILIES,
    AblateError,
    Arm,
    parse_arms,
    plan_arms,
    trainable_parameters,
)
from fastmid.ablate.data import (
    CarvedData,
    carve_validation,
    check_test_set,
    training_prompt_keys,
)
from fastmid.ablate.defaults import (
    DEFAULT_BOOTSTRAP,
    DEFAULT_GRIDS,
    DEFAULT_LR_EXTEND,
    DEFAULT_LRS,
    DEFAULT_SEEDS,
    DEFAULT_VAL_N,
    KEEP_CHOICES,
    TRAIN_DEFAULTS,
)
from fastmid.ablate.report import (
    compute_statistics,
    finite_or_none,
    print_table,
    public_rows,
    write_csv,
    write_json,
    write_plot,
)
from fastmid.ablate.stats import DEFAULT_CONFIDENCE
from fastmid.config import (
    FIELDS,
    TrainConfig,
    build_config,
    flag,
    load_yaml,
    resolve_paths,
    validate,
)
from fastmid.errors import FastmidError
from fastmid.eval.exact_match import evaluate_accuracy
from fastmid.models.band import BandPlan
from fastmid.models.families import decoder_layers
from fastmid.models.loading import load_config, load_model_and_tokenizer
from fastmid.models.memory import build_meta_model
from fastmid.train.checkpoint import list_checkpoints
from fastmid.train.recipe import NonFiniteLossError, TrainingInterrupted, run_train
from fastmid.train.runfolder import LOCK_NAME, acquire_run_lock, remove_folder

SCHEMA = 1
SETTINGS_FILE = "ablate_settings.json"
# TrainConfig fields that change nothing a run computes (bookkeeping), or that the ablation sets
# per run (lr, output); every other field defines the arms and must match on a re-run.
NOT_DEFINING: frozenset[str] = frozenset(
    {"output", "overwrite", "resume", "log_every", "report_to", "save_every", "keep_last", "lr"}
)
# Train options the ablation sets itself: given by the user, they are refused with the reason.
REFUSED: dict[str, str] = {
    "resume": "fastmid ablate resumes by itself: run the same command again",
    "overwrite": "choose another --output (or delete the old ablation first)",
    "placement": "the arms place the layers (mid, early, late, random, full)",
    "lr": "the learning rates come from --lrs (grids fixed in advance)",
    "lora_targets": "the LoRA arms set it (lora: all-linear; lora-mid: qkvo)",
    "lora_match_budget": "the lora-mid arm sets it",
}
ABLATE_FLAGS = {
    "lrs": "--lrs",
    "val_n": "--val-n",
    "lr_extend": "--lr-extend",
    "random_arm_seed": "--random-arm-seed",
}


class AblateInterrupted(FastmidError, RuntimeError):
    """Ctrl-C: finished runs are kept, an interrupted training saved its checkpoint (exit 130)."""

    exit_code = 130


@dataclass(frozen=True)
class AblateSettings:
    """The options of ``fastmid ablate`` beyond the shared train options.

    Attributes:
        arms: arm names, comma-separated (:data:`fastmid.ablate.arms.ARMS`).
        lrs: learning-rate grids (:func:`parse_lr_grids`).
        seeds: seeds per arm at its chosen rate (``--seed``, ``--seed + 1``, ...).
        val_n: validation problems carved from the training data.
        lr_extend: how many rates a grid may grow by, per arm, when its best rate is at an edge.
        random_arm_seed: seed of the ``random`` arm's draw of layers.
        bootstrap: bootstrap resamples of the statistics.
        keep: what a finished run keeps: ``results`` (metrics, evaluations, configs: the
            checkpoints, ``final/`` and ``band_delta.safetensors`` are removed once no
            evaluation needs them), ``final`` (also ``final/``), ``all``.
    """

    arms: str = ",".join(ARMS)
    lrs: str = DEFAULT_LRS
    seeds: int = DEFAULT_SEEDS
    val_n: int = DEFAULT_VAL_N
    lr_extend: int = DEFAULT_LR_EXTEND
    random_arm_seed: int = 0
    bootstrap: int = DEFAULT_BOOTSTRAP
    keep: str = "results"

    def check(self) -> None:
        """Refuse values no ablation can run with, naming the flag.

        Raises:
            AblateError: ``--seeds`` < 1, ``--val-n`` < 1, ``--lr-extend`` < 0,
                ``--random-arm-seed`` < 0, ``--bootstrap`` < 1, an unknown ``--keep``; as
                :func:`parse_arms` and :func:`parse_lr_grids`.
        """
        for name, value, low in (
            ("--seeds", self.seeds, 1),
            ("--val-n", self.val_n, 1),
            ("--lr-extend", self.lr_extend, 0),
            ("--random-arm-seed", self.random_arm_seed, 0),
            ("--bootstrap", self.bootstrap, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise AblateError(f"{name}: must be an integer >= {low}, got {value!r}")
        if self.keep not in KEEP_CHOICES:
            raise AblateError(f"--keep: '{self.keep}' is not one of {', '.join(KEEP_CHOICES)}")
        parse_arms(self.arms)
        parse_lr_grids(self.lrs)


def _parse_grid(text: str, where: str) -> list[float]:
    values = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        try:
            value = float(item)
        except ValueError:
            raise AblateError(f"--lrs: {where}'{item}' is not a number") from None
        if not math.isfinite(value) or value <= 0:
            raise AblateError(f"--lrs: {where}learning rates must be positive, got {item}")
        values.append(value)
    if not values:
        raise AblateError(f"--lrs: {where}empty grid; give rates such as 1e-4,3e-4,1e-3")
    return sorted(set(values))


def parse_lr_grids(text: str) -> dict[str, list[float]]:
    """The learning-rate grid of every arm.

    ``--lrs`` is either one grid for every arm (``1e-4,3e-4,1e-3``) or ``;``-separated
    ``KEY=GRID`` groups where ``KEY`` is ``full-rank``, ``lora`` or an arm name
    (``full-rank=1e-4,3e-4,1e-3;lora=3e-4,1e-3,3e-3;full=3e-5,1e-4``); an arm's own grid
    overrides its family's, and a family not given keeps its default grid.

    Returns:
        ``{arm: ascending rates}`` for every arm of :data:`ARMS`.

    Raises:
        AblateError: an empty grid, a rate that is not a positive finite number, an unknown key
            (each naming ``--lrs``).
    """
    text = text.strip()
    if "=" not in text:
        grid = _parse_grid(text, "")
        return {arm: list(grid) for arm in ARMS}
    given: dict[str, list[float]] = {}
    for group in (g.strip() for g in text.split(";")):
        if not group:
            continue
        key, sep, values = group.partition("=")
        key = key.strip()
        if not sep or key not in (*DEFAULT_GRIDS, *ARMS):
            raise AblateError(
                f"--lrs: '{group}' is not KEY=GRID with KEY one of full-rank, lora or an arm "
                f"({', '.join(ARMS)})"
            )
        given[key] = _parse_grid(values, f"{key}: ")
    return {
        arm: list(given.get(arm) or given.get(FAMILIES[arm]) or DEFAULT_GRIDS[FAMILIES[arm]])
        for arm in ARMS
    }


def format_lr(lr: float) -> str:
    """A rate as its folder name uses it: 6 significant digits, ``0.0003``, ``1e-05``."""
    return f"{lr:.6g}"


def next_rate(grid: list[float], current: list[float], up: bool, k: int) -> float:
    """The ``k``-th rate beyond an edge of the fixed ``grid`` (``k >= 1``).

    ``edge * ratio**k`` (``edge / ratio**k`` below the grid), ``ratio`` the grid's geometric step
    ``(max / min) ** (1 / (n - 1))``, written with the fewest significant digits (1 to 6) that
    put it beyond the ``current`` grid's edge: ``1e-4,3e-4,1e-3`` grows to ``3e-3``, then
    ``1e-2`` upwards and ``3e-5``, then ``1e-5`` downwards.

    Raises:
        ValueError: a grid of fewer than two rates, or ``k < 1``.
    """
    if len(grid) < 2 or k < 1:
        raise ValueError("next_rate needs a grid of >= 2 rates and k >= 1")
    lo, hi = min(grid), max(grid)
    ratio = (hi / lo) ** (1 / (len(grid) - 1))
    exact = hi * ratio**k if up else lo / ratio**k
    for digits in range(1, 7):
        rate = float(f"{exact:.{digits - 1}e}")
        if (up and rate > max(current)) or (not up and rate < min(current)):
            return rate
    return exact


def build_ablate_config(
    yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> tuple[TrainConfig, frozenset[str]]:
    """The shared base config: :class:`TrainConfig` defaults < :data:`TRAIN_DEFAULTS` < the YAML
    file < ``overrides`` (the flags given).

    Returns:
        ``(config, the fields the user gave in the YAML file or as flags)``.

    Raises:
        ConfigError: as :func:`fastmid.config.build_config`.
    """
    from_yaml = set(load_yaml(yaml_path)) if yaml_path is not None else set()
    given = {k.replace("-", "_") for k, v in (overrides or {}).items() if v is not None}
    values: dict[str, Any] = {k: v for k, v in TRAIN_DEFAULTS.items() if k not in from_yaml}
    values.update(overrides or {})
    return build_config(yaml_path, values), frozenset(from_yaml | given)


def check_base_config(cfg: TrainConfig, explicit: frozenset[str] | set[str] = frozenset()) -> None:
    """Refuse the train options the ablation sets itself (:data:`REFUSED`), and ``--nproc`` > 1
    or ``--eval-accuracy``.

    Args:
        cfg: the shared base config.
        explicit: the fields the user gave (flags or YAML keys).

    Raises:
        AblateError: naming the flag and what to do instead.
    """
    for name, why in REFUSED.items():
        if name in explicit:
            raise AblateError(f"{flag(name)}: not an option of fastmid ablate: {why}")
    if cfg.nproc > 1:
        raise AblateError(
            "--nproc: fastmid ablate trains its runs one after another in one process; use "
            "--nproc 1"
        )
    if cfg.eval_accuracy:
        raise AblateError(
            "--eval-accuracy: fastmid ablate scores every run itself (validation and test "
            "exact match); drop the flag"
        )


def defining_settings(cfg: TrainConfig, settings: AblateSettings) -> dict[str, Any]:
    """What defines the arms' runs: every train option but :data:`NOT_DEFINING` (local paths
    absolute), the resolved learning-rate grids, ``--val-n``, ``--lr-extend`` and
    ``--random-arm-seed``. ``--arms``, ``--seeds``, ``--bootstrap`` and ``--keep`` may change
    between invocations."""
    resolved = dataclasses.asdict(resolve_paths(cfg))
    return {
        "train": {k: v for k, v in resolved.items() if k not in NOT_DEFINING},
        "ablate": {
            "lrs": parse_lr_grids(settings.lrs),
            "val_n": settings.val_n,
            "lr_extend": settings.lr_extend,
            "random_arm_seed": settings.random_arm_seed,
        },
    }


def first_difference(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """The flag and values of the first defining setting that differs, or None."""
    for section, flags in (("train", None), ("ablate", ABLATE_FLAGS)):
        old, new = saved.get(section, {}), current[section]
        for key in sorted(set(old) | set(new)):
            if old.get(key, "<unset>") != new.get(key, "<unset>"):
                name = flags[key] if flags and key in flags else flag(key)
                if section == "train" and key not in FIELDS:
                    name = key
                return f"{name} was {old.get(key, '<unset>')!r}, now {new.get(key, '<unset>')!r}"
    return None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def _digest(*paths: Path) -> str:
    """SHA-256 of the files' bytes, in order."""
    h = hashlib.sha256()
    for path in paths:
        with Path(path).open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _free_memory() -> None:
    """Release what the last run or evaluation left (the next one loads a model again)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@dataclass
class RunResult:
    """One arm-run as read back from its folder.

    Attributes:
        arm, lr, seed, folder: which run.
        status: ``finished`` (``summary.json``) or ``diverged`` (``diverged.json``).
        validation, test: the evaluation records (``eval_validation.json``,
            ``eval_test.json``'s ``result``), None when not evaluated.
        tokens: training tokens (``summary.json``); trainable: trainable parameters it reported.
        seconds: wall time of its training and evaluations in this process (0 when reused).
    """

    arm: str
    lr: float
    seed: int
    folder: Path
    status: str
    validation: dict[str, Any] | None = None
    test: dict[str, Any] | None = None
    tokens: int | None = None
    trainable: int | None = None
    train_time_s: float | None = None
    seconds: float = 0.0

    def validation_key(self) -> tuple[float, float, float]:
        """Sort key of the rate selection: higher validation exact match first, then lower
        validation answer loss, then the lower rate; a diverged run sorts last."""
        if self.status != "finished" or self.validation is None:
            return (math.inf, math.inf, self.lr)
        loss = finite_or_none(self.validation.get("eval_loss"))
        return (-self.validation["accuracy"], loss if loss is not None else math.inf, self.lr)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no per-problem records)."""

        def short(rec: dict[str, Any] | None) -> dict[str, Any] | None:
            if rec is None:
                return None
            keep = ("accuracy", "correct", "n", "ci95", "eval_loss")
            return {k: rec.get(k) for k in keep}

        return {
            "arm": self.arm,
            "lr": self.lr,
            "seed": self.seed,
            "folder": str(self.folder),
            "status": self.status,
            "validation": short(self.validation),
            "test": short(self.test),
            "training_tokens": self.tokens,
            "trainable_parameters": self.trainable,
            "train_time_s": self.train_time_s,
        }


@dataclass
class _Progress:
    """Runs done / total and the ETA from the runs trained in this process."""

    total: int
    done: int = 0
    seconds: list[float] = field(default_factory=list)
    seen: set[tuple[str, str, int]] = field(default_factory=set)

    def eta(self) -> str:
        left = max(self.total - self.done, 0)
        if not left:
            return "ETA 0:00:00"
        if not self.seconds:
            return f"{left} run(s) left, ETA after the first run"
        return f"{left} run(s) left, ETA {_clock(left * sum(self.seconds) / len(self.seconds))}"


class Ablation:
    """One ``fastmid ablate`` invocation: check, carve the data, run, report.

    Args:
        base: the shared base config (YAML and flags over :data:`TRAIN_DEFAULTS`).
        settings: the ablation's own options.
        console: where progress and the table go (stderr when None).
        explicit: the train fields the user gave (flags or YAML keys), for
            :func:`check_base_config`.
    """

    def __init__(
        self,
        base: TrainConfig,
        settings: AblateSettings,
        console: Console | None = None,
        explicit: frozenset[str] | set[str] = frozenset(),
    ) -> None:
        self.base = resolve_paths(base)
        self.settings = settings
        self.console = console or Console(stderr=True)
        self.explicit = frozenset(explicit)
        self.out = Path(self.base.output)
        self.arms: list[Arm] = []
        self.grids: dict[str, list[float]] = {}
        self.trainable: dict[str, int] = {}
        self.num_hidden_layers = 0
        self.model_type = ""
        self.carved: CarvedData | None = None
        self.test_n = 0
        self.test_keys: set[str] = set()  # prompt keys of the test problems
        self.test_overlap = 0
        self.progress = _Progress(total=0)

    # ---- checks ---------------------------------------------------------------------------

    def check(self) -> None:
        """Everything that can be refused before a run starts: options, arms, the model's
        structure (meta device: no weights), the test set, the output folder.

        Raises:
            AblateError, ConfigError, BandError, ModelSourceError, DataError: one line naming the
                flag or file.
        """
        check_base_config(self.base, self.explicit)
        validate(self.base)
        self.settings.check()
        names = parse_arms(self.settings.arms)
        self.grids = parse_lr_grids(self.settings.lrs)
        self._check_output()
        config = load_config(self.base.model, self.base.trust_remote_code)
        meta = build_meta_model(config)
        self.model_type = str(getattr(config, "model_type", ""))
        self.num_hidden_layers = len(decoder_layers(meta))
        mid = BandPlan.parse(self.num_hidden_layers, self.base.band, self.base.layers)
        self.arms = plan_arms(
            names, mid, self.base.lora_rank, random_seed=self.settings.random_arm_seed
        )
        extras = dict(
            lora_alpha=self.base.lora_alpha,
            train_embeddings=self.base.train_embeddings,
            train_lm_head=self.base.train_lm_head,
            train_final_norm=self.base.train_final_norm,
        )
        self.trainable = {arm.name: trainable_parameters(meta, arm, **extras) for arm in self.arms}
        for arm in self.arms:
            # the arm's own config must be valid too (e.g. LoRA with --fuse-frozen)
            validate(self.run_config(arm, self.grids[arm.name][0], self.base.seed))
        self.test_n, self.test_keys = check_test_set(
            self.base.eval_accuracy_data, self.base.eval_n, skip_bad_rows=self.base.skip_bad_rows
        )
        saved = _read_json(self.out / SETTINGS_FILE)
        if saved is not None:
            diff = first_difference(saved.get("defining", {}), self._defining())
            if diff is not None:
                raise AblateError(
                    f"--output {self.out} holds an ablation with other settings ({diff}); re-run "
                    "with its settings, or choose another --output"
                )

    def _defining(self) -> dict[str, Any]:
        return defining_settings(self.base, self.settings)

    def _check_output(self) -> None:
        out = self.out
        if out.exists() and not out.is_dir():
            raise AblateError(f"--output {out} is a file, not a folder; choose a folder")
        if not out.is_dir():
            return
        names = {p.name for p in out.iterdir()} - {LOCK_NAME}
        if names and SETTINGS_FILE not in names:
            raise AblateError(
                f"--output {out} is not empty and holds no fastmid ablation (no {SETTINGS_FILE}); "
                "choose another --output"
            )
        if SETTINGS_FILE in names and _read_json(out / SETTINGS_FILE) is None:
            raise AblateError(
                f"--output {out}: {SETTINGS_FILE} is not readable JSON; choose another --output"
            )

    # ---- run configs ----------------------------------------------------------------------

    def run_folder(self, arm: str, lr: float, seed: int) -> Path:
        """``<output>/arms/<arm>/lr-<lr>/seed-<seed>``."""
        return self.out / "arms" / arm / f"lr-{format_lr(lr)}" / f"seed-{seed}"

    def run_config(self, arm: Arm, lr: float, seed: int) -> TrainConfig:
        """The arm-run's :class:`TrainConfig`: the base, the arm's fields, the rate, the seed,
        the carved training file, no accuracy eval of the recipe's own."""
        train = self.out / "data" / "train.jsonl"
        return dataclasses.replace(
            self.base,
            **arm.overrides(),
            lr=lr,
            seed=seed,
            output=str(self.run_folder(arm.name, lr, seed)),
            data=str(train),
            format="messages",
            split="train",
            eval_accuracy=False,
            resume=None,
            overwrite=False,
        )

    # ---- the whole ablation ----------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Check, then run (resuming what exists) and report; returns ``ablate.json``'s content.

        Raises:
            AblateError and the errors of ``fastmid train``: one line each.
            AblateInterrupted: Ctrl-C (exit 130; run the same command again to continue).
        """
        self.check()
        self.out.mkdir(parents=True, exist_ok=True)
        with acquire_run_lock(self.out):
            try:
                return self._run_locked()
            except KeyboardInterrupt:
                raise AblateInterrupted(
                    "interrupted; finished runs are kept; run the same fastmid ablate command "
                    "again to continue"
                ) from None

    def _run_locked(self) -> dict[str, Any]:
        base, settings = self.base, self.settings
        self.carved = carve_validation(
            base.data,
            self.out / "data",
            settings.val_n,
            base.shuffle_seed,
            split=base.split,
            format=base.format,
            skip_bad_rows=base.skip_bad_rows,
        )
        digest = _digest(self.carved.train, self.carved.validation)
        manifest = _read_json(self.out / SETTINGS_FILE)
        if manifest is None:
            _write_json_atomic(
                self.out / SETTINGS_FILE,
                {"fastmid_ablate": SCHEMA, "defining": self._defining(), "data_sha256": digest},
            )
        elif manifest.get("data_sha256", digest) != digest:
            # same flags, other content (an edited local file): the runs would mix two data sets
            raise AblateError(
                f"--data {base.data}: its content differs from the data this ablation in "
                f"{self.out} was carved from; restore it or choose another --output"
            )
        self.test_overlap = len(self.test_keys & training_prompt_keys(self.carved.train))
        self._announce_start()
        seeds = [base.seed + k for k in range(settings.seeds)]
        self.progress = _Progress(
            total=sum(len(self.grids[a.name]) for a in self.arms)
            + len(self.arms) * (len(seeds) - 1)
        )
        base_eval = self._evaluate_base()
        chosen: dict[str, tuple[float | None, list[RunResult], str | None]] = {}
        for arm in self.arms:
            chosen[arm.name] = self._select_rate(arm, seeds[0])
        seed_runs: dict[str, list[RunResult]] = {}
        for arm in self.arms:
            lr = chosen[arm.name][0]
            if lr is None:
                seed_runs[arm.name] = []
                continue
            seed_runs[arm.name] = [self.run_one(arm, lr, s, ("test",), prune=True) for s in seeds]
        document = self._report(base_eval, chosen, seed_runs, seeds)
        return document

    def _announce_start(self) -> None:
        assert self.carved is not None
        grids = "; ".join(
            f"{a.name} {','.join(format_lr(x) for x in self.grids[a.name])}" for a in self.arms
        )
        self.console.print(
            f"[bold]fastmid ablate[/] {self.base.model} ({self.model_type}, "
            f"{self.num_hidden_layers} layers): arms {', '.join(a.name for a in self.arms)}; "
            f"{self.carved.train_count} training / {self.carved.validation_count} validation "
            f"conversations from {self.base.data}; test {self.test_n} problems of "
            f"{self.base.eval_accuracy_data}; {self.base.max_steps} steps per run; rates {grids}; "
            f"{self.settings.seeds} seed(s); output {self.out}",
            highlight=False,
        )
        if self.test_overlap:
            self.console.print(
                f"[yellow]warning:[/] {self.test_overlap} test problem(s) of "
                f"{self.base.eval_accuracy_data} also occur in the training data "
                "(same prompt); ablate.json records it",
                highlight=False,
            )

    # ---- evaluation -------------------------------------------------------------------------

    def _eval_source(self, which: str) -> tuple[str, int, str]:
        if which == "validation":
            assert self.carved is not None
            return str(self.carved.validation), self.carved.validation_count, "--val-n"
        return self.base.eval_accuracy_data, self.base.eval_n, "--eval-accuracy-data"

    def _evaluate(self, model: Any, tokenizer: Any, which: str, path: Path) -> dict[str, Any]:
        """Exact match of ``model`` on the validation or test problems, written to ``path``
        (``result`` holds the per-problem records); returns the result dict."""
        data, n, where = self._eval_source(which)
        base = self.base
        result = evaluate_accuracy(
            model,
            tokenizer,
            data,
            n=n,
            max_new_tokens=base.eval_max_new_tokens,
            batch_size=base.eval_batch_size,
            with_loss=True,
            skip_bad_rows=base.skip_bad_rows,
            flag=where,
            console=self.console,
        )
        record = result.to_dict(per_problem=True)
        _write_json_atomic(
            path,
            {
                "set": which,
                "data": data,
                "n": n,
                "max_new_tokens": base.eval_max_new_tokens,
                "batch_size": base.eval_batch_size,
                "result": record,
            },
        )
        return record

    def _evaluate_base(self) -> dict[str, Any]:
        """The untrained model on the test set, once per ablation (``base/eval_test.json``)."""
        path = self.out / "base" / "eval_test.json"
        saved = _read_json(path)
        if saved is not None:
            return saved["result"]
        path.parent.mkdir(parents=True, exist_ok=True)
        self.console.print(
            f"[bold]ablate[/] base model: test exact match on {self.test_n} problems",
            highlight=False,
        )
        model, tokenizer = load_model_and_tokenizer(
            self.base.model, trust_remote_code=self.base.trust_remote_code
        )
        try:
            return self._evaluate(model, tokenizer, "test", path)
        finally:
            del model
            _free_memory()

    # ---- runs -------------------------------------------------------------------------------

    def read_run(self, arm: str, lr: float, seed: int) -> RunResult:
        """A run's state from its folder (``status`` ``missing`` when it never finished)."""
        folder = self.run_folder(arm, lr, seed)
        result = RunResult(arm, lr, seed, folder, "missing")
        if (folder / "diverged.json").is_file():
            result.status = "diverged"
            return result
        summary = _read_json(folder / "summary.json")
        if summary is None:
            return result
        result.status = "finished"
        result.tokens = summary.get("tokens")
        result.trainable = (summary.get("parameters") or {}).get("trainable")
        result.train_time_s = summary.get("train_time_s")
        for which in ("validation", "test"):
            saved = _read_json(folder / f"eval_{which}.json")
            if saved is not None:
                setattr(result, which, saved["result"])
        return result

    def _train(self, cfg: TrainConfig) -> None:
        """Run (or resume) one arm-run with the recipe, in this process."""
        folder = Path(cfg.output)
        saved = list_checkpoints(folder / "checkpoints")
        if saved:
            state = _read_json(saved[-1] / "trainer_state.json") or {}
            plan = _read_json(folder / "plan.json") or {}
            if state.get("step", 0) >= plan.get("total_steps", math.inf):
                # trained to the end but stopped before summary.json: train it again
                self.console.print(
                    f"{folder} finished training but wrote no summary; training it again",
                    highlight=False,
                )
                cfg = dataclasses.replace(cfg, overwrite=True)
            else:
                cfg = dataclasses.replace(cfg, resume="latest")
        try:
            run_train(cfg, self.console)
        except TrainingInterrupted:
            raise AblateInterrupted(
                f"interrupted in run {folder} (its last checkpoint is kept); run the same "
                "fastmid ablate command again to resume it"
            ) from None
        finally:
            _free_memory()

    def run_one(
        self, arm: Arm, lr: float, seed: int, evals: tuple[str, ...], prune: bool
    ) -> RunResult:
        """Train (or resume, or reuse) one run and evaluate what ``evals`` asks for that it
        lacks; print a progress line.

        Args:
            arm, lr, seed: the run.
            evals: ``validation`` and/or ``test``.
            prune: apply ``--keep`` afterwards (no later evaluation of this run can be needed).
        """
        key = (arm.name, format_lr(lr), seed)
        first_call = key not in self.progress.seen
        self.progress.seen.add(key)
        label = f"{arm.name} lr {format_lr(lr)} seed {seed}"
        counter = f"ablate {self.progress.done + 1}/{self.progress.total}"
        result = self.read_run(arm.name, lr, seed)
        t0 = time.perf_counter()
        worked = False
        if result.status == "missing":
            self.console.print(
                f"[bold]{counter}[/] {label}: training ({arm.describe()}) in {result.folder}",
                highlight=False,
            )
            try:
                self._train(self.run_config(arm, lr, seed))
            except NonFiniteLossError as exc:
                _write_json_atomic(result.folder / "diverged.json", {"error": str(exc)})
                self.console.print(
                    f"[yellow]{label}: diverged ({exc}); counted as failed at this rate[/]",
                    highlight=False,
                )
            worked = True
            result = self.read_run(arm.name, lr, seed)
        if result.status == "finished":
            missing = [w for w in evals if getattr(result, w) is None]
            if missing:
                self._evaluate_run(arm, lr, seed, missing)
                worked = True
                result = self.read_run(arm.name, lr, seed)
            if prune:
                self._prune(result.folder)
        result.seconds = time.perf_counter() - t0
        if first_call:
            self.progress.done += 1
            if worked:
                self.progress.seconds.append(result.seconds)
        scores = ", ".join(
            f"{w} exact match {100 * getattr(result, w)['accuracy']:.1f}%"
            for w in ("validation", "test")
            if getattr(result, w) is not None
        )
        status = scores or result.status
        if worked:
            self.console.print(
                f"[bold]{counter if first_call else 'ablate'}[/] {label}: {status} "
                f"({_clock(result.seconds)}); {self.progress.eta()}",
                highlight=False,
            )
        elif first_call:
            self.console.print(
                f"[bold]{counter}[/] {label}: finished earlier ({status})", highlight=False
            )
        return result

    def _evaluate_run(self, arm: Arm, lr: float, seed: int, which: list[str]) -> None:
        folder = self.run_folder(arm.name, lr, seed)
        if not (folder / "final").is_dir():
            # --keep removed the model before this evaluation was asked for: train it again
            # (the same settings give the same model).
            self.console.print(
                f"{folder}: the model was removed (--keep); training it again to evaluate it",
                highlight=False,
            )
            self._train(dataclasses.replace(self.run_config(arm, lr, seed), overwrite=True))
        model, tokenizer = load_model_and_tokenizer(
            str(folder / "final"), trust_remote_code=self.base.trust_remote_code
        )
        try:
            for w in which:
                self.console.print(
                    f"[bold]ablate[/] {arm.name} lr {format_lr(lr)} seed {seed}: {w} exact match",
                    highlight=False,
                )
                self._evaluate(model, tokenizer, w, folder / f"eval_{w}.json")
        finally:
            del model
            _free_memory()

    def _prune(self, folder: Path) -> None:
        """Apply ``--keep`` to a finished, fully evaluated run."""
        keep = self.settings.keep
        if keep == "all":
            return
        remove_folder(folder / "checkpoints")
        if keep == "results":
            remove_folder(folder / "final")
            delta = folder / "band_delta.safetensors"
            if delta.is_file():
                delta.unlink()

    def _select_rate(self, arm: Arm, seed: int) -> tuple[float | None, list[RunResult], str | None]:
        """The learning-rate sweep of one arm (see the module docstring).

        Returns:
            ``(chosen rate or None when every rate diverged, the sweep's runs by rate, a note
            when the best rate is still at a grid edge after the allowed extensions)``.
        """
        fixed = list(self.grids[arm.name])
        grid = list(fixed)
        runs = {lr: self.run_one(arm, lr, seed, ("validation",), prune=False) for lr in grid}
        extended = 0
        steps = {True: 0, False: 0}  # rates added above and below the fixed grid
        note = None
        while True:
            best = min(runs.values(), key=RunResult.validation_key)
            if best.status != "finished" or len(grid) < 2:
                break
            edge = grid.index(best.lr)
            if edge not in (0, len(grid) - 1):
                break
            if extended >= self.settings.lr_extend:
                side = "lowest" if edge == 0 else "highest"
                note = (
                    f"the best rate {format_lr(best.lr)} is the {side} of the grid after "
                    f"{extended} extension(s) (--lr-extend {self.settings.lr_extend})"
                )
                break
            up = edge == len(grid) - 1
            steps[up] += 1
            rate = next_rate(fixed, grid, up, steps[up])
            grid = sorted([*grid, rate])
            extended += 1
            self.progress.total += 1
            self.console.print(
                f"[bold]ablate[/] {arm.name}: best rate {format_lr(best.lr)} is at the grid's "
                f"edge; adding {format_lr(rate)}",
                highlight=False,
            )
            runs[rate] = self.run_one(arm, rate, seed, ("validation",), prune=False)
        best = min(runs.values(), key=RunResult.validation_key)
        chosen = best.lr if best.status == "finished" else None
        if chosen is None:
            note = "every rate diverged"
        for lr, run in runs.items():
            if lr != chosen and run.status == "finished":
                self._prune(run.folder)
            elif run.status == "finished" and self.settings.keep != "all":
                # finished: its checkpoints can resume nothing; final/ stays for the test set
                remove_folder(run.folder / "checkpoints")
        return chosen, [runs[lr] for lr in sorted(runs)], note

    # ---- report -----------------------------------------------------------------------------

    def _rows(
        self,
        base_eval: dict[str, Any],
        chosen: dict[str, tuple[float | None, list[RunResult], str | None]],
        seed_runs: dict[str, list[RunResult]],
    ) -> list[dict[str, Any]]:
        reference = [p["reference"] for p in base_eval["per_problem"]]
        rows: list[dict[str, Any]] = [
            {
                "arm": BASE_ROW,
                "description": "the untrained model",
                "layers": [],
                "layers_text": "-",
                "how": "no training",
                "trainable_parameters": 0,
                "training_tokens": 0,
                "lr": None,
                "seeds": [],
                "accuracy_per_seed": [base_eval["accuracy"]],
                "answer_loss_per_seed": [finite_or_none(base_eval.get("eval_loss"))],
                "correct": [[bool(p["correct"]) for p in base_eval["per_problem"]]],
                "runs": [str(self.out / "base" / "eval_test.json")],
            }
        ]
        for arm in self.arms:
            lr, sweep, note = chosen[arm.name]
            runs = seed_runs[arm.name]
            done = [r for r in runs if r.status == "finished" and r.test is not None]
            correct = []
            for r in done:
                assert r.test is not None
                refs = [p["reference"] for p in r.test["per_problem"]]
                if refs != reference:
                    raise AblateError(
                        f"{r.folder}/eval_test.json scored other problems than the base model "
                        f"({self.out / 'base' / 'eval_test.json'}); remove both and re-run"
                    )
                correct.append([bool(p["correct"]) for p in r.test["per_problem"]])
            tokens = [r.tokens for r in done if r.tokens is not None]
            how = "full rank"
            if arm.lora_rank:
                how = f"LoRA {arm.lora_targets} r={arm.lora_rank}"
                if arm.lora_match_budget:
                    how += " budget"
            rows.append(
                {
                    "arm": arm.name,
                    **{k: v for k, v in arm.to_dict().items() if k != "arm"},
                    "layers_text": arm.layers_text,
                    "how": how,
                    "trainable_parameters": self.trainable[arm.name],
                    "trainable_parameters_reported": sorted(
                        {r.trainable for r in done if r.trainable is not None}
                    ),
                    "training_tokens": sum(tokens) / len(tokens) if tokens else None,
                    "tokens_per_seed": tokens,
                    "lr": lr,
                    "lr_family": arm.family,
                    "lr_grid": [r.lr for r in sweep],
                    "lr_sweep": [
                        {
                            "lr": r.lr,
                            "status": r.status,
                            "validation_accuracy": (r.validation or {}).get("accuracy"),
                            "validation_loss": finite_or_none(
                                (r.validation or {}).get("eval_loss")
                            ),
                            "folder": str(r.folder),
                        }
                        for r in sweep
                    ],
                    "lr_note": note,
                    "seeds": [r.seed for r in done],
                    "accuracy_per_seed": [r.test["accuracy"] for r in done if r.test],
                    "answer_loss_per_seed": [
                        finite_or_none(r.test.get("eval_loss")) for r in done if r.test
                    ],
                    "diverged_seeds": [r.seed for r in runs if r.status == "diverged"],
                    "correct": correct,
                    "runs": [str(r.folder) for r in runs],
                }
            )
        return rows

    def _report(
        self,
        base_eval: dict[str, Any],
        chosen: dict[str, tuple[float | None, list[RunResult], str | None]],
        seed_runs: dict[str, list[RunResult]],
        seeds: list[int],
    ) -> dict[str, Any]:
        assert self.carved is not None
        rows = self._rows(base_eval, chosen, seed_runs)
        comparisons = compute_statistics(rows, self.settings.bootstrap, seed=0)
        by_key: dict[tuple[str, float, int], RunResult] = {}
        for arm in self.arms:  # the seed runs last: the selection run's record with its test
            for r in [*chosen[arm.name][1], *seed_runs[arm.name]]:
                by_key[(r.arm, r.lr, r.seed)] = r
        all_runs = list(by_key.values())
        base = self.base
        document = {
            "fastmid_ablate": SCHEMA,
            "output": str(self.out),
            "model": base.model,
            "model_type": self.model_type,
            "num_hidden_layers": self.num_hidden_layers,
            "settings": self._defining(),
            "protocol": {
                "arms": [a.name for a in self.arms],
                "seeds": seeds,
                "lr_grids": {a.name: self.grids[a.name] for a in self.arms},
                "lr_selection": (
                    "each rate trained once at the first seed; best validation exact match, "
                    "ties: lower validation answer loss, then the lower rate; a best rate at a "
                    f"grid edge adds one rate beyond it, up to {self.settings.lr_extend} per arm"
                ),
                "validation": self.carved.to_dict(),
                "test": {
                    "data": base.eval_accuracy_data,
                    "problems": self.test_n,
                    "prompts_also_in_training_data": self.test_overlap,
                },
                "max_steps": base.max_steps,
                "micro_batch": base.micro_batch,
                "grad_accum": base.grad_accum,
                "max_seq_len": base.max_seq_len,
                "eval_max_new_tokens": base.eval_max_new_tokens,
                "random_arm_seed": self.settings.random_arm_seed,
            },
            "statistics": {
                "accuracy_interval": "percentile bootstrap over problems of the seed-averaged "
                "correctness",
                "comparison": "mid minus each other row: paired bootstrap over problems of the "
                "difference in seed-averaged correctness; two-sided p from the bootstrap "
                "distribution recentred on zero; Holm's step-down adjustment over the "
                "comparisons against mid (base included)",
                "bootstrap_resamples": self.settings.bootstrap,
                "resampling_seed": 0,
                "confidence": DEFAULT_CONFIDENCE,
                "alpha": 0.05,
            },
            "rows": public_rows(rows),
            "comparisons": comparisons,
            "runs": [r.to_dict() for r in all_runs],
        }
        write_json(self.out / "ablate.json", document)
        write_csv(self.out / "ablate.csv", rows)
        title = (
            f"fastmid ablate: {Path(str(base.model)).name}, {base.max_steps} steps, "
            f"{self.test_n} test problems of {base.eval_accuracy_data}"
        )
        try:
            write_plot(self.out / "ablate.png", rows, title)
        except Exception as exc:  # matplotlib's errors share no base class; a plot is optional
            self.console.print(f"[yellow]warning:[/] ablate.png not drawn: {exc}", highlight=False)
        print_table(self.console, rows, comparisons)
        for row in rows:
            if row.get("lr_note"):
                self.console.print(f"note: {row['arm']}: {row['lr_note']}", highlight=False)
        self.console.print(f"ablate.json, ablate.csv, ablate.png in {self.out}", highlight=False)
        return document


def run_ablation(
    base: TrainConfig,
    settings: AblateSettings,
    console: Console | None = None,
    explicit: frozenset[str] | set[str] = frozenset(),
) -> dict[str, Any]:
    """Run (or resume) ``fastmid ablate`` and return ``ablate.json``'s content.

    Args:
        base: the shared base config of every arm (:data:`TRAIN_DEFAULTS` under YAML and flags).
        settings: the ablation's options.
        console: progress and the table (stderr when None).
        explicit: the train fields the user gave, for :func:`check_base_config`.

    Raises:
        AblateError, ConfigError, BandError, ModelSourceError, DataError, and the errors of
            ``fastmid train``: one line each, naming the flag or file.
        AblateInterrupted: Ctrl-C (exit 130).
    """
    return Ablation(base, settings, console, explicit).run()
