"""``fastmid plan`` against real training steps on CPU (issue 15, "Measured, on CPU, in CI").

Each case runs :func:`fastmid.train.recipe.train_step` on a model set up as ``Recipe.setup`` does
(weights in the precision's dtype, ``apply_band``, ``cast_trainable``, ``install_execution_policy``,
``build_optimizer`` or ``OptimizerInBackward``) and checks each line of :func:`estimate_mid_block`
for the same setup to within 5% of what the step held. Every expected figure is measured with
torch's own accounting (``untyped_storage().nbytes()`` of distinct storages), never computed by
the code under test:

* weights: the parameters' storages (frozen and trained; a tied weight once), plus under
  ``bf16-master`` the bf16 copies autocast makes of trained weights (``aten._to_copy`` of a
  trained parameter, seen by a ``TorchDispatchMode``) alive at once while backward runs: without
  checkpointing they are saved for the band's matmuls until their layer's backward; with it only
  the recomputed layer's exist then. The plan adds 2 bytes per trained element for them.
* gradients: the ``.grad`` storages after an ordinary step; under ``--optimizer-in-backward`` the
  peak of live ``.grad`` storages ``OptimizerInBackward`` samples in its hooks.
* optimizer states: the distinct storages in every optimizer's ``state`` after the step
  (bitsandbytes' ``state1``/``state2``/``absmax``/``qmap``, torchao's inner tensors through
  ``__tensor_flatten__``, the ``step`` counters; a shared storage once). torchao compiles its
  update kernel ``single_param_adam`` per shape (seconds each; run eagerly, over ten seconds a
  step here): it is replaced by a no-op and ``torch.compile`` runs eagerly. The states are allocated by
  torchao's own ``step()`` before that kernel, which only writes them in place.
* activations: the distinct storages autograd saves (``saved_tensors_hooks``) from the backbone's
  input to the final norm's output, parameters and autocast weight copies left out. Under
  checkpointing: what the backbone's forward left alive (storages created by aten ops, tracked by
  the ``TorchDispatchMode``) when backward reaches the decoder (the checkpointed layer inputs and
  the final norm's tensors), plus the largest layer's saved tensors of the same step without
  checkpointing (backward recomputes one layer at a time).
* logits: the peak of live storages created by aten ops from the final norm's output through the
  loss's forward and backward, until the gradient reaches the rows fed to ``lm_head`` (the
  ``IndexBackward0`` of ``hidden[keep]``). Half of each sequence is supervised; the plan gets that
  share as ``supervised_fraction`` (its legacy per-token figure is not what fastmid holds).

Models: a random Llama (hidden 1024, intermediate 2816, 4 layers, 8 query and 4 key/value heads,
vocabulary 32000; band 1-2: a no-grad prefix, a first band layer with a frozen input, a band layer
and a frozen suffix) over every precision, optimizer and in-backward mode, and
SmolLM2-135M-Instruct (band 14-15 of 30, tied embeddings) on a subset. Full sequences of 64 tokens,
micro-batch 2, SDPA, no padding. One thread: two OpenMP threads on two shared cores spin against
other jobs and run ten times slower.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from fastmid.kernels import use_backend
from fastmid.kernels.linear_cross_entropy import default_chunk_size
from tiny import tiny_model
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fastmid.models.band import BandPlan, apply_band, install_execution_policy
from fastmid.models.memory import (
    MemoryEstimate,
    MemoryPlanError,
    TrainingSetup,
    build_meta_model,
    estimate_mid_block,
)
from fastmid.models.precision import PrecisionPolicy
from fastmid.train import recipe
from fastmid.train.optim import OptimizerInBackward, build_optimizer, build_scheduler

TOLERANCE = 0.05
WIDE = dict(
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    vocab_size=32000,
    attn_implementation="sdpa",
)
WIDE_BAND = (1, 2)
SMOL_BAND = (14, 15)
SEQ, BATCH = 64, 2
LINES = ("weights", "gradients", "optimizer_states", "activations", "logits")
MICRO_BATCH_LOSS = recipe.micro_batch_loss  # the real one (the tests wrap it)
VIEW_NODES = {
    "TBackward0",
    "TransposeBackward0",
    "ViewBackward0",
    "UnsafeViewBackward0",
    "ExpandBackward0",
    "PermuteBackward0",
}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- measuring ---------------------------------------------------------------------------------


def _is_autocast_copy(t: torch.Tensor) -> bool:
    """``t`` is (a view of) a ``to(dtype)`` copy of a parameter, as autocast makes them."""
    fn = t.grad_fn
    while fn is not None and type(fn).__name__ in VIEW_NODES:
        fn = fn.next_functions[0][0]
    if fn is None or type(fn).__name__ != "ToCopyBackward0":
        return False
    return hasattr(fn.next_functions[0][0], "variable")  # AccumulateGrad of a leaf


def _collect_interpreter_cycles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the cyclic GC after every Triton kernel launch in the interpreter.

    ``triton.runtime.interpreter.GridExecutor`` keeps each launch's argument storages in
    reference cycles (its ``_to_cpu``/``_from_cpu`` closures), so under ``TRITON_INTERPRET=1`` a
    logits chunk lived on until the cyclic GC happened to run: the measured peak depended on GC
    timing (a flaky suite failure; with ``gc.disable()`` the fp32 peak was 8.7 MB, not 1.0 MB).
    On a GPU there is no interpreter and no such cycle; collecting after each launch measures
    what the kernel itself keeps alive.
    """
    import gc

    from triton.runtime import interpreter

    call = interpreter.GridExecutor.__call__

    def collected(self, *args, **kwargs):
        try:
            return call(self, *args, **kwargs)
        finally:
            gc.collect()

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", collected)


class LiveStorages(TorchDispatchMode):
    """Bytes of the storages aten ops create, per tag, alive now (:attr:`live`) and at most
    (:attr:`peak`). Ops are tagged with :attr:`tag` (None: not counted), a ``_to_copy`` of a
    trained parameter (:attr:`trained` storages) always with ``copy``. Views and in-place
    results (an input's storage) do not count; a storage leaves when its last tensor dies (a weak
    reference to its Python object, which torch keeps for the storage's lifetime)."""

    def __init__(self, trained: set[int]) -> None:
        super().__init__()
        self.trained = trained
        self.tag: str | None = None
        self.live: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self._keys: set[int] = set()

    def _free(self, tag: str, key: int, nbytes: int) -> None:
        self.live[tag] -= nbytes
        self._keys.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        tag = self.tag
        if (
            func is torch.ops.aten._to_copy.default
            and args[0].untyped_storage().data_ptr() in self.trained
        ):
            tag = "copy"
        if tag is None:
            return out
        inputs = {
            id(t.untyped_storage())
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, nbytes = id(storage), storage.nbytes()
            if key in inputs or key in self._keys or nbytes == 0:
                continue
            self._keys.add(key)
            self.live[tag] = self.live.get(tag, 0) + nbytes
            self.peak[tag] = max(self.peak.get(tag, 0), self.live[tag])
            weakref.finalize(storage, self._free, tag, key, nbytes)
        return out


class StepMeter:
    """Hooks on one model that measure one training step (module docstring)."""

    def __init__(self, model: torch.nn.Module) -> None:
        params = list(model.parameters())
        self.params = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in params}
        trained = {p.untyped_storage().data_ptr() for p in params if p.requires_grad}
        self.live = LiveStorages(trained)
        self.saved: dict[int, tuple[str, int]] = {}  # storage -> (region, bytes)
        self.region: str | None = None
        self.kept = 0  # decoder bytes alive when backward reaches the decoder
        self.hidden_fn: Any = None  # the final norm output's grad_fn (the tensor stays free)
        backbone, norm = model.model, model.model.norm
        self._handles = [
            backbone.register_forward_pre_hook(self._enter("decoder")),
            norm.register_forward_pre_hook(self._enter("head")),
            norm.register_forward_hook(self._leave_decoder),
        ]
        for i, layer in enumerate(backbone.layers):
            self._handles.append(layer.register_forward_pre_hook(self._enter(f"layer{i}")))

    def _enter(self, region: str) -> Any:
        def hook(module: torch.nn.Module, args: Any) -> None:
            self.region = region
            if region == "decoder":
                self.live.tag = "decoder"

        return hook

    def _leave_decoder(self, module: torch.nn.Module, args: Any, out: torch.Tensor) -> None:
        self.region = self.live.tag = "loss"
        self.hidden_fn = out.grad_fn

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if self.region is not None and nbytes and key not in self.params:
            if not _is_autocast_copy(t):
                self.saved.setdefault(key, (self.region, nbytes))
        return t

    def loss_built(self, loss: torch.Tensor) -> None:
        """Stop measuring the loss at the node that hands its gradient back to the final norm's
        output (``hidden[keep]``'s ``IndexBackward0``)."""
        todo, seen = [loss.grad_fn], set()
        while todo:
            node = todo.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            nexts = [n for n, _ in node.next_functions]
            if self.hidden_fn in nexts:
                node.register_prehook(self._loss_done)
                return
            todo += nexts
        raise AssertionError("no path from the loss to the final norm's output")

    def _loss_done(self, grads: Any) -> None:
        self.live.tag = self.region = None
        self.kept = self.live.live.get("decoder", 0)
        # From here on (backward of the decoder): the autocast copies alive at most.
        self.live.peak["copy"] = self.live.live.get("copy", 0)

    def saved_bytes(self, region: str | None = None) -> int:
        """Bytes saved for backward in ``region``, or in every region but the loss."""
        return sum(b for r, b in self.saved.values() if (r == region if region else r != "loss"))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _state_bytes(optimizers: list[torch.optim.Optimizer]) -> int:
    storages: dict[int, int] = {}

    def visit(t: torch.Tensor) -> None:
        if type(t) in (torch.Tensor, torch.nn.Parameter):
            storage = t.untyped_storage()
            if storage.nbytes():
                storages[storage.data_ptr()] = storage.nbytes()
            return
        names, _ = t.__tensor_flatten__()  # torchao's quantized states
        for name in names:
            visit(getattr(t, name))

    for optimizer in optimizers:
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    visit(value)
    return sum(storages.values())


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    """Full sequences, no padding; the first half of each is prompt (labels -100)."""
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, : SEQ // 2] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@dataclasses.dataclass
class Prepared:
    model: torch.nn.Module
    plan: BandPlan
    policy: PrecisionPolicy
    trainable: list[torch.nn.Parameter]

    @contextlib.contextmanager
    def checkpointing(self) -> Iterator[None]:
        """Run under ``--grad-checkpointing``'s execution policy meanwhile."""
        self.model._fastmid_execution_policy.remove()
        install_execution_policy(self.model, self.plan, grad_checkpointing=True)
        try:
            yield
        finally:
            self.model._fastmid_execution_policy.remove()
            install_execution_policy(self.model, self.plan)


def _prepared(base: torch.nn.Module, precision: str, band: tuple[int, ...]) -> Prepared:
    """A copy of ``base`` set up for training as ``Recipe.setup`` does."""
    policy = PrecisionPolicy.from_name(precision)
    model = copy.deepcopy(base).to(policy.weight_dtype)
    plan = BandPlan.from_indices(model.config.num_hidden_layers, list(band))
    trainable = apply_band(model, plan)
    policy.cast_trainable(trainable)
    install_execution_policy(model, plan)
    model.train()
    return Prepared(model, plan, policy, trainable)


@dataclasses.dataclass
class Measured:
    lines: dict[str, int]  # LINES -> bytes
    kept: int  # decoder bytes alive when backward reaches the decoder
    layers: dict[int, int]  # layer -> bytes saved inside it
    setup: TrainingSetup  # the plan's setup of the step
    meta: torch.nn.Module  # the model on the meta device
    plan: BandPlan

    def planned(self, **changes: Any) -> MemoryEstimate:
        """The plan of this step (with ``changes`` to its setup)."""
        return estimate_mid_block(self.meta, self.plan, dataclasses.replace(self.setup, **changes))


@pytest.fixture
def measure_step(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``measure_step(prepared, optim, in_backward, fused=False) -> Measured``: one
    :func:`train_step` on ``prepared``, measured, with the plan's setup of the same step."""

    def run(prepared: Prepared, optim: str, in_backward: bool, fused: bool = False) -> Measured:
        model = prepared.model
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if optim.startswith("ao_"):
            import torchao.optim.adam as ao_adam

            monkeypatch.setattr(ao_adam, "single_param_adam", lambda *args: None)
        if fused:
            _collect_interpreter_cycles(monkeypatch)
        if in_backward:
            optimizer = OptimizerInBackward(named, lambda one: build_optimizer(one, optim, 1e-4))
            optimizers = optimizer.optimizers
        else:
            optimizer = build_optimizer(named, optim, 1e-4)
            optimizers = [optimizer]
        scheduler = build_scheduler(optimizer, 10, 0, "constant")
        meter = StepMeter(model)

        def micro_batch_loss(*args: Any) -> Any:
            loss, n = MICRO_BATCH_LOSS(*args)
            meter.loss_built(loss)
            return loss, n

        monkeypatch.setattr(recipe, "micro_batch_loss", micro_batch_loss)
        batch = _batch(model.config.vocab_size)
        try:
            with (
                torch.compiler.set_stance("force_eager"),
                torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t),
                meter.live,
                use_backend("triton") if fused else contextlib.nullcontext(),
            ):
                recipe.train_step(
                    model,
                    [batch],
                    optimizer,
                    scheduler,
                    prepared.trainable,
                    0.0,
                    fused=fused,
                    precision=prepared.policy,
                )
        finally:
            meter.remove()
            if in_backward:
                optimizer.remove_hooks()
        if in_backward:
            gradients = optimizer.grad_bytes_peak
        else:
            gradients = sum(p.grad.untyped_storage().nbytes() for p in prepared.trainable)
        supervised = int((batch["labels"][:, 1:] != -100).sum())
        lines = {
            "weights": sum(meter.params.values()) + meter.live.peak.get("copy", 0),
            "gradients": gradients,
            "optimizer_states": _state_bytes(optimizers),
            "activations": meter.saved_bytes(),
            "logits": meter.live.peak.get("loss", 0),
        }
        layers = range(model.config.num_hidden_layers)
        setup = TrainingSetup(
            seq_len=SEQ,
            micro_batch=BATCH,
            precision=prepared.policy.name,  # type: ignore[arg-type]
            optim=optim,  # type: ignore[arg-type]
            optimizer_in_backward=in_backward,
            checkpointing=False,
            supervised_fraction=supervised / (SEQ * BATCH),
            fused_loss=fused,
        )
        return Measured(
            lines,
            meter.kept,
            {i: meter.saved_bytes(f"layer{i}") for i in layers},
            setup,
            build_meta_model(model.config),
            prepared.plan,
        )

    return run


def _assert_close(planned: MemoryEstimate, measured: dict[str, int], lines=LINES) -> None:
    errors = {k: getattr(planned, k) / measured[k] - 1 for k in lines}
    far = {k: f"{e:+.2%}" for k, e in errors.items() if abs(e) > TOLERANCE}
    assert not far, (far, {k: (getattr(planned, k), measured[k]) for k in lines})


# ---- the random wide Llama: every precision, optimizer and in-backward mode -------------------


@pytest.fixture(scope="module")
def wide() -> Any:
    """``wide(precision)``: the random wide Llama prepared in ``precision`` (built once each)."""
    base = tiny_model("llama", seed=0, **WIDE)
    cache: dict[str, Prepared] = {}

    def get(precision: str) -> Prepared:
        if precision not in cache:
            cache[precision] = _prepared(base, precision, WIDE_BAND)
        return cache[precision]

    return get


MATRIX = [
    (precision, optim, in_backward)
    for precision, optims in (
        ("fp32", ("adamw", "adamw8bit", "ao_adamw8bit", "ao_adamw4bit")),
        ("bf16-master", ("adamw", "adamw8bit", "ao_adamw8bit", "ao_adamw4bit")),
        ("bf16", ("ao_adamw8bit", "ao_adamw4bit")),
    )
    for optim in optims
    for in_backward in (False, True)
]


@pytest.mark.parametrize(
    ("precision", "optim", "in_backward"),
    MATRIX,
    ids=[f"{p}-{o}-{'in-backward' if b else 'step'}" for p, o, b in MATRIX],
)
def test_every_plan_line_matches_a_measured_step(
    wide, measure_step, precision: str, optim: str, in_backward: bool
) -> None:
    step = measure_step(wide(precision), optim, in_backward)
    _assert_close(step.planned(), step.lines)


@pytest.mark.parametrize("precision", ["fp32", "bf16-master", "bf16"])
def test_checkpointed_activations_match_the_plan(wide, measure_step, precision: str) -> None:
    """Kept layer inputs and final-norm tensors plus one layer recomputed (the largest, as
    measured without checkpointing); the other lines as without checkpointing, weights aside
    (next test)."""
    prepared = wide(precision)
    optim = "ao_adamw8bit" if precision == "bf16" else "adamw"
    plain = measure_step(prepared, optim, False)
    with prepared.checkpointing():
        step = measure_step(prepared, optim, False)
    assert step.lines["activations"] < plain.lines["activations"] / 3  # the layers saved nothing
    measured = dict(step.lines, activations=step.kept + max(plain.layers.values()))
    _assert_close(step.planned(checkpointing=True), measured, LINES[1:])
    if precision == "bf16-master":  # the autocast copies alive in backward: one layer's
        params = sum(p.nbytes for p in prepared.model.parameters())
        one_layer = sum(p.numel() for p in prepared.trainable if p.dim() == 2) // len(WIDE_BAND)
        assert plain.lines["weights"] - params == 2 * 2 * one_layer
        assert step.lines["weights"] - params == 2 * one_layer


def _mm_has_fp32_output(dtype: torch.dtype) -> bool:
    """Whether this CPU's ``torch.mm`` writes a ``dtype`` product straight to fp32 (CUDA does)."""
    a = torch.zeros(2, 2, dtype=dtype)
    try:
        torch.mm(a, a, out_dtype=torch.float32)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return True


@pytest.mark.parametrize("precision", ["fp32", "bf16-master", "bf16"])
def test_fused_loss_peak_matches_the_plan(wide, measure_step, precision: str) -> None:
    """The chunked linear cross-entropy through Triton's CPU interpreter. The plan is the CUDA
    figure: where this CPU has no bf16 GEMM with fp32 output, each bf16 chunk is a bf16 product
    first, alive beside the previous and the new fp32 chunk (``2 C V`` more)."""
    pytest.importorskip("triton")
    optim = "ao_adamw8bit" if precision == "bf16" else "adamw"
    prepared = wide(precision)
    step = measure_step(prepared, optim, False, fused=True)
    rows, hidden, vocab = step.setup.supervised_rows, WIDE["hidden_size"], WIDE["vocab_size"]
    chunk = default_chunk_size(rows, hidden, vocab)
    head = prepared.model.lm_head.weight.dtype
    cpu_only = 0
    if chunk < rows and head != torch.float32 and not _mm_has_fp32_output(head):
        cpu_only = 2 * chunk * vocab
    _assert_close(step.planned(), dict(step.lines, logits=step.lines["logits"] - cpu_only))


# ---- SmolLM2-135M: a representative subset -----------------------------------------------------

SMOL = [
    ("bf16-master", "adamw8bit", False),  # the CUDA defaults
    ("bf16", "ao_adamw8bit", True),
    ("fp32", "adamw", True),
]


@pytest.mark.parametrize(
    ("precision", "optim", "in_backward"),
    SMOL,
    ids=[f"{p}-{o}-{'in-backward' if b else 'step'}" for p, o, b in SMOL],
)
def test_smollm2_plan_lines_match_a_measured_step(
    smol_model_and_tokenizer, measure_step, precision: str, optim: str, in_backward: bool
) -> None:
    prepared = _prepared(smol_model_and_tokenizer[0], precision, SMOL_BAND)
    step = measure_step(prepared, optim, in_backward)
    _assert_close(step.planned(), step.lines)


# ---- the new plan inputs -------------------------------------------------------------------------


def test_supervised_fraction_is_a_share_and_none_keeps_the_legacy_logits() -> None:
    for bad in (0.0, -0.1, 1.5, float("nan"), "half"):  # a run with no label trains nothing
        with pytest.raises(MemoryPlanError, match="--supervised-fraction"):
            TrainingSetup(supervised_fraction=bad)  # type: ignore[arg-type]
    assert TrainingSetup(seq_len=100, micro_batch=3, supervised_fraction=0.25).supervised_rows == 75
    assert TrainingSetup(seq_len=100, micro_batch=3).supervised_rows == 300
