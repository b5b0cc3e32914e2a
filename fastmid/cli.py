"""The ``fastmid`` command line (typer). Thin: parse flags, build a config, call the library.

Commands: ``train``, ``ablate``, ``plan``, ``eval``, ``generate``, ``analyze``, ``data inspect``. The ``train`` command's
flags are generated from the fields of :class:`fastmid.config.TrainConfig`, and the options other
commands share with it (``--model``, ``--data``, ``--max-seq-len``, ...) come from the same fields
through :func:`config_option`, so every option has one name, one help text and one default.
Known errors print one line (``error: ...``) and exit 2, usage errors too (an unknown flag, a
value of the wrong type, a missing option: see :meth:`_Group.main`); an interrupted run exits 130
after saving; a non-finite loss exits 1. The console script is :func:`main`.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from fastmid.config import (
    FIELDS,
    DataFormat,
    Optimizer,
    Truncation,
    choices,
    field_problem,
    field_type,
    flag,
    suggest,
)


class _PlainHelp:
    """Mixin of every fastmid command and group.

    ``--help`` shows no type tags (typer prints ``<int>``, ``<path>``, even ``--help <bool>``: the
    help text and the default say it), and a docstring's paragraphs are joined into lines, so that
    help never breaks mid-sentence where the source wrapped. An unknown flag is answered with the
    closest known one, common aliases included (``--learning-rate`` -> ``--lr``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("help"):
            paragraphs = inspect.cleandoc(kwargs["help"]).split("\n\n")
            kwargs["help"] = "\n\n".join(" ".join(p.split()) for p in paragraphs)
        super().__init__(*args, **kwargs)
        for param in self.params:  # type: ignore[attr-defined]
            if param.param_type_name == "option":
                param.metavar = ""
            else:  # an argument keeps its metavar (its name in the usage line)
                param.display_type_rich = _no_type_tag

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            option.metavar = ""
        return option

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)  # type: ignore[misc]
        except Exception as exc:
            # typer's (vendored) click NoSuchOption; matched by its attributes, not its class,
            # since the class moved between typer versions.
            name = getattr(exc, "option_name", None)
            if isinstance(name, str) and hasattr(exc, "possibilities"):
                field_name = suggest(name)
                params = self.params  # type: ignore[attr-defined]
                known = {o for p in params for o in (*p.opts, *p.secondary_opts)}
                if field_name is not None and flag(field_name) in known:
                    exc.possibilities = [flag(field_name)]
            raise


def _no_type_tag(ctx: Any) -> None:
    return None


class _Command(_PlainHelp, TyperCommand):
    """Every fastmid command: see :class:`_PlainHelp`."""


class _Group(_PlainHelp, TyperGroup):
    """``fastmid`` and ``fastmid data``: see :class:`_PlainHelp`; the root's :meth:`main` prints
    usage errors on one line."""

    def main(
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        """Run the command line; in standalone mode (the console script, typer's CliRunner) a
        usage error is one line on stderr, ``error: --optim: 'sgd' is not one of ...``, and exits
        with its code (2), instead of typer's multi-line box.

        typer's own loop runs with ``standalone_mode=False`` so that the click exception reaches
        here; ``--help``, ``--version`` and ``typer.Exit`` keep their exit codes, ``Abort`` (Ctrl-D
        at a prompt) exits 1, and any other exception (a bug) keeps its traceback.
        """
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _CLICK_EXCEPTIONS as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":
                # `fastmid` or `fastmid data` alone: typer's rich help has already been printed;
                # plain click carries the help as the message.
                text = exc.format_message()  # type: ignore[attr-defined]
                if text.strip():
                    typer.echo(text)
            else:
                print_error(usage_error_message(exc))
            sys.exit(getattr(exc, "exit_code", 2))
        except typer.Abort:
            err_console.print("Aborted!", highlight=False)
            sys.exit(1)
        # Without standalone mode typer returns the code of a typer.Exit (int) or the command's
        # return value (None from every fastmid command): exit as standalone mode would.
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_Group,
    add_completion=False,
    no_args_is_help=True,
    help="fastmid: Mid-Block tuning (train the middle band of decoder layers) and layer-wise "
    "analysis of where fine-tuning changes a model.",
)
data_app = typer.Typer(
    cls=_Group, no_args_is_help=True, help="Look at SFT data before training on it."
)
app.add_typer(data_app, name="data")

err_console = Console(stderr=True, soft_wrap=True)  # one message, one line, in logs too


def _click_exception_types() -> tuple[type[Exception], ...]:
    """``ClickException`` of typer's vendored click (typer >= 0.26) and of click itself (older
    typer uses it directly); usage errors of either kind become one line."""
    found: list[type[Exception]] = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            found.append(importlib.import_module(module).ClickException)
        except (ImportError, AttributeError):
            continue
    return tuple(found)


_CLICK_EXCEPTIONS = _click_exception_types()


def _one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines included) as one space."""
    return " ".join(str(text).split())


def print_error(message: str, style: str = "red", prefix: str = "error: ") -> None:
    """Print ``message`` as one line on stderr: ``error: ...``.

    Newlines in the message are joined and rich neither wraps the line at the terminal width
    (80 columns when stderr is not a terminal) nor reads ``[...]`` in a path as markup.
    """
    text = escape(_one_line(message))
    line = f"[{style}]{escape(prefix)}[/]{text}" if prefix else f"[{style}]{text}[/]"
    err_console.print(line, highlight=False, soft_wrap=True)


def usage_error_message(exc: Exception) -> str:
    """One line for a click usage error, naming the flag (``--optim: 'sgd' is not one of ...``,
    ``No such option: --lrr; did you mean --lr?``, ``Missing option '--base'``), followed by
    where the command's help is."""
    param = getattr(exc, "param", None)
    kind = type(exc).__name__
    if kind == "NoSuchOption":
        message = f"No such option: {exc.option_name}"  # type: ignore[attr-defined]
        possibilities = sorted(getattr(exc, "possibilities", None) or [])
        if possibilities:
            message += f"; did you mean {' or '.join(possibilities)}?"
    elif kind == "BadParameter" and param is not None:
        # typer words a failed Literal check "Value error, 'sgd' is not one of ...".
        text = str(getattr(exc, "message", exc)).removeprefix("Value error, ")
        name = param.opts[0] if param.param_type_name == "option" else param.human_readable_name
        message = f"{name}: {text}"
    else:
        message = exc.format_message()  # type: ignore[attr-defined]
    ctx = getattr(exc, "ctx", None)
    if ctx is not None:
        message = f"{message.rstrip('.')} (see '{ctx.command_path} --help')"
    return _one_line(message)


def _run(fn: Callable[[], Any]) -> Any:
    """Call ``fn``; a :class:`~fastmid.errors.FastmidError` becomes one line and its exit code."""
    from fastmid.errors import FastmidError

    try:
        return fn()
    except FastmidError as exc:
        text = str(exc)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one of several processes (torchrun)
            if getattr(exc, "repeated", False):  # rank 0's error, which rank 0 printed
                raise typer.Exit(exc.exit_code) from None
            text = f"[rank {os.environ.get('RANK', '?')}] {text}"
        if exc.exit_code == 130:
            print_error(text, style="yellow", prefix="")
        else:
            print_error(text)
        raise typer.Exit(exc.exit_code) from None


def _print_version(value: bool) -> None:
    if not value:
        return
    try:
        number = version("fastmid")
    except PackageNotFoundError:  # a source tree that was never installed
        number = "unknown (not installed)"
    typer.echo(f"fastmid {number}")
    raise typer.Exit()


@app.callback()
def _root(
    show_version: bool = typer.Option(
        False,
        "--version",
        help="Print the version and exit.",
        is_eager=True,
        callback=_print_version,
    ),
) -> None:
    """The ``fastmid`` group: only ``--version`` (the help text is ``app``'s)."""


# ---- options from TrainConfig ------------------------------------------------------------------


def config_option(name: str, *flags: str, help: str | None = None) -> Any:
    """A typer option declared by the ``TrainConfig`` field ``name``: its default, help, choices
    and ``--help`` group, so a command that shares the option cannot drift from ``train``.

    Args:
        name: a :class:`~fastmid.config.TrainConfig` field.
        flags: the flag spelling when it differs from the field's (``eval``'s ``--n`` for
            ``eval_n``); by default ``--max-seq-len``, and ``--x/--no-x`` for booleans.
        help: the help text when the command uses the option differently (rare).
    """
    f = FIELDS[name]
    text = help or f.metadata["help"]
    allowed = choices(name)
    if allowed is not None:
        text = f"{text}: {' | '.join(allowed)}"
    if not flags:
        flags = (
            (f"{flag(name)}/--no-{flag(name)[2:]}",) if field_type(name) is bool else (flag(name),)
        )
    return typer.Option(
        f.default,
        *flags,
        help=text,
        rich_help_panel=f.metadata["group"],
        show_default=True,
        callback=_field_check(name),
    )


def _field_check(name: str) -> Callable[..., Any]:
    """A typer callback that checks an option's value as the config checks field ``name``
    (:func:`fastmid.config.field_problem`: bounds, finiteness, band syntax), so that every command
    refuses ``--max-seq-len 4`` or ``--n 0`` alike, naming the flag as that command spells it,
    before it loads anything."""

    def check(ctx: typer.Context, param: typer.CallbackParam, value: Any) -> Any:
        problem = None if ctx.resilient_parsing else field_problem(name, value)
        if problem is not None:
            raise typer.BadParameter(problem, ctx=ctx, param=param)
        return value

    return check


def _at_least(minimum: int) -> Callable[..., Any]:
    """A typer callback refusing a number below ``minimum`` (for options that are no
    ``TrainConfig`` field and that no library function checks)."""

    def check(ctx: typer.Context, param: typer.CallbackParam, value: Any) -> Any:
        if not ctx.resilient_parsing and value is not None and value < minimum:
            raise typer.BadParameter(f"must be >= {minimum}, got {value}", ctx=ctx, param=param)
        return value

    return check


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the flag of parameter ``name`` was typed on the command line (a flag left out must
    not override the YAML file)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def _train(ctx: typer.Context, config: Path | None, print_config: bool, **values: Any) -> None:
    """Train the band of a model on SFT data.

    Default: SmolLM2-135M-Instruct on builtin:arith, 90 steps: about 10 minutes of training on
    2 CPU cores, plus 2-3 minutes of accuracy evaluation before and after. Precedence: defaults <
    the YAML CONFIG < flags given here.
    """
    overrides = {name: value for name, value in values.items() if _given(ctx, name)}

    def go() -> None:
        from fastmid.config import build_config, config_yaml

        cfg = build_config(config, overrides)
        if print_config:
            sys.stdout.write(config_yaml(cfg))
            return
        from fastmid.train.distributed import (
            check_launch,
            check_settings,
            launch,
            launched_by_torchrun,
        )

        check_launch(cfg.nproc)
        if cfg.nproc > 1 and not launched_by_torchrun():
            check_settings(cfg, cfg.nproc)  # before any process starts
            code = launch(cfg)  # the processes print their own lines
            if code:
                raise typer.Exit(code)
            return
        from fastmid.train.recipe import run_train

        run_train(cfg, err_console)

    _run(go)


def _train_signature() -> inspect.Signature:
    """``_train``'s parameters as typer reads them: CONFIG, one option per ``TrainConfig`` field in
    field order (which orders the ``--help`` groups), then ``--print-config``."""
    keyword = inspect.Parameter.KEYWORD_ONLY
    config = typer.Argument(None, help="YAML config; flags override its keys.", metavar="CONFIG")
    print_config = typer.Option(
        False,
        "--print-config",
        help="print the resolved config as YAML (what the run's config.yaml holds) and exit "
        "without loading anything.",
        rich_help_panel="output",
    )
    return inspect.Signature(
        [
            inspect.Parameter(
                "ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context
            ),
            inspect.Parameter(
                "config",
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                annotation=Path | None,
                default=config,
            ),
            *(
                inspect.Parameter(
                    name, keyword, annotation=field_type(name), default=config_option(name)
                )
                for name in FIELDS
            ),
            inspect.Parameter("print_config", keyword, annotation=bool, default=print_config),
        ]
    )


_train.__signature__ = _train_signature()  # type: ignore[attr-defined]
# typer also resolves annotations by name: give it the signature's objects.
_train.__annotations__ = {
    p.name: p.annotation
    for p in _train.__signature__.parameters.values()  # type: ignore[attr-defined]
}
app.command("train", cls=_Command)(_train)


def _ablate(
    ctx: typer.Context,
    config: Path | None,
    arms: str,
    lrs: str,
    seeds: int,
    val_n: int,
    lr_extend: int,
    random_arm_seed: int,
    bootstrap: int,
    keep: str,
    **values: Any,
) -> None:
    """Test the source paper's claim with controls: train the middle band and its controls at
    the same steps and tokens, choose each arm's learning rate on a validation split, score every
    arm with several seeds on the same test problems, and say which differences hold.

    Arms: mid (the band, full rank), early and late (as many layers at the bottom and top), random
    (as many layers drawn with --random-arm-seed), full (every layer), lora (LoRA on every linear
    of every layer), lora-mid (the paper's released method: q/k/v/o LoRA on the middle of five
    depth segments with uniform q/k/v/o LoRA's rank budget). Every train option is the shared
    base of all arms; --band/--layers set mid's layers, --lora-rank the LoRA arms' rank, and
    --eval-accuracy-data/--eval-n the test set. Re-running with the same --output resumes.
    Writes ablate.json, ablate.csv and ablate.png. Precedence: defaults < the YAML CONFIG <
    flags given here.
    """
    overrides = {name: value for name, value in values.items() if _given(ctx, name)}

    def go() -> None:
        from fastmid.ablate.protocol import AblateSettings, build_ablate_config, run_ablation

        cfg, explicit = build_ablate_config(config, overrides)
        settings = AblateSettings(
            arms=arms,
            lrs=lrs,
            seeds=seeds,
            val_n=val_n,
            lr_extend=lr_extend,
            random_arm_seed=random_arm_seed,
            bootstrap=bootstrap,
            keep=keep,
        )
        run_ablation(cfg, settings, err_console, explicit)

    _run(go)


def _ablate_signature() -> inspect.Signature:
    """``_ablate``'s parameters: CONFIG, the ablation's own options, then one option per
    ``TrainConfig`` field (the shared base of every arm; the defaults of
    :data:`fastmid.ablate.defaults.TRAIN_DEFAULTS` where the ablation sizes them differently)."""
    from fastmid.ablate.defaults import (
        ARMS,
        DEFAULT_BOOTSTRAP,
        DEFAULT_LR_EXTEND,
        DEFAULT_LRS,
        DEFAULT_SEEDS,
        DEFAULT_VAL_N,
        KEEP_CHOICES,
        TRAIN_DEFAULTS,
    )

    keyword = inspect.Parameter.KEYWORD_ONLY
    panel = "ablation"

    def own(name: str, annotation: Any, default: Any, help: str, minimum: int | None = None) -> Any:
        option = typer.Option(
            default,
            "--" + name.replace("_", "-"),
            help=help,
            rich_help_panel=panel,
            show_default=True,
            callback=_at_least(minimum) if minimum is not None else None,
        )
        return inspect.Parameter(name, keyword, annotation=annotation, default=option)

    def shared(name: str) -> inspect.Parameter:
        option = config_option(name)
        if name in TRAIN_DEFAULTS:
            option.default = TRAIN_DEFAULTS[name]
            option.help = f"{option.help} (fastmid ablate's default)"
        return inspect.Parameter(name, keyword, annotation=field_type(name), default=option)

    return inspect.Signature(
        [
            inspect.Parameter(
                "ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context
            ),
            inspect.Parameter(
                "config",
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                annotation=Path | None,
                default=typer.Argument(
                    None,
                    help="YAML config of the shared base; flags override its keys.",
                    metavar="CONFIG",
                ),
            ),
            own("arms", str, ",".join(ARMS), f"arms, comma-separated: {' | '.join(ARMS)}"),
            own(
                "lrs",
                str,
                DEFAULT_LRS,
                "learning-rate grids, fixed in advance: one grid for every arm (1e-4,3e-4,1e-3) "
                "or KEY=GRID groups separated by ';', KEY full-rank, lora or an arm",
            ),
            own("seeds", int, DEFAULT_SEEDS, "seeds per arm at its chosen rate", 1),
            own(
                "val_n",
                int,
                DEFAULT_VAL_N,
                "validation problems carved from the training data (never the test set)",
                1,
            ),
            own(
                "lr_extend",
                int,
                DEFAULT_LR_EXTEND,
                "rates a grid may grow by, per arm, when its best rate sits at an edge",
                0,
            ),
            own("random_arm_seed", int, 0, "seed of the random arm's draw of layers", 0),
            own("bootstrap", int, DEFAULT_BOOTSTRAP, "bootstrap resamples of the statistics", 1),
            own(
                "keep",
                str,
                "results",
                "what a finished run keeps: results (metrics, evaluations; checkpoints and models "
                f"removed once evaluated), final (also final/), all: {' | '.join(KEEP_CHOICES)}",
            ),
            *(shared(name) for name in FIELDS),
        ]
    )


_ablate.__signature__ = _ablate_signature()  # type: ignore[attr-defined]
_ablate.__annotations__ = {
    p.name: p.annotation
    for p in _ablate.__signature__.parameters.values()  # type: ignore[attr-defined]
}
app.command("ablate", cls=_Command)(_ablate)


@app.command(cls=_Command)
def plan(
    ctx: typer.Context,
    model: str = config_option(
        "model", help="model: default, an HF folder, a .gguf file, a repo id or a config.json"
    ),
    band: str | None = config_option("band"),
    layers: str | None = config_option("layers"),
    seq_len: int = typer.Option(4096, help="tokens per sequence", rich_help_panel="optimization"),
    micro_batch: int = typer.Option(
        1, help="sequences per micro-batch", rich_help_panel="optimization"
    ),
    optim: Optimizer = config_option("optim"),
    precision: str = config_option(
        "precision",
        help="weights and compute: fp32; bf16-master (bf16 autocast, fp32 band weights); bf16 "
        "(all weights bf16, stochastic rounding); auto: bf16-master, the CUDA default (plan "
        "estimates GPU memory)",
    ),
    optimizer_in_backward: bool = config_option(
        "optimizer_in_backward",
        help="estimate with each band parameter stepped inside backward and its gradient freed "
        "at once: one parameter's gradient at a time",
    ),
    optimizer_offload: bool = config_option(
        "optimizer_offload",
        help="estimate with the optimizer states of tensors of >= 4096 elements in pinned CPU "
        "memory (CUDA): a host-memory row, outside the GPU total",
    ),
    checkpointing: bool = typer.Option(
        True,
        "--checkpointing/--no-checkpointing",
        "--grad-checkpointing/--no-grad-checkpointing",
        help="activation checkpointing of the band and suffix layers (train's "
        "--grad-checkpointing; on here, off in train by default)",
        rich_help_panel="optimization",
    ),
    gpus: int = typer.Option(
        1,
        help="GPUs to estimate for (FSDP2 sharding; an estimate: train runs on one device today)",
        rich_help_panel="hardware",
    ),
    gpu_memory: float = typer.Option(
        141.0,
        help='memory per GPU, GiB (2^30 bytes; an H200 sold as "141 GB" gives CUDA about '
        "139-140 GiB)",
        rich_help_panel="hardware",
    ),
    supervised_fraction: float | None = typer.Option(
        None,
        help="share of tokens with a label (fastmid projects lm_head only there; default: every "
        "token, the upper bound for chat SFT)",
        rich_help_panel="optimization",
        show_default=False,
    ),
    fused_loss: bool = typer.Option(
        False,
        "--fused-loss/--no-fused-loss",
        help="count the chunked linear cross-entropy kernel's peak (train uses it on CUDA with "
        "--kernels auto/on) instead of the eager loss",
        rich_help_panel="optimization",
    ),
    min_headroom: float | None = typer.Option(
        None,
        help="GiB the recommended mode must leave free (default: 2 or 3% of --gpu-memory, "
        "whichever is more)",
        rich_help_panel="hardware",
        show_default=False,
    ),
    as_json: bool = typer.Option(False, "--json", help="print JSON only", rich_help_panel="output"),
) -> None:
    """Show which layers train and whether the run fits in GPU memory.

    With no mode flag (--precision, --optim, --optimizer-in-backward, --optimizer-offload,
    --grad-checkpointing), the table shows the CUDA default mode, and below it the first mode
    that fits --gpu-memory in the order of preference (quality, then speed) with the exact
    `fastmid train` flags that select it; --json has it under "recommended".
    """
    # A mode flag given (either spelling of --grad-checkpointing too): that mode only.
    mode_flags = ("precision", "optim", "optimizer_in_backward", "optimizer_offload")
    # fastmid train runs on one device: a recommendation for N GPUs would not fit what it runs.
    recommend = gpus == 1 and not any(_given(ctx, name) for name in (*mode_flags, "checkpointing"))

    def go() -> None:
        from fastmid.config import resolve_optim, resolve_precision
        from fastmid.models.plan_report import make_plan, print_plan

        # A plan estimates GPU memory: auto resolves as on CUDA.
        resolved = resolve_precision(precision, "cuda")
        result = make_plan(
            model,
            band,
            layers,
            seq_len,
            micro_batch,
            gpus,
            gpu_memory,
            optim=resolve_optim(optim, resolved, distributed=gpus > 1),
            checkpointing=checkpointing,
            precision=resolved,
            optimizer_in_backward=optimizer_in_backward,
            optimizer_offload=optimizer_offload,
            recommend=recommend,
            min_headroom_gib=min_headroom,
            supervised_fraction=supervised_fraction,
            fused_loss=fused_loss,
        )
        if as_json:
            sys.stdout.write(json.dumps(result, indent=1) + "\n")
        else:
            print_plan(result, Console())

    _run(go)


@app.command("eval", cls=_Command)
def eval_cmd(
    model: str = config_option("model"),
    data: str = config_option("eval_accuracy_data", "--data"),
    skip_bad_rows: bool = config_option("skip_bad_rows"),
    n: int = config_option("eval_n", "--n"),
    max_new_tokens: int = config_option("eval_max_new_tokens", "--max-new-tokens"),
    batch_size: int = config_option("eval_batch_size", "--batch-size"),
    as_json: bool = typer.Option(False, "--json", help="print JSON only", rich_help_panel="output"),
) -> None:
    """Exact-match accuracy (GSM8K convention) with a 95% CI, and mean answer loss.

    The defaults are the accuracy eval of `fastmid train` (its --eval-n, --eval-max-new-tokens,
    --eval-batch-size, --eval-accuracy-data), so `fastmid eval --model runs/x/final` repeats the
    measurement in the run's summary.
    """

    def go() -> None:
        from fastmid.eval.exact_match import run_eval

        result = run_eval(model, data, n, max_new_tokens, batch_size, skip_bad_rows)
        if as_json:
            sys.stdout.write(json.dumps(result.to_dict(), indent=1) + "\n")
            return
        lo, hi = result.ci95
        console = Console()
        console.print(
            f"{model} on {data}: accuracy {result.accuracy:.1%} ({result.correct}/{result.n}), "
            f"95% CI [{lo:.1%}, {hi:.1%}]"
            + (f", answer loss {result.eval_loss:.4f}" if result.eval_loss is not None else "")
        )
        # A few answers beside their references: what the number means, at a glance.
        for k, sample in enumerate(result.samples, start=1):
            mark = "correct" if sample.get("correct") else "wrong"
            last = (sample.get("completion") or "").strip().splitlines()[-1:] or [""]
            console.print(
                f"  sample {k} ({mark}): predicted {sample.get('predicted')!r}, reference "
                f"{sample.get('reference')!r}; answer ends: {last[0][:100]!r}",
                highlight=False,
                soft_wrap=True,
            )

    _run(go)


@app.command("generate", cls=_Command)
def generate_cmd(
    model: str = config_option("model"),
    prompt: list[str] = typer.Option(
        ...,
        "--prompt",
        help="the user message; '-' reads standard input; repeat the flag to generate for each "
        "prompt in turn",
        rich_help_panel="generation",
        show_default=False,
    ),
    system: str | None = typer.Option(
        None,
        help="system message (default: none; the chat template may add its own, as in training)",
        rich_help_panel="generation",
        show_default=False,
    ),
    max_new_tokens: int = typer.Option(
        128,
        help="generation budget per prompt, tokens",
        rich_help_panel="generation",
        callback=_at_least(1),
    ),
    temperature: float = typer.Option(
        0.0, help="sampling temperature; 0: greedy (deterministic)", rich_help_panel="generation"
    ),
    top_p: float = typer.Option(
        1.0,
        help="nucleus sampling mass, in (0, 1]; only when --temperature > 0",
        rich_help_panel="generation",
    ),
    seed: int | None = typer.Option(
        None,
        help="random seed of sampling (default: unseeded)",
        rich_help_panel="generation",
        show_default=False,
    ),
    as_json: bool = typer.Option(
        False,
        "--json",
        help='one JSON object per prompt, one a line: {"prompt", "completion", "tokens", '
        '"seconds"}',
        rich_help_panel="output",
    ),
) -> None:
    """Generate a reply to a prompt with the model's chat template, e.g. to try a tuned model:
    `fastmid generate --model runs/x/final --prompt "What is 12*7?"`.

    Prints only the completion (or, with --json, the JSON). Generation stops at the chat
    template's end-of-turn token or after --max-new-tokens.
    """

    def go() -> None:
        from fastmid.eval.generate import run_generate

        results = run_generate(
            model,
            prompt,
            system=system,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
        )
        for result in results:
            if as_json:
                sys.stdout.write(json.dumps(result.to_dict()) + "\n")
            else:
                sys.stdout.write(result.completion + "\n")
            sys.stdout.flush()

    _run(go)


@data_app.command("inspect", cls=_Command)
def data_inspect(
    model: str = config_option("model", help="model whose tokenizer and chat template are used"),
    data: str = config_option("data"),
    format: DataFormat | None = config_option("format"),
    split: str = config_option("split"),
    max_examples: int | None = config_option("max_examples"),
    shuffle_seed: int = config_option("shuffle_seed"),
    max_seq_len: int = config_option("max_seq_len"),
    truncation: Truncation = config_option("truncation"),
    train_on_prompt: bool = config_option("train_on_prompt"),
    last_turn_only: bool = config_option("last_turn_only"),
    skip_bad_rows: bool = config_option("skip_bad_rows"),
    packing: bool = config_option("packing"),
    micro_batch: int = config_option("micro_batch"),
    n: int = typer.Option(
        2, help="examples to render", rich_help_panel="output", callback=_at_least(0)
    ),
) -> None:
    """Format, counts, token statistics, and examples with the trained tokens highlighted
    (with --packing: rows, fill ratio and the padding packing saves)."""

    def go() -> None:
        from fastmid.data.inspect import inspect_data
        from fastmid.models.loading import load_tokenizer

        inspect_data(
            data,
            load_tokenizer(model),
            max_seq_len=max_seq_len,
            n=n,
            format=format,
            split=split,
            max_examples=max_examples,
            shuffle_seed=shuffle_seed,
            truncation=truncation,
            skip_bad_rows=skip_bad_rows,
            train_on_prompt=train_on_prompt,
            last_turn_only=last_turn_only,
            packing=packing,
            micro_batch=micro_batch,
            console=Console(),
        )

    _run(go)


@app.command(cls=_Command)
def analyze(
    base: str = typer.Option(..., help="base model", rich_help_panel="model"),
    tuned: str | None = typer.Option(
        None,
        help="tuned model (omit for single-model metrics)",
        rich_help_panel="model",
    ),
    data: str = config_option("data", help="data to run both models on"),
    format: DataFormat | None = config_option("format"),
    split: str = config_option("split"),
    max_seq_len: int = config_option("max_seq_len"),
    truncation: Truncation = config_option("truncation"),
    train_on_prompt: bool = config_option("train_on_prompt"),
    last_turn_only: bool = config_option("last_turn_only"),
    skip_bad_rows: bool = config_option("skip_bad_rows"),
    max_tokens: int = typer.Option(20000, help="tokens to analyse", rich_help_panel="analysis"),
    batch_size: int = typer.Option(8, help="sequences per forward", rich_help_panel="analysis"),
    mask_bos: bool = typer.Option(
        False,
        "--mask-bos/--no-mask-bos",
        help="exclude the first position",
        rich_help_panel="analysis",
    ),
    grad_norms: bool = typer.Option(
        False,
        "--grad-norms/--no-grad-norms",
        help="per-layer SFT grad norms",
        rich_help_panel="analysis",
    ),
    entropy_tokens: int = typer.Option(
        128,
        help="tokens per prompt for entropy and effective rank (0: all)",
        rich_help_panel="analysis",
    ),
    output: Path = typer.Option(Path("analysis"), help="output folder", rich_help_panel="output"),
    overwrite: bool = config_option(
        "overwrite", help="replace an earlier analysis (analysis.json/.csv/.png) in --output"
    ),
) -> None:
    """Layer-wise base-vs-tuned analysis (CKA, weight change, entropy, grad norms) + band advice."""

    def go() -> None:
        from fastmid.analysis.analyze import run_analysis
        from fastmid.analysis.heap import keep_freed_memory

        # Each batch frees and reallocates every layer's outputs: keep that memory (see heap.py).
        keep_freed_memory()

        run_analysis(
            base=base,
            tuned=tuned,
            data=data,
            max_tokens=max_tokens,
            max_seq_len=max_seq_len,
            batch_size=batch_size,
            mask_bos=mask_bos,
            grad_norms=grad_norms,
            entropy_tokens=entropy_tokens,
            output_dir=output,
            overwrite=overwrite,
            console=Console(),
            split=split,
            format=format,
            truncation=truncation,
            train_on_prompt=train_on_prompt,
            last_turn_only=last_turn_only,
            skip_bad_rows=skip_bad_rows,
        )

    _run(go)


def main() -> None:
    """The ``fastmid`` console script (and ``python -m fastmid.cli``): :data:`app` under the name
    ``fastmid``; errors are one line (see :meth:`_Group.main` and :func:`_run`)."""
    app(prog_name="fastmid")


if __name__ == "__main__":  # pragma: no cover
    main()
