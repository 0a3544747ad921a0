"""What In-Place ABN would save on a model, and the batch that would fit, counted on the meta device.

:func:`memory_report` builds three variants of one model -- as given, :func:`~inplace_abn.convert_model`
(In-Place ABN, fused with the residual add where possible) and, for reference, the model as given with
``torch.utils.checkpoint`` around each top-level stage -- and counts, exactly, what autograd keeps for
backward in a training forward (:func:`inplace_abn.memory.saved_tensor_bytes`) on ``device="meta"``: no
memory is allocated and nothing is computed, so any input size takes seconds.

Peak estimate of one training step at batch B (documented in the README, checked against measured peaks
in ``tests/test_memory_report_torchvision.py``)::

    peak(B) = P + G + O + A(B) + R(B) + T(B)

* P: parameters and buffers; G: gradients (one per trainable parameter); O: optimizer state (SGD with
  momentum: one buffer per trainable parameter; AdamW: two).
* A(B) = a0 + a1 * B: bytes kept for backward, exact. Two batches (N and 2N) give the per-sample slope a1
  and the batch-independent part a0 (per-channel statistics, weight copies).
* R(B): checkpoint variant only: the largest stage's own saved tensors, rebuilt while its backward runs.
* T(B) = 2 x the largest single activation (any module's output, or the input): the backward of a layer
  holds the gradient of its output and the gradient of its input at once, while the saved tensors of the
  layers before it are still alive.

It is an upper bound: with ``zero_grad(set_to_none=True)`` (PyTorch's default) some gradients do not
exist yet at the peak (resnet50, batch 4, CPU: estimate 8% above the measured resident peak). Allocator
caching and fragmentation (GPU) and kernel workspaces (cuDNN) are not counted.
"""

from __future__ import annotations

import copy
import math
import textwrap
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..convert import convert_model
from ..memory import parameters_of, saved_tensor_bytes

__all__ = [
    "DTYPES",
    "OPTIMIZERS",
    "PEAK_FORMULA",
    "ModuleMemory",
    "VariantReport",
    "MemoryReport",
    "memory_report",
    "device_copy",
    "stages_of",
]

#: Values of ``dtype`` (names as the CLI's ``--dtype`` takes them).
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Optimizer -> state buffers per trainable parameter (SGD with momentum: 1; AdamW: exp_avg, exp_avg_sq).
OPTIMIZERS: dict[str, int] = {"sgd": 1, "adamw": 2}
#: The peak estimate, as printed.
PEAK_FORMULA = (
    "peak(B) = params+buffers + grads + optimizer state + saved(B) + recompute(B) + 2 x largest activation(B); "
    "saved(B) = fixed + per_sample x B (exact, meta device); recompute = the largest checkpointed stage's own "
    "saved tensors (checkpoint only); an upper bound (grads set to None are not all alive at the peak)"
)
# A stage holding more than this share of the model's saved bytes is split into its children.
_STAGE_SHARE = 0.5


@dataclass
class ModuleMemory:
    """Bytes kept for backward while one module ran (its own ops, not its submodules').

    Attributes:
        name: Qualified module name (``""`` is the model's own forward).
        type: Class name.
        bytes: Bytes saved for backward at the report's batch size.
    """

    name: str
    type: str
    bytes: int


@dataclass
class VariantReport:
    """One variant of the model: its memory at the report's batch and its peak-estimate terms.

    Attributes:
        name: ``"as given"``, ``"In-Place ABN"`` or ``"checkpoint"``.
        saved_bytes: Bytes kept for backward at the input's batch size N (parameters excluded).
        saved_per_sample, saved_fixed: ``saved(B) = saved_fixed + saved_per_sample * B``.
        param_bytes, grad_bytes, optimizer_bytes: P, G and O of the formula.
        activation_per_sample, activation_fixed: The largest single activation, linear in B.
        recompute_per_sample, recompute_fixed: R(B) (0 except for the checkpoint variant).
        top_modules: The modules keeping the most bytes for backward (at batch ``counted_at[0]``).
        unconverted: ``(module, reason)`` for each BatchNorm ``convert_model`` kept (In-Place ABN only).
        converted, fused: BatchNorms converted, and of those fused with a residual add.
        untraced: Modules ``convert_model`` could not trace (their traceable children were converted).
        stages: The checkpointed stages (checkpoint only).
        max_batch: Largest B with ``peak(B) <= budget`` (None without a budget; 0 when B = 1 does not fit).
    """

    name: str
    saved_bytes: int
    saved_per_sample: float
    saved_fixed: float
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_per_sample: float
    activation_fixed: float
    recompute_per_sample: float = 0.0
    recompute_fixed: float = 0.0
    top_modules: list[ModuleMemory] = field(default_factory=list)
    unconverted: list[tuple[str, str]] = field(default_factory=list)
    converted: int = 0
    fused: int = 0
    untraced: list[str] = field(default_factory=list)
    stages: list[str] = field(default_factory=list)
    max_batch: int | None = None

    def peak_bytes(self, batch: int) -> float:
        """The peak estimate of one training step at ``batch`` (see :data:`PEAK_FORMULA`)."""
        saved = self.saved_fixed + self.saved_per_sample * batch
        recompute = self.recompute_fixed + self.recompute_per_sample * batch
        transient = 2 * (self.activation_fixed + self.activation_per_sample * batch)
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + saved + recompute + transient

    def largest_batch(self, budget: float) -> int:
        """Largest B >= 1 with ``peak_bytes(B) <= budget`` (0 if even B = 1 does not fit)."""
        if self.peak_bytes(1) > budget:
            return 0
        lo, hi = 1, 2
        while self.peak_bytes(hi) <= budget:  # peak is non-decreasing in B
            lo, hi = hi, hi * 2
            if hi > 2**50:
                return lo
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.peak_bytes(mid) <= budget else (lo, mid)
        return lo


@dataclass
class MemoryReport:
    """The result of :func:`memory_report` (``str()`` is the CLI's text; ``to_dict()`` its ``--json``).

    Attributes:
        model: What was measured (the CLI's MODEL string, or the class name).
        input_shape: (N, C, *) of one training batch.
        dtype: Parameter and input dtype name.
        optimizer: ``"sgd"`` (with momentum) or ``"adamw"``.
        budget_bytes: The memory budget of ``max_batch`` (None: not computed).
        variants: as given, In-Place ABN, checkpoint (in that order).
        formula: The peak estimate's formula.
        counted_at: The two batch sizes the forwards ran at (N and 2N, at least 2 and 4); the totals at N
            are the line through them (exact: the counts are linear in the batch size).
        seconds: Wall time of the measurement.
    """

    model: str
    input_shape: tuple[int, ...]
    dtype: str
    optimizer: str
    budget_bytes: int | None
    variants: list[VariantReport]
    formula: str = PEAK_FORMULA
    counted_at: tuple[int, int] = (0, 0)
    seconds: float = 0.0

    def variant(self, name: str) -> VariantReport:
        """The variant called ``name``."""
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(f"no variant {name!r}; have {[v.name for v in self.variants]}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (the ``--json`` schema): every field, plus per variant ``peak_bytes`` at
        the input's batch and ``saved_ratio`` (saved bytes / the as-given variant's)."""
        out = asdict(self)
        out["input_shape"] = list(self.input_shape)
        out["counted_at"] = list(self.counted_at)
        base = self.variants[0].saved_bytes
        for d, v in zip(out["variants"], self.variants):
            d["peak_bytes"] = v.peak_bytes(self.input_shape[0])
            d["saved_ratio"] = v.saved_bytes / base if base else None
            d["unconverted"] = [{"name": n, "reason": r} for n, r in v.unconverted]
        return out

    def __str__(self) -> str:
        return format_report(self)


def _fmt(nbytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes:.0f} B"


def format_report(report: MemoryReport, unconverted_listed: int = 8, stages_listed: int = 12) -> str:
    """The text the CLI prints: a table of the variants, the top modules, the unconverted layers, the formula."""
    n = report.input_shape[0]
    shape = "x".join(str(s) for s in report.input_shape)
    lines = [
        f"memory_report: {report.model}, input {shape} {report.dtype}, optimizer {report.optimizer}"
        f"{'' if report.budget_bytes is None else ', budget ' + _fmt(report.budget_bytes)}"
        f" ({report.seconds:.1f} s on the meta device)"
    ]
    names = [v.name for v in report.variants]
    width = max(14, *(len(x) + 2 for x in names))
    base = report.variants[0]
    rows: list[tuple[str, Callable[[VariantReport], str]]] = [
        (f"saved for backward (batch {n})", lambda v: _fmt(v.saved_bytes)),
        ("  vs as given", lambda v: f"{v.saved_bytes / base.saved_bytes:.2f}x" if base.saved_bytes else "-"),
        ("  per sample", lambda v: _fmt(v.saved_per_sample)),
        ("  batch-independent", lambda v: _fmt(v.saved_fixed)),
        ("parameters + buffers", lambda v: _fmt(v.param_bytes)),
        ("gradients", lambda v: _fmt(v.grad_bytes)),
        (f"optimizer state ({report.optimizer})", lambda v: _fmt(v.optimizer_bytes)),
        ("largest activation x2", lambda v: _fmt(2 * (v.activation_fixed + v.activation_per_sample * n))),
        (
            "recompute (largest stage)",
            lambda v: (
                _fmt(v.recompute_fixed + v.recompute_per_sample * n)
                if v.recompute_per_sample or v.recompute_fixed
                else "-"
            ),
        ),
        (f"peak estimate (batch {n})", lambda v: _fmt(v.peak_bytes(n))),
    ]
    if report.budget_bytes is not None:
        rows.append((f"largest batch in {_fmt(report.budget_bytes)}", lambda v: str(v.max_batch)))
    label = max(len(r[0]) for r in rows) + 2
    lines.append(" " * label + "".join(x.rjust(width) for x in names))
    for title, cell in rows:
        lines.append(title.ljust(label) + "".join(cell(v).rjust(width) for v in report.variants))
    for v in report.variants:
        if v.top_modules:
            lines.append(f"top {len(v.top_modules)} modules by saved bytes (batch {report.counted_at[0]}), {v.name}:")
            lines += [f"  {_fmt(m.bytes):>12}  {m.name or '(model forward)'} ({m.type})" for m in v.top_modules]
    abn = report.variants[1] if len(report.variants) > 1 else None
    if abn is not None:
        lines.append(
            f"convert_model: {abn.converted} BatchNorms converted ({abn.fused} fused with a residual add), "
            f"{len(abn.unconverted)} kept"
        )
        for name, reason in abn.unconverted[:unconverted_listed]:
            lines.append(f"  kept {name}: {reason}")
        if len(abn.unconverted) > unconverted_listed:
            lines.append(f"  ... {len(abn.unconverted) - unconverted_listed} more (--json lists all)")
        if abn.untraced:
            lines.append(f"  not traceable (children converted instead): {', '.join(abn.untraced)}")
    ck = report.variants[-1]
    if ck.stages:
        listed = ", ".join(ck.stages[:stages_listed])
        more = f" and {len(ck.stages) - stages_listed} more" if len(ck.stages) > stages_listed else ""
        lines.append(f"checkpointed stages ({len(ck.stages)}): {listed}{more}")
    lines.append("peak estimate: " + "\n  ".join(textwrap.wrap(report.formula, 100)))
    return "\n".join(lines)


def device_copy(model: nn.Module, device: str | torch.device = "meta", dtype: torch.dtype | None = None) -> nn.Module:
    """A copy of ``model`` with its parameters and buffers on ``device`` (on meta no data is copied).

    Args:
        model: Any module, on any device (untouched).
        device: Where the copy lives (``"meta"``: shapes only).
        dtype: Cast floating parameters and buffers to it (None: keep).

    Returns:
        The copy, in ``model``'s training mode.
    """
    memo: dict[int, Any] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in memo:
            continue
        target = dtype if dtype is not None and t.is_floating_point() else t.dtype
        if torch.device(device).type == "meta":
            moved = torch.empty_like(t, device="meta", dtype=target)
        else:
            moved = t.detach().to(device=device, dtype=target, copy=True)
        memo[id(t)] = nn.Parameter(moved, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else moved
    return copy.deepcopy(model, memo)


def _floating_tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in _floating_tensors(item)]
    return []


class _Measurement:
    """Saved bytes of one training forward, per innermost running module, and the largest activation."""

    def __init__(self, model: nn.Module, x: torch.Tensor) -> None:
        self.per_module: dict[str, int] = {}
        self.largest = x.untyped_storage().nbytes()
        types = {name: type(m).__name__ for name, m in model.named_modules()}
        stack: list[str] = [""]
        owner: dict[Any, str] = {}
        handles = []

        def pre(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: Any) -> None:
                stack.append(name)

            return hook

        def post(module: nn.Module, args: Any, output: Any) -> None:
            stack.pop()
            for t in _floating_tensors(output):
                self.largest = max(self.largest, t.untyped_storage().nbytes())

        for name, m in model.named_modules():
            if name:
                handles.append(m.register_forward_pre_hook(pre(name)))
                handles.append(m.register_forward_hook(post))

        def forward() -> torch.Tensor:
            outs = _floating_tensors(model(x))
            if not outs:
                raise ValueError(
                    f"the model returned no floating-point tensor (got {type(outs).__name__}); "
                    "memory_report needs a differentiable output"
                )
            return torch.stack([t.sum() for t in outs]).sum()

        # Each storage belongs to the module running when it was first saved.
        def on_save(key: Any, t: torch.Tensor) -> None:
            owner[key] = stack[-1]

        try:
            self.total, loss, storages = saved_tensor_bytes(forward, parameters_of(model), on_save)
            del loss  # frees the (meta) graph
        finally:
            for h in handles:
                h.remove()
        for key, nbytes in storages.items():
            self.per_module[owner[key]] = self.per_module.get(owner[key], 0) + nbytes
        self.types = types

    def inclusive(self, prefix: str) -> int:
        """Saved bytes of module ``prefix`` and all its submodules."""
        return sum(b for name, b in self.per_module.items() if name == prefix or name.startswith(prefix + "."))

    def top(self, k: int) -> list[ModuleMemory]:
        ranked = sorted(self.per_module.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
        return [ModuleMemory(name, self.types.get(name, "?"), b) for name, b in ranked]


def _linear(at_n: float, at_2n: float, n: int) -> tuple[float, float]:
    """(per_sample, fixed) of a quantity measured at batch n and 2n."""
    per_sample = (at_2n - at_n) / n
    return per_sample, at_n - per_sample * n


def stages_of(model: nn.Module, share: Callable[[str], float]) -> list[str]:
    """The "top-level stages" the checkpoint variant wraps: the model's children, where a container without
    a forward of its own (ModuleList, ModuleDict) or a child keeping more than half of the saved bytes
    (a ``backbone`` wrapper) is replaced by its own children, recursively.

    Args:
        model: The model.
        share: Module name -> its share (0..1) of the model's saved bytes.

    Returns:
        Qualified names of the stages, in registration order.
    """
    out: list[str] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            qual = f"{prefix}{name}"
            never_called = type(child).forward is nn.Module.forward  # ModuleList / ModuleDict without forward
            split = never_called or share(qual) > _STAGE_SHARE
            if split and any(True for _ in child.children()):
                visit(qual + ".", child)
            elif share(qual) > 0:  # a child keeping nothing (never called, or no autograd state) is left alone
                out.append(qual)

    visit("", model)
    return out


def _checkpointed(model: nn.Module, stages: Sequence[str]) -> nn.Module:
    """A copy of ``model`` in which each stage's forward runs under non-reentrant ``torch.utils.checkpoint``."""
    model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    for name in stages:
        module = modules[name]

        def forward(*args: Any, _f: Callable[..., Any] = module.forward, **kwargs: Any) -> Any:
            # preserve_rng_state=False: the RNG of the meta device cannot be saved; counting is unaffected
            return checkpoint(_f, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)

        module.forward = forward  # type: ignore[method-assign]
    return model


def _input_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list, torch.Size)) else None
    if not shape or len(shape) < 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(
            f"input_shape must be (N, C, *) with at least 2 positive ints, got {input_shape!r}; e.g. (1, 3, 224, 224)"
        )
    return shape


def memory_report(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    dtype: torch.dtype = torch.float32,
    optimizer: str = "sgd",
    budget: int | None = None,
    top: int = 5,
    name: str | None = None,
    device: str | torch.device = "meta",
) -> MemoryReport:
    """What In-Place ABN (``convert_model``) saves on ``model``, and the largest batch that fits ``budget``.

    Everything runs on the meta device: ``model`` is copied there (no data copied, ``model`` untouched), so
    no activation memory is allocated and any input size takes seconds. BatchNorm weights have no values on
    meta: ``convert_model`` treats them as >= eps (as at initialisation).

    Args:
        model: The network (any device; a meta model is fine). Called as ``model(x)``; its floating-point
            outputs (tensor, tuple, list or dict of them) are summed into the loss.
        input_shape: (N, C, *) of one training batch; N is the batch the totals are given for.
        dtype: ``torch.float32``, ``torch.bfloat16`` or ``torch.float16`` for parameters and input.
        optimizer: ``"sgd"`` (with momentum) or ``"adamw"``: the optimizer state in the peak estimate.
        budget: Bytes available for one training step, or None (no ``max_batch``).
        top: How many modules to list per variant (by bytes kept for backward), >= 0.
        name: Label of the model in the report (default: its class name).
        device: Where to count: ``"meta"`` (default; no memory, no compute) or a real device, which runs the
            forwards for real (random input) and must give the same bytes (the tests check it).

    Returns:
        A :class:`MemoryReport` with the variants ``"as given"``, ``"In-Place ABN"`` and ``"checkpoint"``.

    Raises:
        ValueError: a bad argument (named in the message with its value), or a model whose output has no
            floating-point tensor.
    """
    shape = _input_shape(input_shape)
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype must be one of {list(DTYPES.values())}, got {dtype!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
    if budget is not None and (
        isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget <= 0
    ):
        raise ValueError(f"budget must be a number of bytes > 0 or None, got {budget!r}")
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise ValueError(f"top must be an int >= 0, got {top!r}")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    start = time.perf_counter()
    n = shape[0]
    given = device_copy(model, device, dtype).train()
    with torch.device(device), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convert_model's untraced / relu notices: they are in the report
        converted, conversion = convert_model(given, return_report=True)
    converted.train()

    # Counted at two batches (the slope is the per-sample part). At least 2: BatchNorm refuses to train on
    # one value per channel (e.g. DeepLabV3's image-pooling branch at batch 1); counts are linear in B, so
    # batch 1 is the line's value there.
    counted = (max(n, 2), 2 * max(n, 2))

    def measure(m: nn.Module) -> tuple[_Measurement, _Measurement]:
        return tuple(
            _Measurement(m, torch.randn((b, *shape[1:]), device=device, dtype=dtype))  # type: ignore
            for b in counted
        )

    base = measure(given)
    total = max(base[0].total, 1)
    stages = stages_of(given, lambda q: base[0].inclusive(q) / total)
    measured = {
        "as given": base,
        "In-Place ABN": measure(converted),
        "checkpoint": measure(_checkpointed(given, stages)),
    }

    trainable = sum(p.numel() * p.element_size() for p in given.parameters() if p.requires_grad)
    resident = sum(t.numel() * t.element_size() for t in parameters_of(given))
    variants = []
    for label, (m1, m2) in measured.items():
        saved = _linear(m1.total, m2.total, counted[0])
        act = _linear(m1.largest, m2.largest, counted[0])
        recompute = (0.0, 0.0)
        if label == "checkpoint" and stages:
            recompute = max(
                (_linear(base[0].inclusive(s), base[1].inclusive(s), counted[0]) for s in stages),
                key=lambda r: r[0] * n + r[1],
            )
        v = VariantReport(
            name=label,
            saved_bytes=round(saved[1] + saved[0] * n),
            saved_per_sample=saved[0],
            saved_fixed=saved[1],
            param_bytes=resident,
            grad_bytes=trainable,
            optimizer_bytes=OPTIMIZERS[optimizer] * trainable,
            activation_per_sample=act[0],
            activation_fixed=act[1],
            recompute_per_sample=recompute[0],
            recompute_fixed=recompute[1],
            top_modules=m1.top(top),
        )
        if label == "In-Place ABN":
            v.unconverted = [(layer.name, layer.reason) for layer in conversion.kept]
            v.converted, v.fused = len(conversion.converted), len(conversion.fused)
            v.untraced = list(conversion.untraced)
        if label == "checkpoint":
            v.stages = list(stages)
        if budget is not None:
            v.max_batch = v.largest_batch(budget)
        variants.append(v)
    dtype_name = next(k for k, d in DTYPES.items() if d == dtype)
    return MemoryReport(
        model=name or type(model).__name__,
        input_shape=shape,
        dtype=dtype_name,
        optimizer=optimizer,
        budget_bytes=None if budget is None else int(budget),
        variants=variants,
        counted_at=counted,
        seconds=time.perf_counter() - start,
    )
