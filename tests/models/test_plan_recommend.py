"""``fastmid plan``'s modes and its recommendation (issue 15, "Every mode, and a recommendation").

Every combination of precision, optimizer, step in backward or offload, checkpointing and GPU
count reaches the estimate; the recommendation takes the first mode of
:data:`fastmid.models.plan_report.MODE_ORDER` that leaves the minimum headroom free. The expected
totals come from :func:`estimate_mid_block` called here on a model and setup built here (and one
line by hand), not from the plan's own table. CLI-level checks are in ``tests/test_cli.py``.
"""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import pytest
from tiny import tiny_config

from fastmid.models.band import BandPlan
from fastmid.models.loading import load_config
from fastmid.models.memory import (
    GIB,
    MemoryPlanError,
    TrainingSetup,
    build_meta_model,
    estimate_mid_block,
)
from fastmid.models.plan_report import (
    MODE_ORDER,
    default_min_headroom_gib,
    make_plan,
    pick_mode,
    recommend_mode,
)

CONFIGS = Path(__file__).resolve().parents[2] / "bench" / "configs"
# The order of issue 15, written out here independently of MODE_ORDER:
# (precision, optim, optimizer_in_backward, optimizer_offload).
EXPECTED_ORDER = [
    ("bf16-master", "adamw8bit", False, False),
    ("bf16-master", "adamw8bit", True, False),
    ("bf16", "ao_adamw8bit", False, False),
    ("bf16", "ao_adamw8bit", True, False),
    ("bf16", "ao_adamw4bit", True, False),
    ("bf16", "ao_adamw8bit", False, True),
    ("bf16", "ao_adamw4bit", False, True),
]
RECOMMENDED_KEYS = {
    "flags",
    "total_bytes",
    "headroom_bytes",
    "precision",
    "optim",
    "optimizer_in_backward",
    "optimizer_offload",
}


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> Path:
    """10 layers, h=64, 4 heads of 16 (q, o: 4096 elements), 2 kv heads (k, v: 2048), I=128
    (gate, up, down: 8192), vocabulary 64; band 2..7."""
    path = tmp_path_factory.mktemp("plan") / "config.json"
    tiny_config(
        "llama", num_hidden_layers=10, hidden_size=64, intermediate_size=128, vocab_size=64
    ).to_json_file(path)
    return path


def expected_totals(path: Path, seq_len: int = 64, **setup: object) -> list[int]:
    """The Mid-Block total of every mode of EXPECTED_ORDER, estimated here."""
    config = load_config(path)
    model = build_meta_model(config)
    band = BandPlan.parse(config.num_hidden_layers)
    totals = []
    for precision, optim, in_backward, offload in EXPECTED_ORDER:
        s = TrainingSetup(
            seq_len=seq_len,
            precision=precision,  # type: ignore[arg-type]
            optim=optim,  # type: ignore[arg-type]
            optimizer_in_backward=in_backward,
            optimizer_offload=offload,
            checkpointing=True,
            **setup,  # type: ignore[arg-type]
        )
        totals.append(estimate_mid_block(model, band, s).total)
    return totals


def first_fit(totals: list[int], budget_bytes: float) -> int | None:
    return next((i + 1 for i, t in enumerate(totals) if t <= budget_bytes), None)


def test_the_order_is_the_documented_one() -> None:
    modes = [
        (m.precision, m.optim, m.optimizer_in_backward, m.optimizer_offload) for m in MODE_ORDER
    ]
    assert modes == EXPECTED_ORDER
    # recommend_mode's docstring lists the same modes in the same order.
    doc = recommend_mode.__doc__ or ""
    items = re.findall(r"^\s*(\d)\. (.+?):", doc, re.M)
    assert [int(n) for n, _ in items] == list(range(1, len(MODE_ORDER) + 1))
    for (_, text), (precision, optim, in_backward, offload) in zip(
        items, EXPECTED_ORDER, strict=True
    ):
        assert f"``{precision}`` + ``{optim}``" in text, text
        assert ("--optimizer-in-backward" in text) == in_backward, text
        assert ("--optimizer-offload" in text) == offload, text


def test_mode_table_estimates_each_mode(tiny_path: Path) -> None:
    plan = make_plan(tiny_path, seq_len=64, micro_batch=2, gpu_memory_gib=1.0)
    modes = plan["recommendation"]["modes"]
    assert [m["rank"] for m in modes] == list(range(1, 8))
    assert [m["total_bytes"] for m in modes] == expected_totals(tiny_path, micro_batch=2)
    # The modes are one-GPU modes (bitsandbytes, the step in backward, offload): FSDP2 runs none
    # of them, so several GPUs get no recommendation.
    two = make_plan(tiny_path, seq_len=64, gpus=2, gpu_memory_gib=1.0)
    assert two["recommendation"] == {"status": "off"} and two["recommended"] is None
    for m, (precision, optim, in_backward, offload) in zip(modes, EXPECTED_ORDER, strict=True):
        assert (m["precision"], m["optim"]) == (precision, optim)
        assert (m["optimizer_in_backward"], m["optimizer_offload"]) == (in_backward, offload)
        assert m["memory"]["bytes"]["total"] == m["total_bytes"]
        assert m["host_memory_bytes"] == m["memory"]["bytes"]["host_memory"]
        assert (m["host_memory_bytes"] > 0) == offload
    # By hand, 1 GPU: under the step in backward one gate/up/down gradient (8192 elements) lives,
    # fp32 under bf16-master, bf16 under bf16.
    one = make_plan(tiny_path, seq_len=64)["recommendation"]["modes"]
    assert one[1]["memory"]["bytes"]["gradients"] == 8192 * 4
    assert one[3]["memory"]["bytes"]["gradients"] == one[4]["memory"]["bytes"]["gradients"]
    assert one[3]["memory"]["bytes"]["gradients"] == 8192 * 2


def test_modes_keep_checkpointing_on_whatever_the_table_uses(tiny_path: Path) -> None:
    off = make_plan(tiny_path, seq_len=64, checkpointing=False)
    assert off["setup"]["checkpointing"] is False
    assert [m["total_bytes"] for m in off["recommendation"]["modes"]] == expected_totals(tiny_path)


@pytest.mark.parametrize("rank", [1, 2, 3, 4, 5])
def test_the_first_mode_that_fits_is_recommended(tiny_path: Path, rank: int) -> None:
    totals = expected_totals(tiny_path)
    # The tiny model's totals fall along the order up to mode 5, so a GPU of exactly mode
    # `rank`'s total makes it the first that fits.
    assert all(t > totals[rank - 1] for t in totals[: rank - 1])
    gpu = totals[rank - 1] / GIB
    plan = make_plan(tiny_path, seq_len=64, gpu_memory_gib=gpu, min_headroom_gib=0)
    rec = plan["recommended"]
    assert rec is not None and rec["rank"] == rank == first_fit(totals, gpu * GIB)
    precision, optim, in_backward, offload = EXPECTED_ORDER[rank - 1]
    assert (rec["precision"], rec["optim"]) == (precision, optim)
    assert (rec["optimizer_in_backward"], rec["optimizer_offload"]) == (in_backward, offload)
    assert rec["total_bytes"] == totals[rank - 1]
    assert rec["headroom_bytes"] == 0
    assert plan["recommendation"]["status"] == "fits"

    # A byte less on the GPU: the next mode down the order that fits, if any.
    smaller = (totals[rank - 1] - 1) / GIB
    below = make_plan(tiny_path, seq_len=64, gpu_memory_gib=smaller, min_headroom_gib=0)
    expected = first_fit(totals, smaller * GIB)
    got = below["recommended"]
    assert (got and got["rank"]) == expected and expected != rank


def test_offload_modes_are_never_first_today(tiny_path: Path) -> None:
    """The finding recommend_mode documents: offload keeps every gradient on the GPU, so its
    total exceeds mode 5's, and 4-bit offload equals 8-bit offload on the GPU."""
    totals = expected_totals(tiny_path)
    assert totals[5] > totals[4] and totals[6] == totals[5]


def test_headroom_is_kept(tiny_path: Path) -> None:
    totals = expected_totals(tiny_path)
    # Exactly mode 3's total plus 1 MiB of GPU: mode 3 with up to 1 MiB kept free, else mode 4.
    gpu = (totals[2] + 2**20) / GIB
    rec = make_plan(tiny_path, seq_len=64, gpu_memory_gib=gpu, min_headroom_gib=1 / 1024)
    assert rec["recommended"]["rank"] == 3
    assert rec["recommended"]["headroom_bytes"] == 2**20
    rec = make_plan(tiny_path, seq_len=64, gpu_memory_gib=gpu, min_headroom_gib=1.001 / 1024)
    assert rec["recommended"]["rank"] == 4
    assert rec["recommendation"]["min_headroom_gib"] == pytest.approx(1.001 / 1024)


def test_default_headroom() -> None:
    assert default_min_headroom_gib(141) == pytest.approx(4.23)
    assert default_min_headroom_gib(80) == pytest.approx(2.4)
    assert default_min_headroom_gib(24) == 2.0
    assert default_min_headroom_gib(40) == 2.0  # 3% is 1.2


def test_default_headroom_refuses_a_tight_fit() -> None:
    """OLMo-2-7B's band on a 24 GiB card: the smallest mode (bf16, 4-bit states, step in
    backward) leaves under 1 GiB, less than the default 2 GiB, so nothing is recommended."""
    path = CONFIGS / "olmo-2-1124-7b.json"
    totals = expected_totals(path, seq_len=4096, gpu_memory_gib=24.0)
    assert min(totals) == totals[4]
    assert 22 * GIB < totals[4] <= 24 * GIB
    plan = make_plan(path, gpu_memory_gib=24)
    assert plan["recommended"] is None
    assert plan["recommendation"]["status"] == "none-fits"
    assert plan["recommendation"]["min_headroom_gib"] == 2.0
    relaxed = make_plan(path, gpu_memory_gib=24, min_headroom_gib=0.5)["recommended"]
    assert relaxed["rank"] == 5 and relaxed["total_bytes"] == totals[4]
    assert relaxed["headroom_bytes"] == 24 * GIB - totals[4]


def test_none_fits_and_off(tiny_path: Path) -> None:
    plan = make_plan(tiny_path, seq_len=64, gpu_memory_gib=0.001, min_headroom_gib=0)
    assert plan["recommended"] is None
    assert plan["recommendation"]["status"] == "none-fits"
    assert len(plan["recommendation"]["modes"]) == len(EXPECTED_ORDER)
    off = make_plan(tiny_path, seq_len=64, recommend=False)
    assert off["recommended"] is None and off["recommendation"] == {"status": "off"}


def test_recommended_shape(tiny_path: Path) -> None:
    plan = make_plan(tiny_path, seq_len=64, gpu_memory_gib=1.0, min_headroom_gib=0.5)
    rec = plan["recommended"]
    assert RECOMMENDED_KEYS <= set(rec)
    assert isinstance(rec["flags"], list) and all(isinstance(f, str) for f in rec["flags"])
    assert isinstance(rec["total_bytes"], int) and isinstance(rec["headroom_bytes"], int)
    assert rec["headroom_bytes"] == GIB - rec["total_bytes"]
    assert rec["command"] == "fastmid train " + " ".join(rec["flags"])
    assert rec["rank"] == 1  # a tiny model fits anything
    # recommend_mode gives the same entry from a model, a band and a setup.
    config = load_config(tiny_path)
    setup = TrainingSetup(seq_len=64, gpu_memory_gib=1.0)
    direct = recommend_mode(
        build_meta_model(config),
        BandPlan.parse(config.num_hidden_layers),
        setup,
        min_headroom_gib=0.5,
    )
    assert direct == rec


def test_flags_carry_the_mode_and_the_size(tiny_path: Path) -> None:
    plan = make_plan(tiny_path, "0.3:0.7", seq_len=256, micro_batch=2, min_headroom_gib=0)
    for m in plan["recommendation"]["modes"]:
        flags = m["flags"]
        pairs = dict(zip(flags, [*flags[1:], None], strict=True))
        assert (pairs["--precision"], pairs["--optim"]) == (m["precision"], m["optim"])
        assert pairs["--max-seq-len"] == "256" and pairs["--micro-batch"] == "2"
        assert pairs["--band"] == "0.3:0.7" and "--layers" not in flags
        assert "--grad-checkpointing" in flags
        in_backward, offload = m["optimizer_in_backward"], m["optimizer_offload"]
        assert ("--optimizer-in-backward" in flags) == in_backward
        assert ("--no-optimizer-in-backward" in flags) == (not in_backward)
        assert ("--optimizer-offload" in flags) == offload
        assert ("--no-optimizer-offload" in flags) == (not offload)
        assert (pairs.get("--grad-clip") == "0") == (in_backward or offload)
        assert (pairs.get("--grad-accum") == "1") == in_backward
    layers = make_plan(tiny_path, layers="3-5", seq_len=64)["recommended"]["flags"]
    assert layers[-2:] == ["--layers", "3-5"] and "--band" not in layers


def test_bad_min_headroom_names_the_flag(tiny_path: Path) -> None:
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(MemoryPlanError, match="--min-headroom"):
            make_plan(tiny_path, seq_len=64, min_headroom_gib=bad)
        with pytest.raises(MemoryPlanError, match="--min-headroom"):
            pick_mode([], 80.0, bad)


PRECISIONS = ("fp32", "bf16-master", "bf16")
OPTIMS = ("adamw8bit", "paged_adamw8bit", "adamw", "ao_adamw8bit", "ao_adamw4bit")
OPTIONS = ((False, False), (True, False), (False, True))


def test_every_combination_reaches_the_estimate(tiny_path: Path) -> None:
    """Every precision x optimizer x (neither, in backward, offload) x checkpointing x GPUs:
    make_plan's Mid-Block column is the estimate of that setup, or it refuses the combination as
    TrainingSetup does (bf16 with a round-to-nearest optimizer, offload with paged_adamw8bit)."""
    config = load_config(tiny_path)
    model = build_meta_model(config)
    band = BandPlan.parse(config.num_hidden_layers)
    seen_totals = set()
    refused = 0
    for precision, optim, (in_backward, offload), ckpt, gpus in itertools.product(
        PRECISIONS, OPTIMS, OPTIONS, (True, False), (1, 2)
    ):
        kwargs = dict(
            precision=precision,
            optim=optim,
            optimizer_in_backward=in_backward,
            optimizer_offload=offload,
            checkpointing=ckpt,
            gpus=gpus,
        )
        bad = (
            (precision == "bf16" and not optim.startswith("ao_"))
            or (offload and optim == "paged_adamw8bit")
            # FSDP2 (fastmid.train.distributed.check_settings): no bitsandbytes optimizer, no
            # step in backward, no offload.
            or (gpus > 1 and (optim not in ("adamw", "ao_adamw8bit", "ao_adamw4bit")))
            or (gpus > 1 and (in_backward or offload))
        )
        if bad:
            refused += 1
            with pytest.raises(MemoryPlanError):
                make_plan(tiny_path, seq_len=64, recommend=False, **kwargs)  # type: ignore[arg-type]
            continue
        plan = make_plan(tiny_path, seq_len=64, recommend=False, **kwargs)  # type: ignore[arg-type]
        setup_here = TrainingSetup(seq_len=64, **kwargs)  # type: ignore[arg-type]
        expected = estimate_mid_block(model, band, setup_here).to_dict()
        assert plan["memory"]["mid_block"] == expected, kwargs
        setup = plan["setup"]
        assert (setup["precision"], setup["optim"], setup["gpus"]) == (precision, optim, gpus)
        assert (setup["optimizer_in_backward"], setup["optimizer_offload"]) == (
            in_backward,
            offload,
        )
        assert setup["checkpointing"] is ckpt
        seen_totals.add(expected["bytes"]["total"])
    # 3 x 5 x 3 x 2 x 2 = 180 combinations. One GPU: bf16 refuses 3 optimizers x 3 options x 2
    # (checkpointing), offload refuses paged_adamw8bit under the 2 other precisions x 2. Two GPUs
    # keep only (fp32 or bf16-master) x 3 optimizers + bf16 x 2, without either option, x 2: 16
    # of 90.
    assert refused == 18 + 4 + (90 - 16)
    assert len(seen_totals) > 60  # the flags change the estimate (paged = adamw8bit in bytes)
