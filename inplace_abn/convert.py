"""Model conversion helpers.

* :func:`convert_sync` / :func:`convert_local`: swap local <-> synchronised In-Place ABN layers (exact).
* :func:`to_batchnorm`: ABN-family layers -> ``nn.BatchNorm`` + activation module (deployment / export).
* :func:`convert_model`: the BatchNorm -> activation pairs of an existing network -> In-Place ABN layers,
  found in the real dataflow with ``torch.fx`` (shared activation modules, residual adds, aliasing).
* :func:`load_inplace_abn_v1_state_dict`: load checkpoints written by the original inplace-abn 1.1.0.
"""

from __future__ import annotations

import copy
import inspect
import operator
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .abn import ABN, InPlaceABN, InPlaceABNSync
from .functions import check_activation

__all__ = [
    "convert_sync",
    "convert_local",
    "to_batchnorm",
    "BatchNormNd",
    "convert_model",
    "ConversionReport",
    "LayerConversion",
    "load_inplace_abn_v1_state_dict",
]


def _copy_state(src: nn.Module, dst: nn.Module) -> nn.Module:
    """Gives ``dst`` the device, dtypes, state and train/eval mode of ``src`` (bit-exact)."""
    for name, t in list(src.named_parameters(recurse=False)) + list(src.named_buffers(recurse=False)):
        target = getattr(dst, name)
        if t is not None and target is not None:
            # move first, then load: loading into float32 and casting afterwards would round float64 state
            target.data = target.data.to(device=t.device, dtype=t.dtype)
    with torch.no_grad():
        dst.load_state_dict(src.state_dict())
    return dst.train(src.training)


def _swap(module: nn.Module, make) -> nn.Module:
    replacement = make(module)
    if replacement is not None:
        return replacement
    for name, child in module.named_children():
        new_child = _swap(child, make)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def _args(m: InPlaceABN) -> tuple:
    return (m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, m.activation, m.activation_param)


def convert_sync(module: nn.Module, group: Optional[Any] = None) -> nn.Module:
    """Replaces every :class:`InPlaceABN` in ``module`` by an :class:`InPlaceABNSync` (state kept).

    Like ``nn.SyncBatchNorm.convert_sync_batchnorm``: returns the converted module (the same object,
    changed in place, unless ``module`` itself is an ``InPlaceABN``).

    Args:
        module: A model, or a single layer.
        group: Process group of the new layers (None = the default group).
    """

    def make(m: nn.Module) -> Optional[nn.Module]:
        if type(m) is InPlaceABN:
            return _copy_state(m, InPlaceABNSync(*_args(m), group=group))
        return None

    return _swap(module, make)


def convert_local(module: nn.Module) -> nn.Module:
    """Replaces every :class:`InPlaceABNSync` in ``module`` by a local :class:`InPlaceABN` (state kept).

    The reverse of :func:`convert_sync`, e.g. for single-process evaluation or export.
    """

    def make(m: nn.Module) -> Optional[nn.Module]:
        if type(m) is InPlaceABNSync:
            return _copy_state(m, InPlaceABN(*_args(m)))
        return None

    return _swap(module, make)


# ----------------------------------------------------------------------------------------------------------
# In-Place ABN -> nn.BatchNorm + activation
# ----------------------------------------------------------------------------------------------------------


class BatchNormNd(nn.modules.batchnorm._BatchNorm):
    """``nn.BatchNorm`` for any (N, C, *) input with at least 2 dimensions (what ABN layers accept).

    Same parameters, buffers, state dict and arithmetic as ``nn.BatchNorm1d/2d/3d``; only the input-rank
    check differs. Used by :func:`to_batchnorm` with ``dims=None``.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of shape (N, C, *) with at least 2 dims (got {input.dim()}D input)")


_BN_BY_DIMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d, None: BatchNormNd}


def _activation_module(activation: str, param: float) -> nn.Module:
    name, param = check_activation(activation, param)
    if name == "leaky_relu":
        return nn.ReLU(inplace=True) if param == 0.0 else nn.LeakyReLU(param, inplace=True)
    if name == "elu":
        return nn.ELU(param, inplace=True)
    return nn.Identity()


def to_batchnorm(module: nn.Module, dims: Optional[int] = 2) -> nn.Module:
    """Replaces every ABN-family layer by ``nn.Sequential(nn.BatchNorm*, activation)`` with equal outputs.

    :class:`InPlaceABN` and :class:`InPlaceABNSync` scale by ``|weight| + eps``, so the new BatchNorm gets
    ``weight = |w| + eps``; :class:`ABN` scales by the raw weight, which is copied unchanged. Bias, running
    statistics, ``num_batches_tracked``, eps, momentum, affine, track_running_stats, dtype, device and the
    train/eval mode are kept, so eval outputs are equal up to float rounding (the fused kernels and
    ``F.batch_norm`` round differently) and training continues with plain BatchNorm semantics.
    The activation becomes ``nn.LeakyReLU(slope)`` (``nn.ReLU`` for slope 0 / ``"relu"``), ``nn.ELU(alpha)``
    or ``nn.Identity()``, all with ``inplace=True`` (safe: BatchNorm's output is a fresh tensor). The sync
    layer becomes a local BatchNorm (use ``nn.SyncBatchNorm.convert_sync_batchnorm`` afterwards if needed).

    State-dict keys move from ``<name>.weight`` to ``<name>.0.weight`` (the BatchNorm is item 0).
    Like :func:`convert_sync`, ``module`` is changed in place and returned (a new module is returned only
    when ``module`` itself is an ABN layer).

    Args:
        module: A model or a single layer.
        dims: The BatchNorm class: 1, 2 (default) or 3 for ``nn.BatchNorm1d/2d/3d`` -- these check the input
            rank, so pick the one matching your data (``BatchNorm1d`` takes (N, C) and (N, C, L)) -- or None
            for :class:`BatchNormNd`, which accepts every rank like the ABN layers do.
    """
    if dims not in _BN_BY_DIMS:
        raise ValueError(f"dims must be 1, 2, 3 or None, got {dims!r}")
    bn_cls = _BN_BY_DIMS[dims]

    def make(m: nn.Module) -> Optional[nn.Module]:
        if not isinstance(m, ABN):
            return None
        bn = bn_cls(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
        _copy_state(m, bn)
        if m.affine and isinstance(m, (InPlaceABN, InPlaceABNSync)):
            with torch.no_grad():
                bn.weight.copy_(m.weight.detach().abs() + m.eps)
        act = _activation_module(m.activation, m.activation_param)
        return nn.Sequential(bn, act).train(m.training)

    return _swap(module, make)


# ----------------------------------------------------------------------------------------------------------
# nn.BatchNorm (+ activation) -> In-Place ABN
# ----------------------------------------------------------------------------------------------------------


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
    """

    name: str
    converted: bool = False
    activation: Optional[str] = None
    activation_param: Optional[float] = None
    source: Optional[str] = None
    reason: str = ""
    folded: int = 0
    clamped: int = 0
    max_scale_change: float = 0.0


@dataclass
class ConversionReport:
    """The per-layer result of :func:`convert_model` (``return_report=True``)."""

    layers: List[LayerConversion] = field(default_factory=list)
    untraced: List[str] = field(default_factory=list)

    @property
    def converted(self) -> List[LayerConversion]:
        return [layer for layer in self.layers if layer.converted]

    @property
    def kept(self) -> List[LayerConversion]:
        return [layer for layer in self.layers if not layer.converted]

    def counts(self) -> Dict[str, int]:
        """Converted layers per activation (e.g. ``{"leaky_relu": 33, "identity": 20}``)."""
        return dict(Counter(layer.activation for layer in self.converted))

    def kept_reasons(self) -> Dict[str, int]:
        return dict(Counter(layer.reason for layer in self.kept))

    def summary(self) -> str:
        lines = [f"{len(self.layers)} BatchNorm layers: {len(self.converted)} converted {self.counts()}, "
                 f"{len(self.kept)} kept"]
        lines += [f"  kept x{n}: {reason}" for reason, n in self.kept_reasons().items()]
        folded, clamped = sum(x.folded for x in self.layers), sum(x.clamped for x in self.layers)
        if folded or clamped:
            lines.append(f"  weights: {folded} negative channels folded into the previous layer, {clamped} "
                         f"channels below eps clamped (max scale change "
                         f"{max(x.max_scale_change for x in self.layers):.3g})")
        if self.untraced:
            lines.append(f"  not traceable (only their traceable submodules were converted): {self.untraced}")
        return "\n".join(lines)


_BN_TYPES = {nn.BatchNorm1d: InPlaceABN, nn.BatchNorm2d: InPlaceABN, nn.BatchNorm3d: InPlaceABN,
             nn.SyncBatchNorm: InPlaceABNSync}
# Producers whose output is a fresh tensor that autograd does not keep: safe for an in-place layer to overwrite.
_FRESH_MODULES = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear,
    nn.Upsample, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
)
_FRESH_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul, torch.div,
    torch.cat, torch.concat, torch.matmul, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
    F.conv_transpose3d, F.linear, F.interpolate, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
}
_FRESH_METHODS = {"add", "sub", "mul", "div", "matmul"}
_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)  # weight (out, ...), bias (out,)
# Ops whose result may share memory with their first argument (an in-place op on it reaches the layer's output).
_VIEW_METHODS = {
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze", "transpose", "t",
    "permute", "narrow", "select", "expand", "expand_as", "chunk", "split", "unbind", "contiguous", "detach",
    "movedim", "swapaxes", "as_strided", "unfold", "to", "type_as", "float", "type", "__getitem__",
}
_VIEW_FUNCTIONS = {
    operator.getitem, torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.transpose, torch.permute,
    torch.narrow, torch.select, torch.chunk, torch.split, torch.unbind, torch.movedim, torch.swapaxes, torch.t,
    torch.detach, torch.as_strided,
}
_VIEW_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_INPLACE_OPERATORS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                      operator.itruediv: operator.truediv}


def _relu_like(node: fx.Node, modules: Dict[str, nn.Module]) -> Optional[Tuple[str, Optional[float]]]:
    """(name, param) of ``node`` if it is a ReLU / LeakyReLU / ELU applied to its first argument, else None.

    ``("relu", None)`` means the activation to substitute is the caller's choice."""
    if node.op == "call_module":
        m = modules[node.target]
        if type(m) is nn.ReLU:
            return "relu", None
        if type(m) is nn.LeakyReLU and m.negative_slope >= 0:
            return ("relu", None) if m.negative_slope == 0 else ("leaky_relu", float(m.negative_slope))
        if type(m) is nn.ELU and m.alpha > 0:
            return "elu", float(m.alpha)
        return None
    if len(node.args) < 1:
        return None
    if node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1 and not node.kwargs:
        return "relu", None
    if node.op != "call_function":
        return None
    if node.target in (F.relu, torch.relu, torch.relu_, F.relu_):
        return "relu", None
    if node.target in (F.leaky_relu, F.elu):
        try:
            bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
        except (TypeError, ValueError):
            return None
        bound.apply_defaults()
        key = "negative_slope" if node.target is F.leaky_relu else "alpha"
        value = bound.arguments[key]
        if not isinstance(value, (int, float)):
            return None
        if node.target is F.leaky_relu:
            return None if value < 0 else (("relu", None) if value == 0 else ("leaky_relu", float(value)))
        return ("elu", float(value)) if value > 0 else None
    return None


def _inplace_kwarg(node: fx.Node) -> Optional[inspect.BoundArguments]:
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


def _mutation(user: fx.Node, value: fx.Node, modules: Dict[str, nn.Module]) -> Optional[str]:
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
        if first is value and getattr(modules[user.target], "inplace", False) is True:
            return "rewritable"
    return None


def _is_view(user: fx.Node, value: fx.Node, modules: Dict[str, nn.Module]) -> bool:
    if not user.args or user.args[0] is not value:
        return False
    if user.op == "call_method":
        return user.target in _VIEW_METHODS
    if user.op == "call_function":
        return user.target in _VIEW_FUNCTIONS
    if user.op == "call_module":
        return isinstance(modules[user.target], _VIEW_MODULES)
    return False


def _describe(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {target}"


def _rewrite_out_of_place(gm: fx.GraphModule, node: fx.Node, modules: Dict[str, nn.Module]) -> None:
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
    """Keeps ABN-family layers (already in-place) as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, ABN) or super().is_leaf_module(m, module_qualified_name)


def _trace(module: nn.Module, concrete_args: Optional[Dict[str, Any]]) -> fx.GraphModule:
    tracer = _Tracer()
    graph = tracer.trace(module, concrete_args=concrete_args)
    name = module.__class__.__name__ if isinstance(module, nn.Module) else module.__name__
    return fx.GraphModule(tracer.root, graph, name)


def _input_problem(inp: Any, modules: Dict[str, nn.Module]) -> Tuple[Optional[str], Optional[fx.Node]]:
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


def _output_problem(final: fx.Node, modules: Dict[str, nn.Module]) -> Tuple[Optional[str], List[fx.Node]]:
    """(reason the layer's output would be modified in place or None, the in-place users to rewrite)."""
    rewrites: List[fx.Node] = []
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


def _set_module(root: nn.Module, target: str, new: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def _convert_graph(gm: fx.GraphModule, prefix: str, activation: str, activation_param: float,
                   negative_weights: str, convert_identity: bool, report: ConversionReport) -> None:
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
        # Follow pass-through nn.Identity modules (e.g. timm's drop_block / aa) to the activation, if any.
        chain, out = [], node
        while len(out.users) == 1:
            user = next(iter(out.users))
            if user.op == "call_module" and type(modules[user.target]) is nn.Identity and user.args[0] is out:
                chain.append(user)
                out = user
            else:
                break
        act_node, act = None, None
        if len(out.users) == 1:
            user = next(iter(out.users))
            found = _relu_like(user, modules)
            if found is not None and user.args[0] is out and all(a is not out for a in user.args[1:]):
                act_node = user
                act = (activation, activation_param) if found[1] is None else found
                entry.source = (type(modules[user.target]).__name__ if user.op == "call_module"
                                else _describe(user))
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
        if bn.affine:
            w_bn = bn.weight.detach()
            negative = w_bn < 0
            n_neg = int(negative.sum())
            if n_neg:
                foldable = (
                    producer is not None and producer.op == "call_module"
                    and type(modules[producer.target]) in _FOLDABLE and calls[producer.target] == 1
                    and all(param_uses[id(p)] == 1 for p in modules[producer.target].parameters())
                )
                if negative_weights == "keep" or (negative_weights == "fold" and not foldable):
                    entry.reason = (f"{n_neg} negative weights" + ("" if negative_weights == "keep" else
                                    f" and its producer ({_describe(producer)}) cannot absorb the sign"))
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
        if bn.affine:
            w_bn = state["weight"]
            new_w = (w_bn - eps).clamp_min(0)
            below = w_bn < eps
            entry.clamped = int(below.sum())
            if entry.clamped:
                entry.max_scale_change = float(((new_w.abs() + eps) - w_bn).abs().max())
                if bool((w_bn < 0).any()):
                    warnings.warn(f"convert_model: {entry.name}: {int((w_bn < 0).sum())} negative BatchNorm weights "
                                  f"clamped to |0| + eps (negative_weights='clamp'); the layer's output changes",
                                  RuntimeWarning, stacklevel=3)
            state["weight"] = new_w
        cls = _BN_TYPES[type(bn)]
        extra = {"group": bn.process_group} if cls is InPlaceABNSync else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the relu (non-invertible) notice, documented here
            layer = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, *act, **extra)
        for name, t in list(bn.named_parameters(recurse=False)) + list(bn.named_buffers(recurse=False)):
            target = getattr(layer, name)
            if t is not None and target is not None:
                target.data = target.data.to(device=t.device, dtype=t.dtype)
        with torch.no_grad():
            layer.load_state_dict(state)
        layer.train(bn.training)
        _set_module(gm, node.target, layer)
        modules[node.target] = layer
        if act_node is not None:
            act_node.replace_all_uses_with(act_node.args[0])
            graph.erase_node(act_node)
        for ident in reversed(chain):
            ident.replace_all_uses_with(ident.args[0])
            graph.erase_node(ident)
        for user in rewrites:
            _rewrite_out_of_place(gm, user, modules)
        entry.converted, entry.reason = True, ""
        entry.activation, entry.activation_param = check_activation(*act) if act[0] != "relu" else ("relu", 0.0)
    graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()


def _convert_tree(module: nn.Module, prefix: str, concrete_args, options, report: ConversionReport) -> nn.Module:
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


def convert_model(
    model: nn.Module,
    activation: str = "leaky_relu",
    activation_param: float = 0.01,
    *,
    negative_weights: str = "fold",
    convert_identity: bool = True,
    concrete_args: Optional[Dict[str, Any]] = None,
    return_report: bool = False,
) -> Union[nn.Module, Tuple[nn.Module, ConversionReport]]:
    """Turns the BatchNorm (-> activation) pairs of an existing network into In-Place ABN layers.

    The model is traced with ``torch.fx`` so the real dataflow is analysed, not the module tree. A copy is
    converted (``model`` is untouched); the result is an ``fx.GraphModule`` (an ordinary ``nn.Module`` that
    trains, saves and loads; parameter / buffer names are unchanged, so its state dict has the original
    keys) in the mode of ``model``. Convert after loading pretrained weights. Untraceable models: every
    traceable submodule is converted instead and the rest is listed in the report (``untraced``); a module
    whose forward needs constant arguments can be traced with ``concrete_args``.

    What is converted. An ``nn.BatchNorm1d/2d/3d`` module (exact type; ``nn.SyncBatchNorm`` ->
    ``InPlaceABNSync``) called once in the graph becomes ``InPlaceABN``:

    * followed (through ``nn.Identity`` pass-throughs) by an activation that is its only user --
      ``nn.ReLU``, ``F.relu``, ``torch.relu``, ``.relu()`` (inplace or not), ``nn.LeakyReLU`` / ``F.leaky_relu``
      (slope >= 0), ``nn.ELU`` / ``F.elu`` -- that call is removed *at that place only*; an activation module
      reused elsewhere (torchvision's ``Bottleneck.relu``, used 3 times) keeps working elsewhere, e.g. after
      the residual add. ReLU becomes ``(activation, activation_param)``; LeakyReLU and ELU keep their own
      parameter (exact).
    * otherwise (e.g. ``bn3`` / ``downsample`` before a residual add): ``activation="identity"`` (disable
      with ``convert_identity=False``). Such a layer saves memory only where its consumer keeps its input
      for backward (e.g. SiLU, a conv); before an add it is neutral.

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
    and saves no memory (the layer's one-time RuntimeWarning about this is silenced here). Training-mode
    behaviour (batch statistics, running-stat updates, momentum, eps) is that of the BatchNorm.

    Args:
        model: The network (any ``nn.Module``).
        activation: ``"leaky_relu"``, ``"elu"`` or ``"relu"``: what a ReLU becomes.
        activation_param: Its slope / alpha.
        negative_weights: ``"fold"``, ``"keep"`` or ``"clamp"`` (above).
        convert_identity: Also convert BNs not followed by an activation (identity layers).
        concrete_args: Passed to ``torch.fx`` tracing of the top-level module.
        return_report: Also return a :class:`ConversionReport`.

    Returns:
        The converted module, or ``(module, report)``.
    """
    name, _ = check_activation(activation, activation_param)
    if name == "identity":
        raise ValueError("activation must be 'leaky_relu', 'elu' or 'relu' (what a ReLU becomes), not identity")
    if negative_weights not in ("fold", "keep", "clamp"):
        raise ValueError(f"negative_weights must be 'fold', 'keep' or 'clamp', got {negative_weights!r}")
    report = ConversionReport()
    options = (activation, activation_param, negative_weights, convert_identity)
    result = _convert_tree(copy.deepcopy(model), "", concrete_args, options, report)
    if report.untraced:
        warnings.warn(f"convert_model: could not trace {report.untraced}; converted their traceable submodules "
                      "only (see ConversionReport.untraced)", RuntimeWarning, stacklevel=2)
    return (result, report) if return_report else result


# ----------------------------------------------------------------------------------------------------------
# Checkpoints of the original inplace-abn 1.1.0
# ----------------------------------------------------------------------------------------------------------

_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model")


def _rename(state: Mapping[str, Any], old: str, new: str) -> Dict[str, Any]:
    out = type(state)() if isinstance(state, dict) else {}
    for k, v in state.items():
        out[new + k[len(old):] if k.startswith(old) else k] = v
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        renamed = type(metadata)()
        for k, v in metadata.items():
            if k == old.rstrip("."):
                renamed[new.rstrip(".")] = v
            elif k.startswith(old):
                renamed[new + k[len(old):]] = v
            else:
                renamed[k] = v
        out._metadata = renamed  # type: ignore[attr-defined]
    return out


def load_inplace_abn_v1_state_dict(
    model: nn.Module,
    state_dict_or_path: Union[Mapping[str, Any], str, os.PathLike, Any],
    strict: bool = True,
    *,
    weights_only: bool = True,
):
    """Loads a checkpoint written with the original inplace-abn (1.1.0 or earlier) into ``model``.

    The layers of 1.1.0 have the parameters / buffers of ``nn.BatchNorm2d`` (weight, bias, running_mean,
    running_var, num_batches_tracked) with the same meaning (``|w| + eps`` for the in-place layers, raw
    weight for ``ABN``), so the tensors load unchanged. This helper handles what differs in practice:

    * a path or file object (read with ``torch.load(map_location="cpu", weights_only=weights_only)``; pass
      ``weights_only=False`` only for trusted files that pickle other objects, e.g. an argparse Namespace);
    * a dict wrapping the weights under ``"state_dict"``, ``"model_state_dict"`` or ``"model"`` (the first
      one present that is a mapping);
    * the ``"module."`` prefix of checkpoints saved from ``nn.DataParallel`` / DDP (stripped, repeatedly, when
      every key has it and the model's keys do not; added when the model is the wrapped one);
    * checkpoints without ``num_batches_tracked`` (pre-1.0 layers, or metadata lost in renaming): our
      layers and ``nn.BatchNorm`` start the count at 0 (version-based backfill); the prefix renaming keeps
      the ``_metadata`` versions consistent.

    Returns:
        What ``model.load_state_dict`` returns (missing and unexpected keys, with ``strict=False``).
    """
    obj = state_dict_or_path
    if isinstance(obj, (str, os.PathLike)) or hasattr(obj, "read"):
        obj = torch.load(obj, map_location="cpu", weights_only=weights_only)
    for key in _CONTAINER_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected a state dict (or a checkpoint holding one), got {type(obj).__name__}")
    state = obj
    model_keys = list(model.state_dict().keys())
    prefix = "module."
    while state and all(k.startswith(prefix) for k in state) and not all(k.startswith(prefix) for k in model_keys):
        state = _rename(state, prefix, "")
    if state and model_keys and all(k.startswith(prefix) for k in model_keys) and not any(k.startswith(prefix) for k in state):
        state = _rename(state, "", prefix)
    if not isinstance(state, dict) or state is obj:
        state = _rename(state, "", "")  # a copy: loading backfills num_batches_tracked into it
    return model.load_state_dict(state, strict=strict)
