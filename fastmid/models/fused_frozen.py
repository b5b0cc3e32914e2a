"""Frozen decoder layers, fused: one GEMM for q/k/v, one for gate/up, the residual add in the norm.

A frozen layer (below the band, above it, or in a gap of a non-contiguous plan) never changes, so
its projections can be packed once at setup. For every frozen layer of a family with a
:class:`~fastmid.models.families.FrozenFusion` entry in the family table,
:func:`fuse_frozen_layers`:

* packs ``[q; k; v]`` (with Qwen2's biases) and ``[gate; up]`` into one weight each, in the
  weights' own dtype (the compute dtype under every ``--precision``: fp32, or bf16 for frozen
  weights). The packed tensor owns the storage; each original ``weight`` Parameter keeps its
  identity, name, shape, dtype and ``requires_grad`` and becomes a view of its rows
  (``param.data = packed[rows]``, as FSDP1's flat parameters do), so memory does not grow and
  ``state_dict``, checkpoints, export and ``from_pretrained`` see the model unchanged. Each of the
  linears then answers from one GEMM: the first of them called with a new input computes
  ``x @ [Wq; Wk; Wv].T`` and splits it, the others take their slice. Attention itself stays
  transformers' own code (RoPE, Qwen3's q/k norms, caches, sliding windows, the attention
  backend), so it runs exactly as before; backward of the one ``split`` gathers the three input
  gradients into one tensor, and the suffix's input gradient is one GEMM too.
* runs the layer through the family's forward template (``pre_norm`` for Llama, Mistral, Qwen2,
  Qwen3): the attention output's residual add and the following RMSNorm are one
  :func:`fastmid.kernels.fused_add_rms_norm` call (Triton on CUDA, the torch reference
  elsewhere, with the family's own roundings).

Two GEMMs where there were five, per frozen layer, forward and backward. The results equal the
unfused path up to the GEMMs' summation order: in float32 on CPU, SmolLM2's logits within 1e-7
relative and its band gradients within 1e-5 norm-wise (``tests/models/test_fused_frozen.py``),
ten times closer than the unfused path is to a float64 run. Measured speed:
``bench/results/frozen_cpu.md`` (CPU only; on CUDA not measured yet).

Safety: a packed group checks, at each GEMM, that its linears still view its storage and do not
require grad (a later ``.to()``, ``load_state_dict`` with new tensors, a ``copy.deepcopy``, or a
plan that trains the layer); otherwise it runs the plain linear and drops its packed copy. A layer
whose forward was replaced by something unknown is left unfused and named in the report. The
fused forward hands the model's keyword arguments on to transformers' attention as the layer's
own forward does (its signature's defaults included), so it follows the transformers version;
written against transformers 5.24 (``past_key_values`` renamed ``cache``).

Order: call after ``apply_band`` (weights must already be frozen) and after the model is on its
device; before or after ``install_execution_policy`` and ``patch_model`` (the policy's wrapper, if
present, is kept around the fused forward). Not with several processes: FSDP2's ``fully_shard``
replaces every parameter by a DTensor and the views would not survive; sharded parameters are
detected and the layers left unfused. :func:`unfuse_frozen_layers` undoes everything (separate
storages again, one layer at a time); call it before ``save_pretrained`` to keep the export's
memory flat (transformers otherwise clones the packed views, which is correct but holds a second
copy of the packed weights while it saves).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastmid import kernels
from fastmid.models.band import BandError, BandPlan
from fastmid.models.families import FamilySpec, FrozenFusion, decoder_layers, family_of

# Keyword names transformers renamed in a layer's forward (old -> new): a caller using the old
# name must not get the new one's default as well, or the attention would ignore its value.
_RENAMED_KWARGS = {"past_key_values": "cache"}


@dataclass
class FuseReport:
    """What :func:`fuse_frozen_layers` did (JSON-ready through :meth:`to_dict`).

    Attributes:
        enabled: fusion was requested.
        model_type: ``config.model_type``.
        layers: indices of the fused decoder layers, ascending.
        roles: the fused layers by role (``frozen-prefix``, ``frozen-gap``, ``frozen-suffix``).
        packed_qkv: layers whose q/k/v run as one GEMM.
        packed_gate_up: layers whose gate/up run as one GEMM.
        fused_add_norm: layers whose residual add runs inside the MLP's RMSNorm.
        backend: the kernels' backend argument (``auto``: Triton on CUDA, torch elsewhere).
        skipped: one line per reason something ran unfused (an unsupported family, a layer).
    """

    enabled: bool
    model_type: str
    layers: list[int] = field(default_factory=list)
    roles: dict[str, list[int]] = field(default_factory=dict)
    packed_qkv: int = 0
    packed_gate_up: int = 0
    fused_add_norm: int = 0
    backend: str = "auto"
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for ``summary.json``."""
        return asdict(self)

    def describe(self) -> str:
        """One line for the console, e.g. ``fused frozen layers 0..5, 24..29 (12): ...``."""
        if not self.layers:
            why = "; ".join(self.skipped) if self.skipped else "no frozen layers"
            return f"frozen layers unfused: {why}"
        line = (
            f"fused frozen layers {_spans(self.layers)} ({len(self.layers)}): q/k/v and gate/up "
            "packed, residual add in RMSNorm"
        )
        return line + (f"; {'; '.join(self.skipped)}" if self.skipped else "")


def _spans(indices: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``0..2, 5, 7..8``."""
    out: list[str] = []
    start = prev = indices[0]
    for i in [*indices[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(f"{start}..{prev}" if prev > start else f"{start}")
        if i is not None:
            start = prev = i
    return ", ".join(out)


class _PackedLinears:
    """One weight ``[W_0; W_1; ...]`` (and bias) owning the storage of several frozen
    ``nn.Linear`` weights, which become views of its rows; each linear's ``forward`` returns its
    slice of one GEMM.

    The first linear called with an input ``x`` computes ``F.linear(x, packed)`` (shape
    ``(..., sum(out_features))``), splits it along the last dimension, returns its part and keeps
    the others for the next calls with the same ``x`` object (any call order). A call with another
    input starts over, so the answer is always that linear's ``F.linear(x, W_i, b_i)``.
    """

    def __init__(self, linears: list[nn.Linear]) -> None:
        self.linears = linears
        self.sizes = [lin.out_features for lin in linears]
        with torch.no_grad():
            self.weight: torch.Tensor | None = torch.cat([lin.weight for lin in linears], 0)
            for lin, rows in zip(linears, self.weight.split(self.sizes, 0), strict=True):
                lin.weight.data = rows
            self.bias: torch.Tensor | None = None
            if linears[0].bias is not None:
                self.bias = torch.cat([lin.bias for lin in linears], 0)
                for lin, rows in zip(linears, self.bias.split(self.sizes, 0), strict=True):
                    lin.bias.data = rows
        # (parameter, the address of its rows in the packed storage), checked at each GEMM.
        self._views = [(lin.weight, lin.weight.data_ptr()) for lin in linears]
        self._views += [(lin.bias, lin.bias.data_ptr()) for lin in linears if lin.bias is not None]
        self._pending: tuple[torch.Tensor, list[torch.Tensor | None]] | None = None
        for i, lin in enumerate(linears):
            lin.forward = functools.partial(self.project, i)  # instance attribute, not a module

    def valid(self) -> bool:
        """True while every linear still views the packed storage and none requires grad."""
        if self.weight is None:
            return False
        for param, ptr in self._views:
            if param.requires_grad or param.data_ptr() != ptr:
                # The packed copy no longer stands for the parameters: never use it again.
                self.weight = self.bias = None
                self._pending = None
                return False
        return True

    def project(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """``F.linear(x, W_index, b_index)``: (..., in_features) -> (..., out_features[index])."""
        pending = self._pending
        if pending is not None and pending[0] is x and pending[1][index] is not None:
            # Computed by the first call on this x, which checked the views a moment ago.
            out = pending[1][index]
            pending[1][index] = None
            if all(o is None for o in pending[1]):
                self._pending = None
            return out  # type: ignore[return-value]
        if not self.valid():
            lin = self.linears[index]
            return F.linear(x, lin.weight, lin.bias)
        # One split (not one slice per linear): its backward concatenates the three gradients
        # into one tensor for the one input-gradient GEMM.
        outs: list[torch.Tensor | None] = list(
            F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)
        )
        out = outs[index]
        outs[index] = None
        self._pending = (x, outs)
        return out  # type: ignore[return-value]

    def clear(self) -> None:
        """Drop the slices kept for the other linears (after the block that uses them)."""
        self._pending = None

    def unpack(self) -> None:
        """Give every linear its own storage again and its class ``forward`` back."""
        with torch.no_grad():
            for lin in self.linears:
                for param in (lin.weight, lin.bias):
                    # Still a view of a larger storage (the packed one, even if no longer valid):
                    # its own copy, so the packed storage is freed with the last view.
                    if param is not None and param.untyped_storage().nbytes() != (
                        param.numel() * param.element_size()
                    ):
                        param.data = param.data.clone()
                lin.__dict__.pop("forward", None)
        self.weight = self.bias = None
        self._pending = None
        self._views = []


def _is_class_forward(obj: Any, layer: nn.Module) -> bool:
    return getattr(obj, "__self__", None) is layer and (
        getattr(obj, "__func__", None) is type(layer).forward
    )


class _FusedLayer:
    """One fused decoder layer: its packed groups, the forward template, and how to undo it.

    Its :meth:`forward` (a bound method, so ``copy.deepcopy`` of the model copies it with the
    layer) becomes the layer's forward; subclasses are the family table's templates.

    Attributes:
        index: the layer's index; layer: the decoder layer; groups: its packed linears;
        active: False after :func:`unfuse_frozen_layers` (the forward then runs the class one).
    """

    def __init__(
        self,
        index: int,
        layer: nn.Module,
        spec: FamilySpec,
        fusion: FrozenFusion,
        backend: kernels.Backend,
    ) -> None:
        self.index = index
        self.layer = layer
        self.spec = spec
        self.fusion = fusion
        self.backend = backend
        self.groups: list[_PackedLinears] = []
        self.active = True
        # The class forward's signature and the defaults of its keyword parameters after
        # hidden_states: the original passes all of them on to attention, defaults included.
        self.signature = inspect.signature(type(layer).forward)  # follows functools.wraps
        self.defaults = {
            name: p.default
            for name, p in list(self.signature.parameters.items())[2:]  # self, hidden_states
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is not p.empty
        }
        self.renamed = {old: new for old, new in _RENAMED_KWARGS.items() if new in self.defaults}
        self._installed: Any = None
        self._previous: Any = None

    def install(self) -> bool:
        """Make :meth:`forward` the layer's forward, inside an execution-policy wrapper if there
        is one (:func:`fastmid.models.band.install_execution_policy` wraps ``layer.forward`` in a
        ``functools.partial`` holding the class forward). False when the layer's forward was
        replaced by something else (then it is left alone)."""
        layer = self.layer
        current = layer.__dict__.get("forward")
        if current is None:
            self._installed = self.forward
        elif isinstance(current, functools.partial) and any(
            _is_class_forward(a, layer) for a in current.args
        ):
            args = [self.forward if _is_class_forward(a, layer) else a for a in current.args]
            self._installed = functools.partial(current.func, *args, **current.keywords)
        else:
            return False
        self._previous = current
        layer.forward = self._installed
        return True

    def uninstall(self) -> None:
        """Put the previous forward back, unless something replaced ours meanwhile (then the
        inactive :meth:`forward` runs the class forward wherever it is still held)."""
        self.active = False
        layer = self.layer
        if self._installed is not None and layer.__dict__.get("forward") is self._installed:
            if self._previous is None:
                del layer.forward
            else:
                layer.forward = self._previous
        self._installed = self._previous = None

    def call_kwargs(self, hidden_states: torch.Tensor, args: tuple, kwargs: dict) -> dict:
        """The keyword arguments the class forward would pass on to attention."""
        if args:  # transformers passes keywords; map positional ones by the class signature
            bound = self.signature.bind(self.layer, hidden_states, *args, **kwargs)
            kwargs = {}
            for name, value in list(bound.arguments.items())[2:]:
                if self.signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                    kwargs.update(value)
                else:
                    kwargs[name] = value
        for old, new in self.renamed.items():
            if old in kwargs and new not in kwargs:
                kwargs = {**kwargs, new: kwargs[old]}
                del kwargs[old]
        return {**self.defaults, **kwargs}

    def clear(self) -> None:
        for group in self.groups:
            group.clear()

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError


class _PreNormLayer(_FusedLayer):
    """The ``pre_norm`` template: ``h = x + attn(attn_norm(x))``; ``out = h + mlp(mlp_norm(h))``,
    with the first add inside ``mlp_norm`` (:func:`fastmid.kernels.fused_add_rms_norm`, with the
    family's own roundings: ``casting="llama"`` for ``norm_out_dtype="promote"``)."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """What the layer's own forward does: ``hidden_states`` (batch, seq, hidden) and the
        model's keyword arguments (mask, position embeddings, cache...), which go on to
        transformers' attention as the original passes them; returns (batch, seq, hidden)."""
        layer, spec, fusion = self.layer, self.spec, self.fusion
        if not self.active or getattr(layer, "gradient_checkpointing", False):
            # Unfused (undone, or transformers' own checkpointing asked for): the class forward.
            return type(layer).forward(layer, hidden_states, *args, **kwargs)
        call = self.call_kwargs(hidden_states, args, kwargs)
        residual = hidden_states
        x = getattr(layer, fusion.attn_norm)(hidden_states)
        try:
            attn = getattr(layer, spec.attention)(hidden_states=x, **call)
        finally:
            self.clear()
        attn_out = attn[0] if isinstance(attn, tuple) else attn
        norm = getattr(layer, fusion.mlp_norm)
        if attn_out.dtype == residual.dtype and attn_out.shape == residual.shape:
            y, h = kernels.fused_add_rms_norm(
                attn_out,
                residual,
                norm.weight,
                getattr(norm, spec.norm_eps_attr),
                offset=1.0 if spec.norm_kind == "rms_gemma" else 0.0,
                casting="llama" if spec.norm_out_dtype == "promote" else "gemma",
                backend=self.backend,
            )
        else:  # a mixed-dtype stream: eager's own promotion
            h = residual + attn_out
            y = norm(h)
        try:
            out = getattr(layer, spec.mlp)(y)
        finally:
            self.clear()
        return h + out


# The family table's FrozenFusion.forward names one of these templates.
_TEMPLATES: dict[str, type[_FusedLayer]] = {"pre_norm": _PreNormLayer}


def _linears(module: nn.Module, names: tuple[str, ...]) -> list[nn.Linear] | str:
    """The named ``nn.Linear`` children of ``module``, or why they cannot be packed."""
    found = [getattr(module, n, None) for n in names]
    if not all(isinstance(m, nn.Linear) for m in found):
        return f"{'/'.join(names)} are not all nn.Linear"
    lins: list[nn.Linear] = found  # type: ignore[assignment]
    w0 = lins[0].weight
    if any(m.in_features != lins[0].in_features for m in lins):
        return f"{'/'.join(names)} have different input sizes"
    if any(m.weight.dtype != w0.dtype or m.weight.device != w0.device for m in lins):
        return f"{'/'.join(names)} differ in dtype or device"
    if len({m.bias is None for m in lins}) != 1:
        return f"{'/'.join(names)}: some have a bias, some not"
    return lins


def _unfusable(layer: nn.Module, fusion: FrozenFusion, spec: FamilySpec) -> str | None:
    """Why this frozen layer cannot be fused, or None."""
    if type(layer).__name__ != fusion.layer_class:
        return f"class {type(layer).__name__} is not {fusion.layer_class}"
    params = list(layer.parameters())
    if any(p.requires_grad for p in params):
        return "some of its parameters train"
    if any(type(p.data) is not torch.Tensor for p in params):
        return "its parameters are sharded (FSDP2 DTensors): packed views do not survive"
    if any(p.device.type == "meta" for p in params):
        return "its parameters are on the meta device"
    for name in (fusion.attn_norm, fusion.mlp_norm):
        norm = getattr(layer, name, None)
        if norm is None or not hasattr(norm, "weight") or not hasattr(norm, spec.norm_eps_attr):
            return f"{name} is not an RMSNorm with weight and {spec.norm_eps_attr}"
    for owner, names in ((spec.attention, fusion.qkv), (spec.mlp, fusion.gate_up)):
        got = _linears(getattr(layer, owner), names)
        if isinstance(got, str):
            return got
    return None


def fuse_frozen_layers(
    model: nn.Module,
    plan: BandPlan,
    *,
    enabled: bool = True,
    off_reason: str | None = None,
    backend: kernels.Backend = "auto",
) -> FuseReport:
    """Pack and fuse every frozen decoder layer of ``model`` (see the module docstring).

    Args:
        model: a ``*ForCausalLM`` whose band is applied (``requires_grad`` set by ``apply_band``),
            on its final device.
        plan: the band; layers whose role is not ``band`` are fused.
        enabled: False fuses nothing and reports ``off_reason`` (the CLI's ``--no-fuse-frozen``).
        off_reason: the one line for ``skipped`` when ``enabled`` is False (e.g. ``several
            processes (FSDP2): frozen layers run unfused``).
        backend: the add+norm kernel's backend (``"auto"``: Triton on CUDA, torch elsewhere;
            ``"torch"`` under ``--kernels off``). The GEMMs are torch's either way.

    Returns:
        A :class:`FuseReport`. A family without a ``frozen_fusion`` entry in the family table
        runs unfused with one line naming it in ``skipped`` (not an error); so does any layer
        that cannot be fused (the line says which and why).

    Raises:
        UnsupportedModelError: the model's ``model_type`` is not in the family table.
        BandError: the plan's layer count differs from the model's.
    """
    spec = family_of(model)
    report = FuseReport(enabled=enabled, model_type=spec.model_type, backend=backend)
    if not enabled:
        report.skipped.append(off_reason or "fusion of frozen layers is off")
        return report
    fusion = spec.frozen_fusion
    if fusion is None:
        report.skipped.append(
            f"{spec.model_type}: no fused frozen-layer forward in the family table; frozen "
            "layers run unfused"
        )
        return report
    layers = decoder_layers(model)
    if plan.num_hidden_layers != len(layers):
        raise BandError(
            f"the plan is for {plan.num_hidden_layers} layers but the model has {len(layers)}"
        )
    template = _TEMPLATES[fusion.forward]
    states: list[_FusedLayer] = list(getattr(model, "_fastmid_fused_frozen", None) or [])
    for i, layer in enumerate(layers):
        role = plan.role(i)
        if role == "band":
            continue
        previous = layer.__dict__.get("_fastmid_fused")
        if previous is not None and previous.active:  # fused by an earlier call: report it
            report.layers.append(i)
            report.roles.setdefault(role, []).append(i)
            continue
        why = _unfusable(layer, fusion, spec)
        if why is not None:
            report.skipped.append(f"layer {i} ({role}): {why}; runs unfused")
            continue
        state = template(i, layer, spec, fusion, backend)
        if not state.install():
            report.skipped.append(
                f"layer {i} ({role}): its forward was replaced by something unknown; runs unfused"
            )
            continue
        attn, mlp = getattr(layer, spec.attention), getattr(layer, spec.mlp)
        state.groups = [
            _PackedLinears(_linears(attn, fusion.qkv)),  # type: ignore[arg-type]
            _PackedLinears(_linears(mlp, fusion.gate_up)),  # type: ignore[arg-type]
        ]
        layer.__dict__["_fastmid_fused"] = state
        states.append(state)
        report.layers.append(i)
        report.roles.setdefault(role, []).append(i)
    report.packed_qkv = report.packed_gate_up = report.fused_add_norm = len(report.layers)
    model._fastmid_fused_frozen = states
    return report


def unfuse_frozen_layers(model: nn.Module) -> int:
    """Undo :func:`fuse_frozen_layers`: every linear gets its own storage again (one layer at a
    time, so the peak is one layer's packed weights) and every layer its previous forward.

    Returns:
        The number of layers unfused (0 when none was fused).
    """
    states: list[_FusedLayer] = getattr(model, "_fastmid_fused_frozen", None) or []
    for state in states:
        state.uninstall()  # inactive: a wrapper still holding its forward runs the class one
        for group in state.groups:
            group.unpack()
        state.layer.__dict__.pop("_fastmid_fused", None)
    model._fastmid_fused_frozen = None
    return len(states)


def fused_layer_indices(model: nn.Module) -> list[int]:
    """Indices of the layers that currently run fused (active, packed groups still valid)."""
    states: list[_FusedLayer] = getattr(model, "_fastmid_fused_frozen", None) or []
    return [s.index for s in states if s.active and all(g.valid() for g in s.groups)]
