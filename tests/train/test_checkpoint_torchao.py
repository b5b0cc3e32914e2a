"""Checkpoints of torchao's AdamW8bit/AdamW4bit: their tensor-subclass states stored through
``__tensor_flatten__`` as plain tensors plus JSON (no pickle), rebuilt bit-exactly through an
allow-list of classes, tensor learning rates, and refusals (unknown class names, damaged entries,
subclasses fastmid cannot store).

torchao compiles its step once per parameter shape: one module-scoped run per optimizer over a
``Linear(128, 64)`` (a 64x128 weight, 8192 elements, gets quantized state; the 64-element bias
keeps fp32 state) serves every test.
"""

from __future__ import annotations

import importlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastmid.train.checkpoint as checkpoint
from fastmid.train.checkpoint import (
    CheckpointError,
    TrainerState,
    capture_rng,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    verify_checkpoint,
)
from fastmid.train.optim import (
    build_optimizer,
    build_scheduler,
    import_torchao_optim,
)

# torchao is a dependency (pyproject.toml): its absence fails here rather than skipping.
import_torchao_optim()  # torchao's import, silenced, before the subclass modules below
from torchao.optim.subclass_4bit import OptimState4bit  # noqa: E402
from torchao.optim.subclass_8bit import OptimState8bit, get_qmap_signed  # noqa: E402
from torchao.optim.subclass_fp8 import OptimStateFp8  # noqa: E402

LR, TOTAL, WARMUP = 1e-3, 20, 2
# torchao 0.18's layouts for a 64x128 fp32 weight (8192 elements).
LAYOUT = {
    "ao_adamw8bit": {
        "class": OptimState8bit,
        "name": "torchao.optim.subclass_8bit.OptimState8bit",
        "codes": (64, 128),
        "scale": (8192 // 256,),
        "qmap": (256,),
    },
    "ao_adamw4bit": {
        "class": OptimState4bit,
        "name": "torchao.optim.subclass_4bit.OptimState4bit",
        "codes": (8192 // 2,),
        "scale": (8192 // 128,),
        "qmap": (16,),
    },
}


class Run:
    def __init__(self, optim: str, seed: int) -> None:
        torch.manual_seed(seed)
        self.model = torch.nn.Linear(128, 64)
        self.names = [n for n, _ in self.model.named_parameters()]
        self.optimizer = build_optimizer(self.model.named_parameters(), optim, LR, 0.1)
        self.scheduler = build_scheduler(self.optimizer, TOTAL, WARMUP, "cosine")

    def step(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        for p in self.model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        self.optimizer.step()
        self.scheduler.step()

    def save(self, ckdir: Path, step: int) -> Path:
        state = TrainerState(step, step, 0, 0, 0.0, capture_rng(), {}, {})
        return save_checkpoint(
            ckdir, self.model, self.names, self.optimizer, self.scheduler, state, 5
        )

    def load(self, path: Path) -> TrainerState:
        return load_checkpoint(path, self.model, self.names, self.optimizer, self.scheduler)


def snapshot(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Copies of every state tensor: a subclass as (class, {inner name: tensor}, context) read
    through torchao's own ``tensor_attrs`` and ``__tensor_flatten__``."""
    out = []
    for p in (p for g in optimizer.param_groups for p in g["params"]):
        entry = {}
        for key, value in optimizer.state[p].items():
            if type(value) is torch.Tensor:
                entry[key] = value.clone()
            else:
                inner = {a: getattr(value, a).clone() for a in type(value).tensor_attrs}
                entry[key] = (type(value), inner, value.__tensor_flatten__()[1])
        out.append(entry)
    return out


@pytest.fixture(scope="module", params=list(LAYOUT))
def ao(request, tmp_path_factory) -> dict[str, Any]:
    """Two steps, a checkpoint, a resume into other weights, then one more step in both."""
    optim = request.param
    original = Run(optim, seed=0)
    original.step(1)
    original.step(2)
    path = original.save(tmp_path_factory.mktemp(optim) / "checkpoints", step=2)
    saved = snapshot(original.optimizer)
    saved_lrs = [g["lr"].clone() for g in original.optimizer.param_groups]

    resumed = Run(optim, seed=1)  # other weights: everything must come from the files
    resumed.load(path)
    loaded = snapshot(resumed.optimizer)
    loaded_lrs = [g["lr"] for g in resumed.optimizer.param_groups]
    loaded_initial = [g["initial_lr"] for g in resumed.optimizer.param_groups]
    loaded_lr_values = [lr.clone() for lr in loaded_lrs]

    original.step(3)
    resumed.step(3)
    return {
        "optim": optim,
        "path": path,
        "original": original,
        "resumed": resumed,
        "saved": saved,
        "loaded": loaded,
        "saved_lrs": saved_lrs,
        "loaded_lrs": loaded_lrs,
        "loaded_lr_values": loaded_lr_values,
        "loaded_initial": loaded_initial,
    }


def test_ao_state_round_trips_bit_for_bit(ao):
    saved, loaded, layout = ao["saved"], ao["loaded"], LAYOUT[ao["optim"]]
    assert [sorted(s) for s in saved] == [["exp_avg", "exp_avg_sq", "step"]] * 2
    assert [sorted(s) for s in loaded] == [sorted(s) for s in saved]
    # the weight's moments are quantized, the bias's are plain fp32: both paths are covered
    assert saved[0]["exp_avg"][0] is layout["class"]
    assert type(saved[1]["exp_avg"]) is torch.Tensor and saved[1]["exp_avg"].dtype == torch.float32
    for i, (before, after) in enumerate(zip(saved, loaded, strict=True)):
        for key, value in before.items():
            if isinstance(value, torch.Tensor):
                assert type(after[key]) is torch.Tensor, (i, key)
                assert after[key].dtype == value.dtype and torch.equal(after[key], value), (i, key)
                continue
            cls, inner, ctx = value
            assert after[key][0] is cls, (i, key)
            assert sorted(after[key][1]) == ["codes", "qmap", "scale"]
            for name, tensor in inner.items():
                got = after[key][1][name]
                assert got.dtype == tensor.dtype and torch.equal(got, tensor), (i, key, name)
                assert tuple(got.shape) == layout[name], (i, key, name)
            assert after[key][2] == ctx, (i, key)
            assert [type(c) for c in after[key][2]] == [type(c) for c in ctx], (i, key)
    assert saved[0]["step"].item() == 2.0 and saved[0]["step"].dtype == torch.float32
    # the codes changed from their zeros: the test compares real state
    assert saved[0]["exp_avg"][1]["codes"].any() and saved[0]["exp_avg_sq"][1]["scale"].any()


def test_resumed_ao_step_is_bit_identical(ao):
    original, resumed = ao["original"], ao["resumed"]
    for name, value in original.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    for before, after in zip(
        snapshot(original.optimizer), snapshot(resumed.optimizer), strict=True
    ):
        for key, value in before.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, after[key]), key
            else:
                for name, tensor in value[1].items():
                    assert torch.equal(tensor, after[key][1][name]), (key, name)
    assert resumed.scheduler.state_dict() == original.scheduler.state_dict()


def test_lr_comes_back_as_a_tensor_the_scheduler_fills(ao):
    # torchao refuses a float lr; LambdaLR fills the loaded tensors in place
    assert all(type(lr) is torch.Tensor and lr.dtype == torch.float32 for lr in ao["loaded_lrs"])
    assert all(type(lr) is torch.Tensor for lr in ao["loaded_initial"])
    assert [lr.item() for lr in ao["loaded_lr_values"]] == [lr.item() for lr in ao["saved_lrs"]]
    groups = ao["resumed"].optimizer.param_groups
    assert all(g["lr"] is lr for g, lr in zip(groups, ao["loaded_lrs"], strict=True))
    # after 3 steps: 1 step into the cosine decay from LR to 0.1 * LR over TOTAL - 1 - WARMUP steps
    expected = LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 1 / (TOTAL - 1 - WARMUP))))
    for g, before in zip(groups, ao["loaded_lr_values"], strict=True):
        assert g["lr"].item() == pytest.approx(expected, rel=1e-6)
        assert g["lr"].item() != before.item()
    original = ao["original"].optimizer.param_groups
    assert [g["lr"].item() for g in groups] == [g["lr"].item() for g in original]


def test_files_hold_the_subclass_entry_and_no_pickle(ao):
    path, optim, layout = ao["path"], ao["optim"], LAYOUT[ao["optim"]]
    assert sorted(p.name for p in path.iterdir()) == [
        "band.safetensors",
        "optimizer.json",
        "optimizer.safetensors",
        "scheduler.json",
        "scheduler.safetensors",  # LambdaLR's base_lrs and _last_lr are tensors under torchao
        "trainer_state.json",
    ]
    for file in path.iterdir():  # every file is JSON or safetensors: nothing to unpickle
        if file.suffix == ".json":
            json.loads(file.read_text())
        else:
            load_file(str(file))
    opt = json.loads((path / "optimizer.json").read_text())
    states = dict(opt["state_dict"]["state"]["__fastmid_dict__"])
    dtype = {"__fastmid_dtype__": "float32"}
    shape = [{"__fastmid_size__": [64, 128]}] if optim == "ao_adamw4bit" else []
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        assert states[0][key] == {
            "__fastmid_subclass__": layout["name"],
            "inner": {
                name: {"__fastmid_tensor__": f"state.0.{key}.{name}"}
                for name in ("codes", "scale", "qmap")
            },
            "ctx": [signed, *shape, dtype],
            "shape": [64, 128],
            "stride": [128, 1],
        }
        assert states[1][key] == {"__fastmid_tensor__": f"state.1.{key}"}
    assert states[0]["step"] == {"__fastmid_tensor__": "state.0.step"}
    group = opt["state_dict"]["param_groups"][0]
    assert group["lr"] == {"__fastmid_tensor__": "param_groups.0.lr"}
    assert group["betas"] == {"__fastmid_tuple__": [0.9, 0.999]}

    tensors = load_file(str(path / "optimizer.safetensors"))
    for key in ("exp_avg", "exp_avg_sq"):
        assert tensors[f"state.0.{key}.codes"].dtype == torch.uint8
        for name in ("codes", "scale", "qmap"):
            assert tuple(tensors[f"state.0.{key}.{name}"].shape) == layout[name], (key, name)
        assert tensors[f"state.1.{key}"].shape == (64,)
    if optim == "ao_adamw8bit":  # the signed code book, as torchao builds it
        expected = torch.tensor(get_qmap_signed(), dtype=torch.float32)
        assert torch.equal(tensors["state.0.exp_avg.qmap"], expected)
    assert tensors["state.0.step"].shape == () and tensors["state.0.step"].item() == 2.0
    assert tensors["param_groups.0.lr"].dtype == torch.float32
    assert tensors["param_groups.0.lr"].item() == ao["saved_lrs"][0].item()


def _copy(ao: dict[str, Any], tmp_path: Path) -> Path:
    path = tmp_path / "checkpoints" / ao["path"].name
    shutil.copytree(ao["path"], path)
    return path


def _edit_entry(path: Path, change) -> None:
    file = path / "optimizer.json"
    data = json.loads(file.read_text())
    change(dict(data["state_dict"]["state"]["__fastmid_dict__"])[0]["exp_avg"])
    file.write_text(json.dumps(data))


@pytest.mark.parametrize("name", ["os.system", "torch.Tensor", "fastmid_probe_module.Evil"])
def test_unknown_subclass_name_is_refused_and_nothing_is_imported(ao, tmp_path, monkeypatch, name):
    # a module on the path that leaves a marker if it is ever imported
    marker = tmp_path / "IMPORTED"
    (tmp_path / "fastmid_probe_module.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\nclass Evil: pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    path = _copy(ao, tmp_path)
    _edit_entry(path, lambda e: e.update(__fastmid_subclass__=name))
    imported: list[str] = []
    real_import = importlib.import_module
    monkeypatch.setattr(
        importlib, "import_module", lambda n, *a: imported.append(n) or real_import(n, *a)
    )
    expected = rf"{path / 'optimizer.json'}: 'state\.0\.exp_avg' is a tensor subclass '{name}'"
    fresh = Run(ao["optim"], seed=2)
    with pytest.raises(CheckpointError, match=expected) as info:
        verify_checkpoint(path)
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match=expected):
        fresh.load(path)
    # the loader refuses it too, even past the checks
    monkeypatch.setattr(checkpoint, "verify_checkpoint", lambda p: None)
    with pytest.raises(CheckpointError, match=expected):
        fresh.load(path)
    assert imported == []
    assert not marker.exists() and "fastmid_probe_module" not in sys.modules


def _drop_tensor(file: Path, key: str) -> None:
    tensors = load_file(str(file))
    del tensors[key]
    save_file(tensors, str(file), metadata={"fastmid_checkpoint_format": "2"})


DAMAGE = {
    "missing inner tensor": (
        lambda p: _drop_tensor(p / "optimizer.safetensors", "state.0.exp_avg_sq.scale"),
        r"'state\.0\.exp_avg_sq\.scale' refers to tensor 'state\.0\.exp_avg_sq\.scale', which is "
        r"not stored",
    ),
    "inner reference renamed": (
        lambda p: _edit_entry(p, lambda e: e["inner"].update(codes={"__fastmid_tensor__": "x"})),
        r"'state\.0\.exp_avg\.codes' refers to tensor 'x', which is not stored",
    ),
    "reference that is not a name": (
        lambda p: _edit_entry(p, lambda e: e["inner"].update(qmap={"__fastmid_tensor__": [1]})),
        r"'state\.0\.exp_avg\.qmap' refers to tensor \[1\], which is not stored",
    ),
    "unknown dtype": (
        lambda p: _edit_entry(p, lambda e: e["ctx"].__setitem__(-1, {"__fastmid_dtype__": "x"})),
        r"'state\.0\.exp_avg\.ctx\.\d' names dtype 'x', which torch lacks",
    ),
    "context that does not rebuild": (
        lambda p: _edit_entry(p, lambda e: e.update(ctx=[])),
        r"'state\.0\.exp_avg' does not rebuild a torchao\.optim\.subclass_\dbit\.OptimState\dbit",
    ),
    "entry without its shape": (
        lambda p: _edit_entry(p, lambda e: e.pop("shape")),
        r"'state\.0\.exp_avg' holds keys",
    ),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_subclass_entry_is_a_damaged_checkpoint(ao, tmp_path, monkeypatch, case):
    damage, reason = DAMAGE[case]
    path = _copy(ao, tmp_path)
    damage(path)
    fresh = Run(ao["optim"], seed=2)
    expected = rf"optimizer\.(json|safetensors): .*{reason}.*; checkpoint {path} is damaged"
    if case not in ("unknown dtype", "context that does not rebuild"):  # found before loading
        with pytest.raises(CheckpointError, match=expected) as info:
            resolve_resume(str(path), tmp_path)
        assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match=expected) as info:
        fresh.load(path)
    assert "\n" not in str(info.value)
    monkeypatch.setattr(checkpoint, "verify_checkpoint", lambda p: None)
    with pytest.raises(CheckpointError, match=expected):  # not a KeyError past the checks
        fresh.load(path)


class Holder:
    """A stand-in optimizer or scheduler whose state dict is given."""

    def __init__(self, state: dict[str, Any] | None = None) -> None:
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = state


def _save_holder(tmp_path: Path, state: dict[str, Any]) -> Path:
    model = torch.nn.Linear(2, 2)
    names = [n for n, _ in model.named_parameters()]
    trainer = TrainerState(1, 1, 0, 0, 0.0, capture_rng(), {}, {})
    return save_checkpoint(tmp_path, model, names, Holder(state), Holder({"x": 1}), trainer, 1)


def _load_holder(path: Path) -> dict[str, Any]:
    model = torch.nn.Linear(2, 2)
    names = [n for n, _ in model.named_parameters()]
    optimizer = Holder()
    load_checkpoint(path, model, names, optimizer, Holder())
    return optimizer.state


def test_shared_qmap_is_stored_once_and_shared_again(tmp_path):
    gen = torch.Generator().manual_seed(5)
    qmap = torch.tensor(get_qmap_signed(), dtype=torch.float32)
    states = [
        OptimState8bit(
            torch.randint(0, 256, (16, 256), dtype=torch.uint8, generator=gen),
            torch.rand(16, generator=gen),
            qmap,
            True,
        )
        for _ in range(2)
    ]
    path = _save_holder(tmp_path, {"state": {0: {"m": states[0]}, 1: {"m": states[1]}}})
    assert sorted(load_file(str(path / "optimizer.safetensors"))) == [
        "state.0.m.codes",
        "state.0.m.qmap",
        "state.0.m.scale",
        "state.1.m.codes",
        "state.1.m.scale",
    ]
    loaded = _load_holder(path)["state"]
    assert loaded[0]["m"].qmap is loaded[1]["m"].qmap
    for i in (0, 1):
        assert type(loaded[i]["m"]) is OptimState8bit and loaded[i]["m"].signed is True
        for name in ("codes", "scale", "qmap"):
            assert torch.equal(getattr(loaded[i]["m"], name), getattr(states[i], name))


def test_fp8_state_round_trips(tmp_path):
    gen = torch.Generator().manual_seed(6)
    codes = (torch.randn(64, 128, generator=gen) * 4).to(torch.float8_e4m3fn)
    state = OptimStateFp8(codes, torch.rand(32, generator=gen))
    path = _save_holder(tmp_path, {"state": {0: {"m": state}}})
    loaded = _load_holder(path)["state"][0]["m"]
    assert type(loaded) is OptimStateFp8 and loaded.shape == (64, 128)
    assert loaded.codes.dtype == torch.float8_e4m3fn
    assert torch.equal(loaded.codes.view(torch.uint8), codes.view(torch.uint8))
    assert torch.equal(loaded.scale, state.scale)


class Wrapper(torch.Tensor):
    """A wrapper subclass (like DTensor) that fastmid has no mapping for."""

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype)

    def __init__(self, inner: torch.Tensor) -> None:
        self.inner = inner

    def __tensor_flatten__(self):
        return ["inner"], None

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(func)


class Lookalike(OptimState8bit):
    """An allowed class's subclass: another class, so refused."""


@pytest.mark.parametrize(
    "make",
    [
        lambda: Wrapper(torch.zeros(3)),
        lambda: Lookalike(torch.zeros(256, dtype=torch.uint8), torch.ones(1), torch.zeros(256), 1),
    ],
    ids=["wrapper", "lookalike"],
)
def test_unsupported_subclass_is_refused_at_save(tmp_path, make):
    value = make()
    name = type(value).__qualname__
    with pytest.raises(
        CheckpointError,
        match=rf"'state\.0\.m' is a tensor subclass \(.*\.{name}\) with no checkpoint mapping",
    ) as info:
        _save_holder(tmp_path, {"state": {0: {"m": value}}})
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []  # nothing partial


def test_checkpoint_module_imports_without_torchao():
    """torchao is imported only when a file holds its states; missing, it is named."""
    code = """
import sys
from pathlib import Path
sys.modules["torchao"] = None  # torchao absent: importing it fails
import fastmid.train.checkpoint as c
assert not [m for m in sys.modules if m.startswith("torchao.")], "torchao imported"
entry = {"__fastmid_subclass__": "torchao.optim.subclass_8bit.OptimState8bit",
         "inner": {"codes": {"__fastmid_tensor__": "a"}}, "ctx": [], "shape": [], "stride": []}
try:
    c._decode({"m": entry}, {}, Path("ck/optimizer.json"))
except c.CheckpointError as exc:
    print(exc)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.startswith(
        "ck/optimizer.json: 'm' is torchao optimizer state (OptimState8bit): the ao_* optimizers "
        "need torchao"
    ), out.stdout + out.stderr
    assert out.stdout.count("\n") == 1
