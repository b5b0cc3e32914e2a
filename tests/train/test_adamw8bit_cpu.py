"""AdamW8bitCPU (fastmid/train/adamw8bit_cpu.py) against bitsandbytes and a float64 reference.

What is asserted, and why these tolerances:

* ``torch`` backend vs bitsandbytes 0.50 ``AdamW8bit`` on CPU: bit-identical parameters, codes,
  scales and steps over 20 steps (it is bitsandbytes' op sequence), float32 and bf16 parameters.
* ``native`` kernel vs the torch backend with the correctly rounded square root: bit-identical
  (every other float32 operation is the same), and so for the AVX2 and plain-C builds. Against
  bitsandbytes itself the states stay bit-identical at every step (the square root only enters
  the parameter update) and the parameters differ by at most 4 float32 ulps of their size after
  20 steps: torch's float32 ``sqrt`` is MKL's ``vsSqrt``, one ulp off on about 0.7 % of inputs,
  which can flip the rounding of ``p + update``.
* The default backend vs a float64 reference of block-wise 8-bit AdamW (Dettmers et al. 2022, with
  bitsandbytes 0.50's CPU quantization rule evaluated in float64), 20 steps. Stepped from the same
  state each step (teacher forcing): the update within 1e-4 of the step's largest update plus one
  ulp of the parameter (float32 arithmetic, ``beta1 m + (1 - beta1) g`` can cancel), the scales
  within 1e-6 relative, and at most 1e-3 of the codes differ, each by one bin (a value within
  float32 rounding of a bin edge; measured 1.4e-4). Run freely for 20 steps, where those code
  flips compound: each 8-bit tensor's total change within 10 % of its largest element at worst and
  1 % in RMS (measured 5.3 % and 0.19 %), float32-state tensors within 1e-3 (measured 1.3e-4).
"""

from __future__ import annotations

import functools
import math
import platform

import pytest
import torch

from fastmid.train import adamw8bit_cpu as A
from fastmid.train.adamw8bit_cpu import AdamW8bitCPU
from fastmid.train.optim import MIN_8BIT_SIZE, param_groups

LR, BETAS, EPS, WD = 1e-3, (0.9, 0.999), 1e-8, 0.1
EPS32 = torch.finfo(torch.float32).eps
# name -> shape: full blocks, a partial last block, float32 states (< 4096 elements), norms
SHAPES = {
    "q.weight": (96, 64),
    "odd.weight": (37, 131),
    "small.weight": (16, 64),
    "norm.weight": (64,),
    "big.weight": (64, 256),
}


def _bnb():
    pytest.importorskip("bitsandbytes")
    from fastmid.models.loading import quiet_bitsandbytes

    quiet_bitsandbytes()
    import bitsandbytes as bnb

    return bnb


def _native_or_skip() -> None:
    try:
        A.native_kernel()
    except A.NativeKernelError as exc:
        pytest.skip(f"no native kernel here: {exc}")


def _named(seed: int = 0, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [
        (n, torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype))) for n, s in SHAPES.items()
    ]


def _grads(named, steps: int, seed: int = 1):
    """Gradients of mixed magnitudes (1e-4 .. 1); at step 4 the first block of every 8-bit tensor
    is zero."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for step in range(steps):
        gs = []
        for _n, p in named:
            scale = 10 ** torch.empty(p.shape).uniform_(-4, 0, generator=gen)
            g = torch.randn(p.shape, generator=gen) * scale
            if step == 3 and p.numel() >= MIN_8BIT_SIZE:
                g.view(-1)[: A.BLOCK_SIZE] = 0.0
            gs.append(g.to(p.dtype))
        out.append(gs)
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def _run(opt, named, grads) -> None:
    for gs in grads:
        for (_n, p), g in zip(named, gs, strict=True):
            p.grad = g.clone()
        opt.step()


def _assert_identical(opt_a, named_a, opt_b, named_b, params: bool = True) -> None:
    for (name, pa), (_, pb) in zip(named_a, named_b, strict=True):
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert set(sa) == set(sb), name
        for key in sa:
            if isinstance(sa[key], torch.Tensor):
                assert torch.equal(_bits(sa[key]), _bits(sb[key])), f"{name} {key}"
            else:
                assert sa[key] == sb[key], f"{name} {key}"
        if params:
            assert torch.equal(_bits(pa.data), _bits(pb.data)), name


def test_code_books_and_quantization_are_bitsandbytes():
    bnb = _bnb()
    F = bnb.functional
    for signed in (True, False):
        code = A.dynamic_map(signed)
        assert torch.equal(code, F.create_dynamic_map(signed=signed))
        gen = torch.Generator().manual_seed(int(signed))
        x = torch.randn(10 * A.BLOCK_SIZE + 77, generator=gen) * torch.rand(1, generator=gen)
        x = x.abs() if not signed else x
        x[A.BLOCK_SIZE : 2 * A.BLOCK_SIZE] = 0.0  # a block of zeros: absmax 0, codes 0
        # values on both sides of every bin edge, where a rounding difference would show
        k = torch.arange(1, A.LUT_SIZE, 97, dtype=torch.float64)
        edges = (2 * (k - 0.5) / (A.LUT_SIZE - 1) - 1).float()
        near = torch.cat([edges, torch.nextafter(edges, torch.tensor(2.0)), torch.tensor([1.0])])
        x = torch.cat([x, near if signed else near.abs()])
        ours, absmax = A.quantize_blockwise(x, code)
        theirs, state = F.quantize_blockwise(x, code=code, blocksize=A.BLOCK_SIZE)
        assert torch.equal(ours, theirs.reshape(x.shape))
        assert torch.equal(absmax, state.absmax)
        assert torch.equal(
            A.dequantize_blockwise(ours, absmax, code),
            F.dequantize_blockwise(theirs, absmax=absmax, code=code, blocksize=A.BLOCK_SIZE),
        )


def test_torch_backend_is_bitsandbytes_bit_for_bit():
    bnb = _bnb()
    named_a, named_b = _named(), _named()
    grads = _grads(named_a, 20)
    theirs = bnb.optim.AdamW8bit(
        param_groups(named_a, WD), lr=LR, betas=BETAS, eps=EPS, min_8bit_size=MIN_8BIT_SIZE
    )
    ours = AdamW8bitCPU(param_groups(named_b, WD), lr=LR, betas=BETAS, eps=EPS, backend="torch")
    _run(theirs, named_a, grads)
    _run(ours, named_b, grads)
    _assert_identical(theirs, named_a, ours, named_b)
    assert ours.state[named_b[0][1]]["step"] == 20


def test_bf16_parameters_match_bitsandbytes():
    bnb = _bnb()
    named_a, named_b = _named(dtype=torch.bfloat16), _named(dtype=torch.bfloat16)
    grads = _grads(named_a, 5)
    theirs = bnb.optim.AdamW8bit(param_groups(named_a, WD), lr=LR, min_8bit_size=MIN_8BIT_SIZE)
    ours = AdamW8bitCPU(param_groups(named_b, WD), lr=LR)  # auto: bf16 takes the torch path
    _run(theirs, named_a, grads)
    _run(ours, named_b, grads)
    _assert_identical(theirs, named_a, ours, named_b)


def test_native_kernel_is_the_exact_sqrt_reference_bit_for_bit(monkeypatch):
    _native_or_skip()
    named_a, named_b = _named(), _named()
    grads = _grads(named_a, 20)
    native = AdamW8bitCPU(param_groups(named_a, WD), lr=LR, backend="native")
    _run(native, named_a, grads)
    exact = functools.partial(A._step_8bit_torch, exact_sqrt=True)
    monkeypatch.setattr(A, "_step_8bit_torch", exact)
    reference = AdamW8bitCPU(param_groups(named_b, WD), lr=LR, backend="torch")
    _run(reference, named_b, grads)
    _assert_identical(native, named_a, reference, named_b)


@pytest.mark.parametrize(
    "arch", [("-march=native", "-mno-avx512f"), ("-march=native", "-mno-avx2", "-mno-avx512f")]
)
def test_every_vector_path_passes_the_self_check(arch, tmp_path, monkeypatch):
    """The AVX2 and plain-C paths, where this machine can also run the AVX-512 one."""
    _native_or_skip()
    if platform.machine().lower() not in ("x86_64", "amd64") or A.native_kernel().isa == "c":
        pytest.skip("not an x86 machine whose compiler builds the vector paths")
    monkeypatch.setattr(A, "_ARCH_FLAGS", (arch,))
    native = A._Native(A._build(A._compiler(), tmp_path))
    assert native.isa == ("avx2" if "-mno-avx2" not in arch else "c")
    assert A._self_check(native) is None


def test_native_kernel_vs_bitsandbytes():
    """States bit-identical at every step; parameters within a few ulps (the square root)."""
    bnb = _bnb()
    _native_or_skip()
    named_a, named_b = _named(), _named()
    theirs = bnb.optim.AdamW8bit(param_groups(named_a, WD), lr=LR, min_8bit_size=MIN_8BIT_SIZE)
    ours = AdamW8bitCPU(param_groups(named_b, WD), lr=LR, backend="native")
    for gs in _grads(named_a, 20):
        for (_n, pa), (_, pb), g in zip(named_a, named_b, gs, strict=True):
            pa.grad, pb.grad = g.clone(), g.clone()
        theirs.step()
        ours.step()
        _assert_identical(theirs, named_a, ours, named_b, params=False)
    # a last-bit difference in the update can round the parameter one ulp the other way; the
    # parameters move by about lr per step, so |p| over the run stays under max(|p0|, |p|) + 20 lr
    eps = torch.finfo(torch.float32).eps
    for (name, pa), (_, pb), (_, p0) in zip(named_a, named_b, _named(), strict=True):
        size = torch.maximum(p0.detach().abs(), pa.detach().abs()) + 20 * LR
        assert ((pa.detach() - pb.detach()).abs() <= 4 * eps * size).all(), name


# ---- float64 reference ---------------------------------------------------------------------


_LUT64: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}


def _lut64(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The code nearest each bin centre, in float64 (the definition bitsandbytes' table follows),
    and each code's rank among the codes the table can give (-1: never given)."""
    key = code.numpy().tobytes()
    if key not in _LUT64:
        c = code.double()
        centres = -1 + 2 * torch.arange(A.LUT_SIZE, dtype=torch.float64) / (A.LUT_SIZE - 1)
        lut = torch.searchsorted((c[:-1] + c[1:]) / 2, centres, side="left")
        rank = torch.full((256,), -1, dtype=torch.long)
        reachable = torch.unique(lut)
        rank[reachable] = torch.arange(reachable.numel())
        _LUT64[key] = lut, rank
    return _LUT64[key]


def _blocks(x: torch.Tensor) -> torch.Tensor:
    n = x.numel()
    return torch.nn.functional.pad(x.reshape(-1), (0, -n % A.BLOCK_SIZE)).view(-1, A.BLOCK_SIZE)


def _quantize64(x: torch.Tensor, code: torch.Tensor):
    b = _blocks(x)
    absmax = b.abs().amax(1)
    scaled = (b / absmax.clamp_min(1e-300)[:, None]).clamp(-1, 1)
    k = torch.floor((scaled + 1) / 2 * (A.LUT_SIZE - 1) + 0.5).long()
    codes = _lut64(code)[0][k]
    codes[absmax == 0] = 0
    return codes.reshape(-1)[: x.numel()].reshape(x.shape).to(torch.uint8), absmax


def _dequantize64(codes, absmax, code):
    b = _blocks(code.double()[codes.long()])
    return (b * absmax.double()[:, None]).reshape(-1)[: codes.numel()].reshape(codes.shape)


def _reference_step(p, g, st, codebooks, wd, t):
    """Block-wise 8-bit AdamW in float64: dequantize, update, requantize (Dettmers et al. 2022;
    bitsandbytes' bias correction). ``st`` None: the first step (m = v = 0). ``codebooks``:
    ``(qmap1, qmap2)``, or None for a tensor with float states. Returns ``(p, state)``."""
    b1, b2 = BETAS
    p, g = p.double(), g.double()
    if st is None:
        m = v = torch.zeros_like(p)
    elif codebooks is not None:
        m = _dequantize64(st["state1"], st["absmax1"], codebooks[0])
        v = _dequantize64(st["state2"], st["absmax2"], codebooks[1])
    else:
        m, v = st["state1"].double(), st["state2"].double()
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    p = p * (1 - LR * wd) - LR / (1 - b1**t) * m / (v.sqrt() / math.sqrt(1 - b2**t) + EPS)
    if codebooks is None:
        return p, {"state1": m, "state2": v}
    (c1, a1), (c2, a2) = _quantize64(m, codebooks[0]), _quantize64(v, codebooks[1])
    return p, {"state1": c1, "absmax1": a1, "state2": c2, "absmax2": a2}


def _snapshot(state: dict) -> dict | None:
    return {k: v.clone() for k, v in state.items() if isinstance(v, torch.Tensor)} or None


def test_twenty_steps_against_a_float64_reference():
    """The default backend (the kernel where it builds; the torch backend gives the same codes and
    scales, and parameters within the square root's last bit)."""
    named = _named()
    wds = {n: (WD if p.ndim >= 2 else 0.0) for n, p in named}
    opt = AdamW8bitCPU(param_groups(named, WD), lr=LR)
    start = {n: p.detach().double().clone() for n, p in named}
    free: dict[str, tuple] = {n: (start[n], None) for n in start}
    flipped = total = 0
    for t, gs in enumerate(_grads(named, 20), start=1):
        before = {n: (p.detach().clone(), _snapshot(opt.state[p])) for n, p in named}
        for (_n, p), g in zip(named, gs, strict=True):
            p.grad = g.clone()
        opt.step()
        for (name, p), g in zip(named, gs, strict=True):
            st = opt.state[p]
            books = (st["qmap1"], st["qmap2"]) if st["state1"].dtype == torch.uint8 else None
            # teacher forcing: the reference steps from the state this step started from
            q0, st0 = before[name]
            ref_p, ref_st = _reference_step(q0, g, st0, books, wds[name], t)
            update, ref_update = p.detach().double() - q0.double(), ref_p - q0.double()
            # float32 arithmetic: 1e-4 of the largest update (m = beta1 m + (1 - beta1) g can
            # cancel), plus the two roundings of the parameter (decay, update): one ulp
            tol = 1e-4 * ref_update.abs().max() + EPS32 * ref_p.abs()
            assert ((update - ref_update).abs() <= tol).all(), (name, t)
            if books is not None:
                for w in ("1", "2"):
                    torch.testing.assert_close(
                        st[f"absmax{w}"].double(), ref_st[f"absmax{w}"], rtol=1e-6, atol=0
                    )
                    # rank among the codes the table can give: neighbouring bins, at most 1 apart
                    rank = _lut64(books[int(w) - 1])[1]
                    diff = rank[st[f"state{w}"].long()] - rank[ref_st[f"state{w}"].long()]
                    assert diff.abs().max() <= 1, (name, t, w)
                    flipped += int((diff != 0).sum())
                    total += diff.numel()
            # free running: the reference on its own parameters and states from the start
            free[name] = _reference_step(*free[name][:1], g, free[name][1], books, wds[name], t)
    assert flipped <= 1e-3 * total, f"{flipped} of {total} codes differ"
    for name, p in named:
        change, ref_change = p.detach().double() - start[name], free[name][0] - start[name]
        err = (change - ref_change).abs()
        worst = float(err.max() / ref_change.abs().max())
        rms = float(err.square().mean().sqrt() / ref_change.square().mean().sqrt())
        if opt.state[p]["state1"].dtype == torch.uint8:  # measured: max 5.3e-2, rms 1.9e-3
            assert worst <= 0.1 and rms <= 1e-2, (name, worst, rms)
        else:  # float32 states: float32 rounding alone (measured: max 1.3e-4)
            assert worst <= 1e-3, (name, worst)


# ---- state layout and round trips -----------------------------------------------------------


def test_state_dict_layout_is_bitsandbytes():
    bnb = _bnb()
    named_a, named_b = _named(), _named()
    grads = _grads(named_a, 2)
    theirs = bnb.optim.AdamW8bit(param_groups(named_a, WD), lr=LR, min_8bit_size=MIN_8BIT_SIZE)
    ours = AdamW8bitCPU(param_groups(named_b, WD), lr=LR)
    _run(theirs, named_a, grads)
    _run(ours, named_b, grads)
    sa, sb = theirs.state_dict(), ours.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for index, entry in sa["state"].items():
        assert entry.keys() == sb["state"][index].keys()
        nested = entry.get(A.QUANT_STATE_KEY, {})
        assert nested.keys() == sb["state"][index].get(A.QUANT_STATE_KEY, {}).keys()
        for key, value in nested.items():
            other = sb["state"][index][A.QUANT_STATE_KEY][key]
            assert (value.dtype, value.shape) == (other.dtype, other.shape), (index, key)
    # one code book of each kind, shared by every tensor, as in bitsandbytes
    qmaps = {
        id(e[A.QUANT_STATE_KEY]["qmap1"])
        for e in sb["state"].values()
        if "qmap1" in e.get(A.QUANT_STATE_KEY, {})
    }
    assert len(qmaps) == 1


@pytest.mark.parametrize("direction", ["bnb_to_ours", "ours_to_bnb"])
def test_states_load_across_and_continue_identically(direction):
    """Three steps in one optimizer, its state_dict into the other, three more steps: the same
    parameters and states as the first optimizer continuing (torch backend: bit-identical)."""
    bnb = _bnb()
    make_bnb = lambda named: bnb.optim.AdamW8bit(  # noqa: E731
        param_groups(named, WD), lr=LR, min_8bit_size=MIN_8BIT_SIZE
    )
    make_ours = lambda named: AdamW8bitCPU(param_groups(named, WD), lr=LR, backend="torch")  # noqa: E731
    first, second = (make_bnb, make_ours) if direction == "bnb_to_ours" else (make_ours, make_bnb)
    grads = _grads(_named(), 6)
    named_a = _named()
    a = first(named_a)
    _run(a, named_a, grads[:3])
    named_b = [(n, torch.nn.Parameter(p.detach().clone())) for n, p in named_a]
    b = second(named_b)
    b.load_state_dict(a.state_dict())
    _run(a, named_a, grads[3:])
    _run(b, named_b, grads[3:])
    _assert_identical(a, named_a, b, named_b)


def test_fastmid_checkpoint_round_trip(tmp_path):
    """Through fastmid's safetensors + JSON optimizer format (the shared code books included)."""
    from fastmid.train.checkpoint import load_state_json, save_state_json

    named = _named()
    opt = AdamW8bitCPU(param_groups(named, WD), lr=LR)
    _run(opt, named, _grads(named, 2))
    save_state_json(opt, tmp_path, "optimizer")
    named_b = [(n, torch.nn.Parameter(p.detach().clone())) for n, p in named]
    other = AdamW8bitCPU(param_groups(named_b, WD), lr=LR)
    other.load_state_dict(load_state_json(tmp_path, "optimizer", other))
    _assert_identical(opt, named, other, named_b)
    qmaps = {id(other.state[p]["qmap1"]) for _n, p in named_b if "qmap1" in other.state[p]}
    assert len(qmaps) == 1


def test_load_refuses_a_state_that_does_not_fit():
    named = _named()
    opt = AdamW8bitCPU(param_groups(named, WD), lr=LR)
    _run(opt, named, _grads(named, 1))
    state = opt.state_dict()
    state["state"][0][A.QUANT_STATE_KEY]["absmax1"] = torch.zeros(3)
    with pytest.raises(ValueError, match="absmax1"):
        AdamW8bitCPU(param_groups(_named(), WD), lr=LR).load_state_dict(state)


def test_weight_decay_per_group():
    """With zero gradients the update is 0: matrices shrink by exactly (1 - lr * wd), norms (the
    undecayed group of fastmid's param_groups) stay."""
    named = _named()
    before = {n: p.detach().clone() for n, p in named}
    opt = AdamW8bitCPU(param_groups(named, WD), lr=LR)
    for _n, p in named:
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, p in named:
        factor = 1 - LR * WD if p.ndim >= 2 else 1.0
        assert torch.equal(p.detach(), before[name] * torch.tensor(factor, dtype=torch.float32))


def test_refuses_non_cpu_and_bad_arguments():
    with pytest.raises(ValueError, match="backend"):
        AdamW8bitCPU([torch.nn.Parameter(torch.zeros(3))], backend="gpu")
    with pytest.raises(ValueError, match="beta"):
        AdamW8bitCPU([torch.nn.Parameter(torch.zeros(3))], betas=(0.9, 1.0))
    p = torch.nn.Parameter(torch.zeros(3, device="meta"))
    with pytest.raises(ValueError, match="CPU tensors only"):
        AdamW8bitCPU([p])


@pytest.mark.parametrize("direction", ["bnb_to_ours", "ours_to_bnb"])
def test_fastmid_checkpoint_across_classes(direction, tmp_path):
    """A checkpoint written by one class resumes in the other (checkpoint.py treats the two class
    names as one state layout)."""
    from fastmid.train import checkpoint

    if not hasattr(checkpoint, "_SAME_STATE_CLASSES"):
        pytest.skip("checkpoint.py does not list interchangeable optimizer classes yet")
    bnb = _bnb()
    make = {
        "bnb": lambda named: bnb.optim.AdamW8bit(
            param_groups(named, WD), lr=LR, min_8bit_size=MIN_8BIT_SIZE
        ),
        "ours": lambda named: AdamW8bitCPU(param_groups(named, WD), lr=LR, backend="torch"),
    }
    first, second = direction.split("_to_")
    grads = _grads(_named(), 4)
    named_a = _named()
    a = make[first](named_a)
    _run(a, named_a, grads[:2])
    checkpoint.save_state_json(a, tmp_path, "optimizer")
    named_b = [(n, torch.nn.Parameter(p.detach().clone())) for n, p in named_a]
    b = make[second](named_b)
    b.load_state_dict(checkpoint.load_state_json(tmp_path, "optimizer", b))
    _run(a, named_a, grads[2:])
    _run(b, named_b, grads[2:])
    _assert_identical(a, named_a, b, named_b)
