"""``convert_model``: the BatchNorm (-> activation) pairs of an existing network become In-Place ABN layers.

The model is traced with ``torch.fx`` and the real dataflow is analysed, not the module tree: shared
activation modules, residual adds, aliasing views and in-place ops on the layer's input or output. A
BatchNorm -> residual add -> activation chain becomes one fused ``layer(x, residual=shortcut)`` call.
Holds the tracer, the graph rewrite and the per-layer :class:`ConversionReport`. Re-exported by
:mod:`inplace_abn.convert`, where 1.1.0-era and user code imports it from.
"""

from __future__ import annotations

import copy
import inspect
import operator
import warnings
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .abn import ABN, InPlaceABN, InPlaceABNSync, RecomputeMaxPool2d
from .activations import ACTIVATIONS, invertible, resolve
from .convert import _copy_state, _swap

__all__ = ["convert_model", "ConversionReport", "LayerConversion"]


@dataclass
class LayerConversion:
    """What :func:`convert_model` did with one BatchNorm module.

    Attributes:
        name: Qualified module name.
        converted: True when it became an In-Place ABN layer.
        activation, activation_param: Activation of the new layer (None when kept).
        source: The fused activation as found in the model (e.g. ``"ReLU"``), or None (identity layer).
        reason: Why the BatchNorm was kept (empty when converted).
        folded: Channels whose negative weight was folded into the producing conv/linear (exact).
        clamped: Channels whose BatchNorm weight was below ``eps`` and was represented by ``|0| + eps``
            (negative ones only with ``negative_weights="clamp"``).
        max_scale_change: Largest ``|(|w| + eps) - w_bn|`` over the channels (0 when exact).
        residual: For a layer fused with the residual add that followed it (``act(BN(x) + residual)`` in one
            call, the add and the activation removed from the graph): where the residual comes from (a
            module name, ``"input <name>"`` or an op); None otherwise.
        not_fused: Why a BatchNorm followed by a residual add was not fused with it (it became an identity
            layer before the add, or was kept); empty when fused or when no add follows.
    """

    name: str
    converted: bool = False
    activation: str | None = None
    activation_param: float | None = None
    source: str | None = None
    reason: str = ""
    folded: int = 0
    clamped: int = 0
    max_scale_change: float = 0.0
    residual: str | None = None
    not_fused: str = ""


@dataclass
class ConversionReport:
    """The per-layer result of :func:`convert_model` (``return_report=True``)."""

    layers: list[LayerConversion] = field(default_factory=list)
    untraced: list[str] = field(default_factory=list)
    #: The ``nn.MaxPool2d`` modules replaced by :class:`~inplace_abn.RecomputeMaxPool2d` (qualified names).
    max_pools: list[str] = field(default_factory=list)

    @property
    def converted(self) -> list[LayerConversion]:
        """The layers that became In-Place ABN layers."""
        return [layer for layer in self.layers if layer.converted]

    @property
    def kept(self) -> list[LayerConversion]:
        """The layers kept as BatchNorm (each with its ``reason``)."""
        return [layer for layer in self.layers if not layer.converted]

    @property
    def fused(self) -> list[LayerConversion]:
        """The converted layers that also took over a residual add and its activation."""
        return [layer for layer in self.converted if layer.residual is not None]

    def not_fused_reasons(self) -> dict[str, int]:
        """BatchNorms followed by a residual add that were not fused with it, per reason."""
        return dict(Counter(layer.not_fused for layer in self.layers if layer.not_fused))

    def counts(self) -> dict[str, int]:
        """Converted layers per activation (e.g. ``{"leaky_relu": 49, "identity": 4}``; fused layers included)."""
        return dict(Counter(layer.activation for layer in self.converted))

    def kept_reasons(self) -> dict[str, int]:
        """Kept layers per reason."""
        return dict(Counter(layer.reason for layer in self.kept))

    def summary(self) -> str:
        """A few human-readable lines: counts, reasons for keeping, weight changes, untraced modules."""
        lines = [
            f"{len(self.layers)} BatchNorm layers: {len(self.converted)} converted {self.counts()}, "
            f"{len(self.kept)} kept"
        ]
        lines += [f"  kept x{n}: {reason}" for reason, n in self.kept_reasons().items()]
        if self.fused:
            lines.append(
                f"  fused with their residual add and activation (act(BN(x) + residual), one layer): {len(self.fused)}"
            )
        lines += [f"  add not fused x{n}: {reason}" for reason, n in self.not_fused_reasons().items()]
        folded, clamped = sum(x.folded for x in self.layers), sum(x.clamped for x in self.layers)
        if folded or clamped:
            lines.append(
                f"  weights: {folded} negative channels folded into the previous layer, {clamped} "
                f"channels below eps clamped (max scale change "
                f"{max(x.max_scale_change for x in self.layers):.3g})"
            )
        if self.max_pools:
            lines.append(
                f"  max-pools keeping only their input for backward (RecomputeMaxPool2d): {len(self.max_pools)}"
            )
        if self.untraced:
            lines.append(f"  not traceable (only their traceable submodules were converted): {self.untraced}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


_BN_TYPES = {
    nn.BatchNorm1d: InPlaceABN,
    nn.BatchNorm2d: InPlaceABN,
    nn.BatchNorm3d: InPlaceABN,
    nn.SyncBatchNorm: InPlaceABNSync,
}
# Producers whose output is a fresh tensor that autograd does not keep: safe for an in-place layer to overwrite.
_FRESH_MODULES = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
    nn.Upsample,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
)
_FRESH_FUNCTIONS = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.cat,
    torch.concat,
    torch.matmul,
    F.conv1d,
    F.conv2d,
    F.conv3d,
    F.conv_transpose1d,
    F.conv_transpose2d,
    F.conv_transpose3d,
    F.linear,
    F.interpolate,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
}
_FRESH_METHODS = {"add", "sub", "mul", "div", "matmul"}
_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)  # weight (out, ...), bias (out,)
# Ops whose result may share memory with their first argument (an in-place op on it reaches the layer's output).
_VIEW_METHODS = {
    "view",
    "view_as",
    "reshape",
    "reshape_as",
    "flatten",
    "unflatten",
    "squeeze",
    "unsqueeze",
    "transpose",
    "t",
    "permute",
    "narrow",
    "select",
    "expand",
    "expand_as",
    "chunk",
    "split",
    "unbind",
    "contiguous",
    "detach",
    "movedim",
    "swapaxes",
    "as_strided",
    "unfold",
    "to",
    "type_as",
    "float",
    "type",
    "__getitem__",
}
_VIEW_FUNCTIONS = {
    operator.getitem,
    torch.flatten,
    torch.reshape,
    torch.squeeze,
    torch.unsqueeze,
    torch.transpose,
    torch.permute,
    torch.narrow,
    torch.select,
    torch.chunk,
    torch.split,
    torch.unbind,
    torch.movedim,
    torch.swapaxes,
    torch.t,
    torch.detach,
    torch.as_strided,
}
#: Tensor attributes that alias the tensor: an in-place op through ``y.data`` (fx records ``getattr(y, "data")``)
#: writes into ``y`` without autograd seeing it.
_VIEW_ATTRIBUTES = {"data", "T", "mT", "H", "mH", "real", "imag"}
_VIEW_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_INPLACE_OPERATORS = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
}

#: The residual adds ``convert_model`` fuses: ``a + b`` (fx records ``a += b`` on a traced tensor as
#: ``operator.add`` too), ``operator.iadd``, ``torch.add`` and the ``add`` / ``add_`` methods, alpha 1 only.
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}
_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
#: timm's stochastic-depth / DropBlock modules, recognised by class name (timm is not a dependency): an
#: identity exactly when their ``drop_prob`` is 0 (their forward then returns the input itself).
_DROP_PROB_MODULES = ("DropPath", "DropBlock2d")
# Producers whose output usually has another shape than the tensor it is added to (parameters and
# buffers, reductions, reshapes, pooling to a fixed size). An add with such an operand most likely
# broadcasts, which the fused layer refuses (its residual must have the input's exact shape) and which
# fx cannot rule out (a symbolic trace has no shapes), so such an add is not fused.
_BROADCAST_METHODS = {
    "view",
    "view_as",
    "reshape",
    "reshape_as",
    "flatten",
    "unflatten",
    "squeeze",
    "unsqueeze",
    "transpose",
    "t",
    "permute",
    "narrow",
    "select",
    "expand",
    "expand_as",
    "__getitem__",
    "repeat",
    "mean",
    "sum",
    "prod",
    "amax",
    "amin",
    "max",
    "min",
    "std",
    "var",
    "norm",
    "logsumexp",
    "new_zeros",
    "new_ones",
    "new_full",
    "new_empty",
    "new_tensor",
}
_BROADCAST_FUNCTIONS = {
    operator.getitem,
    torch.reshape,
    torch.flatten,
    torch.squeeze,
    torch.unsqueeze,
    torch.transpose,
    torch.permute,
    torch.narrow,
    torch.select,
    torch.t,
    torch.mean,
    torch.sum,
    torch.prod,
    torch.amax,
    torch.amin,
    torch.max,
    torch.min,
    torch.std,
    torch.var,
    torch.norm,
    torch.logsumexp,
    torch.zeros,
    torch.ones,
    torch.full,
    torch.tensor,
    torch.as_tensor,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
}
_BROADCAST_MODULES = (
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Flatten,
    nn.Unflatten,
)


#: The functional activations ``convert_model`` fuses, by their table name (their parameter argument is
#: named like the module attribute, ``ACTIVATIONS[name].param_attr``).
_FUNCTIONAL_ACTIVATIONS = {F.leaky_relu: "leaky_relu", F.elu: "elu"}


def _fusable(name: str, value: Any) -> tuple[str, float | None] | None:
    """``(name, param)`` of an activation found in the model, ``("relu", None)`` for slope 0, None if invalid."""
    try:
        name, param = resolve(name, value)
    except ValueError:  # a negative slope or alpha <= 0: not invertible, not fused
        return None
    return (name, param) if invertible(name, param) else ("relu", None)


def _passthrough(m: nn.Module) -> bool:
    """Whether module ``m`` returns its input unchanged in training and in eval, so its call can be dropped.

    ``nn.Identity``; a dropout with ``p == 0``; timm's ``DropPath`` / ``DropBlock2d`` with ``drop_prob == 0``.
    A dropout or drop path with a positive probability is not: it is the identity in eval only, and the
    graph is converted once for both modes (``act(drop(BN(x)) + r)`` is not ``act(BN(x) + r)`` in training).
    """
    if type(m) is nn.Identity:
        return True
    if type(m) in _DROPOUT_MODULES:
        return m.p == 0
    if type(m).__name__ in _DROP_PROB_MODULES:
        return getattr(m, "drop_prob", None) == 0
    return False


def _stochastic(m: nn.Module) -> bool:
    """A dropout / drop-path module with a positive probability (only the identity in eval)."""
    if type(m) in _DROPOUT_MODULES:
        return m.p != 0
    return type(m).__name__ in _DROP_PROB_MODULES and getattr(m, "drop_prob", 0) != 0


def _passthrough_chain(start: fx.Node, modules: dict[str, nn.Module]) -> tuple[list[fx.Node], fx.Node]:
    """(the pass-through module calls following ``start`` one after another as sole users, the last value)."""
    chain, out = [], start
    while len(out.users) == 1:
        user = next(iter(out.users))
        if (
            user.op == "call_module"
            and _passthrough(modules[user.target])
            and len(user.args) == 1
            and user.args[0] is out
            and not user.kwargs
        ):
            chain.append(user)
            out = user
        else:
            break
    return chain, out


def _add_operands(node: fx.Node) -> tuple[Any, Any, bool] | None:
    """``(a, b, in_place)`` when ``node`` computes ``a + b`` (``in_place``: written into ``a``), else None."""
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        in_place = node.target is operator.iadd
    elif node.op == "call_method" and node.target in _ADD_METHODS:
        in_place = node.target == "add_"
    else:
        return None
    kwargs = dict(node.kwargs)
    alpha = kwargs.pop("alpha", 1)
    if len(node.args) != 2 or kwargs or type(alpha) not in (int, float) or alpha != 1:
        return None  # alpha != 1 scales the other operand; out= writes elsewhere
    return node.args[0], node.args[1], in_place


def _relu_like(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[str, float | None] | None:
    """(name, param) of ``node`` if it is a ReLU / LeakyReLU / ELU applied to its first argument, else None.

    ``("relu", None)`` means the activation to substitute is the caller's choice."""
    if node.op == "call_module":
        m = modules[node.target]
        if type(m) is nn.ReLU:
            return "relu", None
        for act in ACTIVATIONS.values():
            if act.param_attr is not None and type(m) is act.module_type:
                return _fusable(act.name, getattr(m, act.param_attr))
        return None
    if len(node.args) < 1:
        return None
    if node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1 and not node.kwargs:
        return "relu", None
    if node.op != "call_function":
        return None
    if node.target in (F.relu, torch.relu, torch.relu_, F.relu_):
        return "relu", None
    name = _FUNCTIONAL_ACTIVATIONS.get(node.target)
    if name is not None:
        try:
            bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
        except (TypeError, ValueError):
            return None
        bound.apply_defaults()
        value = bound.arguments[ACTIVATIONS[name].param_attr]
        if not isinstance(value, (int, float)):
            return None
        return _fusable(name, value)
    return None


def _inplace_kwarg(node: fx.Node) -> inspect.BoundArguments | None:
    """The bound arguments of a call_function with ``inplace=True``, else None."""
    try:
        sig = inspect.signature(node.target)
    except (TypeError, ValueError):
        return None
    if "inplace" not in sig.parameters:
        return None
    try:
        bound = sig.bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    return bound if bound.arguments.get("inplace", False) is True else None


def _mutation(user: fx.Node, value: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """Whether ``user`` writes into ``value``: None (no), "rewritable" (has an out-of-place twin) or "yes"."""
    first = user.args[0] if user.args else None
    if user.op == "call_function":
        if user.target in _INPLACE_OPERATORS:
            return "rewritable" if first is value else None
        if user.target is operator.setitem:
            return "yes" if first is value else None
        if user.kwargs.get("out") is value:
            return "yes"
        if first is value and _inplace_kwarg(user) is not None:
            return "rewritable"
        name = getattr(user.target, "__name__", "")
        if first is value and name.endswith("_") and not name.endswith("__"):
            mod = getattr(user.target, "__module__", "") or ""
            home = F if "functional" in mod else torch
            return "rewritable" if callable(getattr(home, name[:-1], None)) else "yes"
        return None
    if user.op == "call_method":
        name = str(user.target)
        if first is value and name.endswith("_") and not name.endswith("__"):
            return "rewritable" if hasattr(torch.Tensor, name[:-1]) else "yes"
        return None
    if user.op == "call_module":
        module = modules[user.target]
        if first is value and isinstance(module, (InPlaceABN, InPlaceABNSync)):
            return "yes"  # an in-place ABN layer (already in the model, or converted) overwrites its input
        if first is value and getattr(module, "inplace", False) is True:
            return "rewritable"
    return None


def _calls_one_of(
    node: fx.Node,
    modules: dict[str, nn.Module],
    methods: Collection[str],
    functions: Collection[Any],
    module_types: tuple[type, ...],
) -> bool:
    """Whether ``node`` calls one of ``methods`` (names), ``functions`` or modules of ``module_types``."""
    if node.op == "call_method":
        return node.target in methods
    if node.op == "call_function":
        return node.target in functions
    if node.op == "call_module":
        return isinstance(modules[node.target], module_types)
    return False


def _is_view(user: fx.Node, value: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``user`` may return a tensor sharing memory with ``value`` (its first argument)."""
    if not user.args or user.args[0] is not value:
        return False
    if user.op == "call_function" and user.target is getattr:  # ``value.data`` and other aliasing attributes
        return len(user.args) > 1 and user.args[1] in _VIEW_ATTRIBUTES
    return _calls_one_of(user, modules, _VIEW_METHODS, _VIEW_FUNCTIONS, _VIEW_MODULES)


def _describe(node: fx.Node) -> str:
    """``"<op> <target>"``, for the report's reasons."""
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {target}"


def _rewrite_out_of_place(gm: fx.GraphModule, node: fx.Node, modules: dict[str, nn.Module]) -> None:
    """Turns an in-place op that :func:`_mutation` found ``"rewritable"`` into its out-of-place twin."""
    if node.op == "call_function" and node.target in _INPLACE_OPERATORS:
        node.target = _INPLACE_OPERATORS[node.target]
    elif node.op == "call_function" and _inplace_kwarg(node) is not None:
        bound = _inplace_kwarg(node)
        bound.arguments["inplace"] = False
        node.args, node.kwargs = tuple(bound.args), dict(bound.kwargs)
    elif node.op == "call_function":
        name = node.target.__name__
        home = F if "functional" in (getattr(node.target, "__module__", "") or "") else torch
        node.target = getattr(home, name[:-1])
    elif node.op == "call_method":
        node.target = node.target[:-1]
    elif node.op == "call_module":
        new_target = f"{node.target}_out_of_place"
        if new_target not in modules:
            twin = copy.deepcopy(modules[node.target])
            twin.inplace = False
            gm.add_submodule(new_target, twin)
            modules[new_target] = twin
        node.target = new_target


class _Tracer(fx.Tracer):
    """Keeps ABN-family layers (already in-place) and timm's DropPath / DropBlock2d as leaves.

    The drop modules branch on ``self.training``: traced through, the branch of the mode at conversion
    would be baked into the graph (a model converted in training would drop paths in eval too). As
    leaves they keep their mode dependence, and the analysis sees them (``_passthrough``, ``_stochastic``).
    """

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            isinstance(m, ABN)
            or type(m).__name__ in _DROP_PROB_MODULES
            or super().is_leaf_module(m, module_qualified_name)
        )


def _trace(module: nn.Module, concrete_args: dict[str, Any] | None) -> fx.GraphModule:
    """``module`` as an ``fx.GraphModule`` (ABN-family layers stay leaves); raises when untraceable."""
    tracer = _Tracer()
    graph = tracer.trace(module, concrete_args=concrete_args)
    name = module.__class__.__name__ if isinstance(module, nn.Module) else module.__name__
    return fx.GraphModule(tracer.root, graph, name)


def _input_problem(inp: Any, modules: dict[str, nn.Module]) -> tuple[str | None, fx.Node | None]:
    """(reason the BN input must not be overwritten or None, the producing node through nn.Identity)."""
    cur = inp
    while True:
        if not isinstance(cur, fx.Node):
            return "its input is not a traced tensor", None
        if len(cur.users) != 1:
            return "its input is also used elsewhere (it would be overwritten)", None
        if cur.op == "placeholder":
            return "its input is an input of the traced module (it would be overwritten)", None
        if cur.op == "call_module" and type(modules[cur.target]) is nn.Identity:
            cur = cur.args[0]
            continue
        fresh = (
            (cur.op == "call_module" and isinstance(modules[cur.target], _FRESH_MODULES))
            or (cur.op == "call_function" and cur.target in _FRESH_FUNCTIONS and not cur.kwargs.get("out"))
            or (cur.op == "call_method" and cur.target in _FRESH_METHODS)
        )
        if not fresh:
            return f"its input comes from {_describe(cur)}, which may alias it or keep it for backward", None
        return None, cur


def _output_problem(final: fx.Node, modules: dict[str, nn.Module]) -> tuple[str | None, list[fx.Node]]:
    """(reason the layer's output would be modified in place or None, the in-place users to rewrite)."""
    rewrites: list[fx.Node] = []
    stack, seen = [final], set()
    while stack:
        value = stack.pop()
        if value in seen:
            continue
        seen.add(value)
        for user in value.users:
            kind = _mutation(user, value, modules)
            if kind == "rewritable" and value is final and len(final.users) == 1:
                rewrites.append(user)
            elif kind is not None:
                return f"its output is modified in place by {_describe(user)}", []
            elif _is_view(user, value, modules):
                stack.append(user)
    return None, rewrites


def _aliases_first_arg(user: fx.Node, value: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``user``'s result may share memory with ``value``: a view of it, or an in-place op on it."""
    return _is_view(user, value, modules) or (
        bool(user.args) and user.args[0] is value and _mutation(user, value, modules) is not None
    )


def _alias_family(value: fx.Node, modules: dict[str, nn.Module], skip: fx.Node) -> set[fx.Node]:
    """``value``, the tensor it is a view of (through views / in-place ops) and every alias of that: the
    nodes an in-place op on which would also change ``value``. ``skip`` (the add being fused, which may
    write into ``value``) and what follows it are left out."""
    root = value
    while root.args and isinstance(root.args[0], fx.Node) and _aliases_first_arg(root, root.args[0], modules):
        root = root.args[0]
    family: set[fx.Node] = set()
    stack = [root]
    while stack:
        v = stack.pop()
        if v not in family:
            family.add(v)
            stack.extend(u for u in v.users if u is not skip and _aliases_first_arg(u, v, modules))
    return family


def _may_broadcast(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` is a producer whose output likely has another shape than what it is added to."""
    if node.op == "get_attr":
        return True
    return _calls_one_of(node, modules, _BROADCAST_METHODS, _BROADCAST_FUNCTIONS, _BROADCAST_MODULES)


def _source(node: fx.Node, prefix: str) -> str:
    """Where a tensor comes from, for the report: a module's qualified name, ``"input x"`` or the op."""
    if node.op == "call_module":
        return prefix + str(node.target)
    if node.op == "placeholder":
        return f"input {node.target}"
    return _describe(node)


class _Fusion(NamedTuple):
    """A BatchNorm -> residual add -> activation chain that becomes one ``layer(x, residual=...)`` call."""

    add: fx.Node
    residual: fx.Node
    chain: list[fx.Node]  # pass-through module calls between the add and the activation (removed too)
    act: fx.Node
    found: tuple[str, float | None]  # the activation, as _relu_like returns it


def _plan_fusion(bn: fx.Node, out: fx.Node, modules: dict[str, nn.Module]) -> tuple[_Fusion | None, str]:
    """The residual add (and activation) after a BatchNorm's output ``out`` that can be fused into the layer.

    ``out`` is the BatchNorm's output past its pass-through modules. Returns ``(fusion, "")``; or
    ``(None, reason)`` when an add follows but fusing would change the result or break backward; or
    ``(None, "")`` when no add follows (the layer then becomes what it is without residual fusion).
    """
    if len(out.users) != 1:
        return None, ""
    add = next(iter(out.users))
    if add.op == "call_module" and _stochastic(modules[add.target]) and len(add.users) == 1:
        if _add_operands(next(iter(add.users))) is not None:
            return None, (
                f"{type(modules[add.target]).__name__} between the BatchNorm and the add (not an identity in training)"
            )
        return None, ""
    operands = _add_operands(add)
    if operands is None:
        return None, ""
    a, b, in_place = operands
    if a is out and b is out:
        return None, "both operands of the add are the BatchNorm output"
    if a is not out and b is not out:
        return None, ""
    residual = b if a is out else a
    if not isinstance(residual, fx.Node):
        return None, "the other operand of the add is not a traced tensor"
    source = residual  # the producer past shape-keeping modules (identity, dropout, drop path)
    while (
        source.op == "call_module"
        and len(source.args) == 1
        and isinstance(source.args[0], fx.Node)
        and (_passthrough(modules[source.target]) or _stochastic(modules[source.target]))
    ):
        source = source.args[0]
    if _may_broadcast(source, modules):
        return None, (
            f"the other operand of the add comes from {_describe(source)} and may broadcast (the fused "
            "layer needs a residual of its input's shape)"
        )
    chain, end = _passthrough_chain(add, modules)
    if len(end.users) != 1:
        return None, f"the result of the add has {len(end.users)} users, not just an activation"
    act = next(iter(end.users))
    found = _relu_like(act, modules)
    if found is None or act.args[0] is not end or any(arg is end for arg in act.args[1:]):
        return None, f"no fusable ReLU / LeakyReLU / ELU follows the add ({_describe(act)})"
    # The layer overwrites its input: the residual must not be (an alias of) it, nor of its output.
    overwritten, cur = {bn, out, *chain}, bn.args[0]
    while isinstance(cur, fx.Node):
        overwritten.add(cur)
        if not (cur.op == "call_module" and type(modules[cur.target]) is nn.Identity):
            break
        cur = cur.args[0]
    family = _alias_family(residual, modules, add)
    if family & overwritten:
        return None, "the residual aliases the BatchNorm's input, which the fused layer overwrites"
    # The layer keeps the residual for backward (by reference): no later in-place op on it, or on an alias.
    # Autograd's version counter would catch one at backward; refusing here keeps the model working.
    order = {n: i for i, n in enumerate(bn.graph.nodes)}
    for member in family:
        for user in member.users:
            if user is add or order[user] < order[add]:
                continue
            if in_place and a is residual:
                return None, (
                    f"the add writes into the residual, which {_describe(user)} reads afterwards "
                    "(fused, it would see the value before the add)"
                )
            if _mutation(user, member, modules) is not None:
                return None, (
                    f"the residual is modified in place by {_describe(user)} after the add (the fused "
                    "layer keeps it for backward)"
                )
    return _Fusion(add, residual, chain, act, found), ""


def _set_module(root: nn.Module, target: str, new: nn.Module) -> None:
    """Sets the submodule of qualified name ``target`` (e.g. ``"layer1.0.bn1"``) of ``root`` to ``new``."""
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def _convert_graph(
    gm: fx.GraphModule,
    prefix: str,
    activation: str,
    activation_param: float,
    negative_weights: str,
    convert_identity: bool,
    fuse_residual: bool,
    report: ConversionReport,
) -> None:
    """Converts the BatchNorm modules of one traced graph in place, one :class:`LayerConversion` each."""
    modules = dict(gm.named_modules())
    graph = gm.graph
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    param_uses = Counter(id(p) for _, p in gm.named_parameters(remove_duplicate=False))
    for node in list(graph.nodes):
        if node.op != "call_module" or type(modules.get(node.target)) not in _BN_TYPES:
            continue
        bn = modules[node.target]
        entry = LayerConversion(name=prefix + node.target)
        report.layers.append(entry)
        if calls[node.target] > 1:
            entry.reason = f"the module is called {calls[node.target]} times"
            continue
        if len(node.args) != 1 or node.kwargs:
            entry.reason = "unexpected call signature"
            continue
        entry.reason, producer = _input_problem(node.args[0], modules)
        if entry.reason:
            continue
        # Follow pass-through modules (e.g. timm's drop_block / aa, nn.Identity) to the activation, if any.
        chain, out = _passthrough_chain(node, modules)
        act_node, act, fusion = None, None, None
        if len(out.users) == 1:
            user = next(iter(out.users))
            found = _relu_like(user, modules)
            if found is not None and user.args[0] is out and all(a is not out for a in user.args[1:]):
                act_node = user
            elif fuse_residual:  # BN -> add(residual) -> activation: one fused layer(x, residual=...) call
                fusion, entry.not_fused = _plan_fusion(node, out, modules)
                if fusion is not None:
                    act_node, found = fusion.act, fusion.found
            if act_node is not None:
                act = (activation, activation_param) if found[1] is None else found
                entry.source = (
                    type(modules[act_node.target]).__name__ if act_node.op == "call_module" else _describe(act_node)
                )
        if act is None:
            if not convert_identity:
                entry.reason = "no activation follows (convert_identity=False)"
                continue
            act = ("identity", 0.0)
        entry.reason, rewrites = _output_problem(act_node if act_node is not None else out, modules)
        if entry.reason:
            continue
        # Weights: the layer scales by |w| + eps, so w_bn must be >= eps (a negative one is folded or kept).
        eps = float(bn.eps)
        fold_mask = None
        # Meta weights (memory_report's models) have no values: treated as >= eps (as at initialisation),
        # so no fold and no clamp; the layer structure, and so the memory, is that of an untrained model.
        if bn.affine and not bn.weight.is_meta:
            w_bn = bn.weight.detach()
            negative = w_bn < 0
            n_neg = int(negative.sum())
            if n_neg:
                foldable = (
                    producer is not None
                    and producer.op == "call_module"
                    and type(modules[producer.target]) in _FOLDABLE
                    and calls[producer.target] == 1
                    and all(param_uses[id(p)] == 1 for p in modules[producer.target].parameters())
                )
                if negative_weights == "keep" or (negative_weights == "fold" and not foldable):
                    entry.reason = f"{n_neg} negative weights" + (
                        ""
                        if negative_weights == "keep"
                        else f" and its producer ({_describe(producer)}) cannot absorb the sign"
                    )
                    continue
                if foldable:
                    fold_mask = negative
        # --- apply -----------------------------------------------------------------------------------------
        state = bn.state_dict()
        if fold_mask is not None:
            conv = modules[producer.target]
            sign = torch.where(fold_mask, -1.0, 1.0).to(conv.weight.dtype)
            with torch.no_grad():
                conv.weight.mul_(sign.view(-1, *([1] * (conv.weight.dim() - 1))))
                if conv.bias is not None:
                    conv.bias.mul_(sign)
            if state.get("running_mean") is not None:
                state["running_mean"] = torch.where(fold_mask, -state["running_mean"], state["running_mean"])
            state["weight"] = torch.where(fold_mask, -state["weight"], state["weight"])
            entry.folded = int(fold_mask.sum())
        if bn.affine and not bn.weight.is_meta:
            w_bn = state["weight"]
            new_w = (w_bn - eps).clamp_min(0)
            below = w_bn < eps
            entry.clamped = int(below.sum())
            if entry.clamped:
                entry.max_scale_change = float(((new_w.abs() + eps) - w_bn).abs().max())
                if bool((w_bn < 0).any()):
                    warnings.warn(
                        f"convert_model: {entry.name}: {int((w_bn < 0).sum())} negative BatchNorm weights "
                        f"clamped to |0| + eps (negative_weights='clamp'); the layer's output changes",
                        RuntimeWarning,
                        stacklevel=3,
                    )
            state["weight"] = new_w
        cls = _BN_TYPES[type(bn)]
        extra = {"group": bn.process_group} if cls is InPlaceABNSync else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the relu (non-invertible) notice, documented here
            layer = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, *act, **extra)
        _copy_state(bn, layer, state)
        _set_module(gm, node.target, layer)
        modules[node.target] = layer
        if fusion is not None:
            # One call where the activation was: its operands (the BN input, the residual) exist by then,
            # and the BN input, used by nothing else, is unchanged until then.
            with graph.inserting_before(fusion.act):
                fused = graph.call_module(node.target, (node.args[0],), {"residual": fusion.residual})
            fused.meta = dict(node.meta)
            fusion.act.replace_all_uses_with(fused)
            for dead in [fusion.act, *reversed(fusion.chain), fusion.add, *reversed(chain), node]:
                graph.erase_node(dead)
            entry.residual = _source(fusion.residual, prefix)
        elif act_node is not None:
            act_node.replace_all_uses_with(act_node.args[0])
            graph.erase_node(act_node)
        if fusion is None:
            for ident in reversed(chain):
                ident.replace_all_uses_with(ident.args[0])
                graph.erase_node(ident)
        for user in rewrites:
            _rewrite_out_of_place(gm, user, modules)
        entry.converted, entry.reason = True, ""
        entry.activation, entry.activation_param = resolve(*act) if act[0] != "relu" else ("relu", 0.0)
    graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()


def _convert_tree(
    module: nn.Module,
    prefix: str,
    concrete_args: dict[str, Any] | None,
    options: tuple[str, float, str, bool, bool],
    report: ConversionReport,
) -> nn.Module:
    """Converts ``module`` as a whole if it traces, else each of its children (recursively)."""
    try:
        gm = _trace(module, concrete_args)
    except Exception as exc:  # untraceable control flow, data-dependent shapes, ...: convert the children
        report.untraced.append(f"{prefix.rstrip('.') or module.__class__.__name__} ({type(exc).__name__})")
        for name, child in module.named_children():
            new = _convert_tree(child, prefix + name + ".", None, options, report)
            if new is not child:
                setattr(module, name, new)
        return module
    if not any(type(m) in _BN_TYPES for m in gm.modules()):
        return module  # nothing to do here: keep the original class (and any attribute fx dropped)
    _convert_graph(gm, prefix, *options, report)
    return gm.train(module.training)


def _stock_max_pool(m: nn.Module) -> bool:
    return type(m) is nn.MaxPool2d and not m.return_indices


def _recompute_max_pool(m: nn.MaxPool2d) -> RecomputeMaxPool2d:
    return RecomputeMaxPool2d(m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode).train(m.training)


def convert_model(
    model: nn.Module,
    activation: str = "leaky_relu",
    activation_param: float = 0.01,
    *,
    negative_weights: str = "fold",
    convert_identity: bool = True,
    fuse_residual: bool = True,
    recompute_max_pool: bool = True,
    concrete_args: dict[str, Any] | None = None,
    return_report: bool = False,
) -> nn.Module | tuple[nn.Module, ConversionReport]:
    """Turns the BatchNorm (-> activation) pairs of an existing network into In-Place ABN layers.

    The model is traced with ``torch.fx`` so the real dataflow is analysed, not the module tree. A copy is
    converted (``model`` is untouched); the result is an ``fx.GraphModule`` (an ordinary ``nn.Module`` that
    trains, saves and loads; parameter / buffer names are unchanged, so its state dict has the original
    keys) in the mode of ``model``. Convert after loading pretrained weights. Untraceable models: every
    traceable submodule is converted instead and the rest is listed in the report (``untraced``); a module
    whose forward needs constant arguments can be traced with ``concrete_args``.

    What is converted. An ``nn.BatchNorm1d/2d/3d`` module (exact type; ``nn.SyncBatchNorm`` ->
    ``InPlaceABNSync``) called once in the graph becomes ``InPlaceABN``:

    * followed (through pass-through modules: ``nn.Identity``, dropout with ``p=0``, timm's ``DropPath`` /
      ``DropBlock2d`` with ``drop_prob=0``) by an activation that is its only user -- ``nn.ReLU``, ``F.relu``,
      ``torch.relu``, ``.relu()`` (inplace or not), ``nn.LeakyReLU`` / ``F.leaky_relu`` (slope >= 0),
      ``nn.ELU`` / ``F.elu`` -- that call is removed *at that place only*; an activation module reused
      elsewhere (torchvision's ``Bottleneck.relu``, used 3 times) keeps working elsewhere. ReLU becomes
      ``(activation, activation_param)``; LeakyReLU and ELU keep their own parameter (exact).
    * followed (through pass-through modules) by a residual add whose only user is such an activation
      (post-activation ResNets: torchvision's ``out += identity; out = self.relu(out)``, timm's ``x +=
      shortcut; x = self.act3(x)``) -- fused (``fuse_residual=True``, default): the add and the activation
      are removed and the layer is called as ``layer(x, residual=other_operand)``, computing
      ``act(BN(x) + residual)`` and keeping only its output (the residual by reference: the block input
      or the shortcut's output, which autograd keeps anyway) -- one activation per block less than an
      identity layer before the add. The add may be ``a + b`` / ``a += b`` in either operand order,
      ``torch.add`` / ``operator.add`` / ``operator.iadd``, ``.add()`` / ``.add_()`` (alpha 1); the residual
      may come through any module (e.g. a projection shortcut, ``drop_path(shortcut)``). As above, a ReLU
      after the add becomes ``(activation, activation_param)``: **with the default the block's final
      ReLU becomes leaky_relu(0.01) too**. Not fused (the report's ``not_fused`` says why; the BN then
      becomes an identity layer before the add, as with ``fuse_residual=False``) when the add's result
      has other users; when the residual may alias the BN input, or it (or an alias) is modified in place
      after the add (the layer keeps it for backward); when the other operand is a constant, a
      parameter / buffer or comes from a reduction / reshape / adaptive pooling (it likely broadcasts,
      and the fused layer needs a residual of its input's exact shape -- fx has no shapes to check; a
      broadcasting add from another op raises at the first forward: convert with ``fuse_residual=False``);
      and when a dropout / drop path with a positive probability sits between the BN and the add (the
      identity only in eval).
    * otherwise (e.g. ``downsample``'s BN, or ``bn3`` with ``fuse_residual=False``):
      ``activation="identity"`` (disable with ``convert_identity=False``). Such a layer saves memory only
      where its consumer keeps its input for backward (e.g. SiLU, a conv); before an add it is neutral.

    What is kept as BatchNorm (each with its reason in the report), because the in-place layer overwrites
    its input and keeps its output for backward:

    * its input is used by anything else, is a model input, or comes from an op that may alias it or keep
      it for backward (only outputs of conv / linear / pooling / interpolate / add / sub / mul / div / cat
      are overwritten);
    * its output (or a view of it) is modified in place and that cannot be made out of place. An in-place
      op that is the only user of the output (``out += identity``, ``add_``, ``ReLU(inplace=True)`` after an
      identity layer, ``F.silu(x, inplace=True)``) is rewritten to its out-of-place twin in the graph
      (``fx`` tracing already turns ``out += x`` into ``out + x``), which costs one extra allocation but no
      saved memory; otherwise the BN is kept;
    * the module is called more than once (shared BN), or has negative weights that cannot be folded.

    Weights. The layer scales by ``|w| + eps``, so ``w = w_bn - eps`` is exact for ``w_bn >= eps``. Channels
    with ``0 <= w_bn < eps`` get ``w = 0`` (scale ``eps`` instead of ``w_bn``: a change below ``eps * |x_hat|``).
    A negative ``w_bn`` cannot be represented; ``negative_weights`` says what to do:

    * ``"fold"`` (default): negate those output channels of the producing ``nn.Conv1d/2d/3d`` / ``nn.Linear``
      (weight and bias) and of the BN's running mean and weight -- exact in eval and in training (batch
      statistics flip sign with the input); if the producer is not such a module (or is shared), keep the BN.
    * ``"keep"``: keep any BN with a negative weight.
    * ``"clamp"``: fold where possible, else clamp to ``w = 0`` with a ``RuntimeWarning`` (output changes).

    The report gives per layer the folded / clamped channel counts and the largest scale change.

    What changes in the function. ``activation="leaky_relu"`` (default, slope 0.01) replaces ``max(x, 0)`` by
    ``leaky_relu(x, 0.01)``: negative pre-activations now pass with slope 0.01, so a pretrained ReLU network
    gives (slightly) different outputs and should be fine-tuned; this invertible activation is what lets the
    layer keep only its output. ``activation="relu"`` keeps exact ReLU semantics (outputs equal to the
    original up to rounding and clamped weights), but a ReLU layer keeps its pre-activation for backward
    and saves no memory (the layer's one-time RuntimeWarning about this is silenced here). Both apply to
    the ReLU after a fused residual add as well (it was left a ReLU before residual fusion existed).
    Training-mode behaviour (batch statistics, running-stat updates, momentum, eps) is that of the
    BatchNorm; a fused layer's statistics are those of its input alone, as the BatchNorm's were.
    :func:`~inplace_abn.convert.to_batchnorm` turns a fused layer back into BatchNorm + add + activation.

    Max pooling (``recompute_max_pool=True``, default): every ``nn.MaxPool2d`` module (without
    ``return_indices``) becomes :class:`~inplace_abn.RecomputeMaxPool2d`, which keeps only its input for
    backward and recomputes the argmax there; outputs and gradients are unchanged. ``nn.MaxPool2d`` keeps
    its input and int64 indices: after an In-Place ABN layer (resnet50's stem), whose output is kept anyway,
    the indices are all it adds (1.6 MB per sample at 224x224). Functional ``F.max_pool2d`` calls stay.

    Args:
        model: The network (any ``nn.Module``).
        activation: ``"leaky_relu"``, ``"elu"`` or ``"relu"``: what a ReLU becomes.
        activation_param: Its slope / alpha.
        negative_weights: ``"fold"``, ``"keep"`` or ``"clamp"`` (above).
        convert_identity: Also convert BNs not followed by an activation (identity layers).
        fuse_residual: Fuse BN -> residual add -> activation into one layer called with ``residual=``.
        recompute_max_pool: Replace ``nn.MaxPool2d`` modules by :class:`~inplace_abn.RecomputeMaxPool2d`.
        concrete_args: Passed to ``torch.fx`` tracing of the top-level module.
        return_report: Also return a :class:`ConversionReport`.

    Returns:
        The converted module, or ``(module, report)``.
    """
    name, _ = resolve(activation, activation_param)
    if name == "identity":
        raise ValueError("activation must be 'leaky_relu', 'elu' or 'relu' (what a ReLU becomes), not identity")
    if negative_weights not in ("fold", "keep", "clamp"):
        raise ValueError(f"negative_weights must be 'fold', 'keep' or 'clamp', got {negative_weights!r}")
    report = ConversionReport()
    options = (activation, activation_param, negative_weights, convert_identity, bool(fuse_residual))
    result = _convert_tree(copy.deepcopy(model), "", concrete_args, options, report)
    if recompute_max_pool:
        report.max_pools = [name for name, m in result.named_modules() if _stock_max_pool(m)]
        result = _swap(result, lambda m: _recompute_max_pool(m) if _stock_max_pool(m) else None)
    if report.untraced:
        warnings.warn(
            f"convert_model: could not trace {report.untraced}; converted their traceable submodules "
            "only (see ConversionReport.untraced)",
            RuntimeWarning,
            stacklevel=2,
        )
    return (result, report) if return_report else result
