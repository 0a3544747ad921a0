"""convert_model's residual fusion: BatchNorm -> add(residual) -> ReLU/LeakyReLU/ELU becomes one
``layer(x, residual=...)`` call (issue 14, point 4).

Local modules reproduce torchvision's Bottleneck / BasicBlock (shared ReLU, ``out += identity``, projection
shortcut) and timm's ResNet blocks (``x += shortcut; self.act3(x)``, DropPath / Identity pass-throughs), so
these run without torchvision or timm (the real models are checked in test_convert.py, where importable).
Numerics compare, in float64 and training mode, against the same model with every ReLU replaced by
leaky_relu(0.01) -- what the conversion makes of it by default.
"""

from __future__ import annotations

import copy
import operator
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from inplace_abn import ABN, InPlaceABN, InPlaceABNSync
from inplace_abn.convert import BatchNormAct, convert_model, to_batchnorm
from inplace_abn.memory import parameters_of, saved_tensor_bytes

SLOPE = 0.01  # convert_model's default: what a ReLU becomes


# ---------------------------------------------------------------------------------------------- helpers
def _randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial statistics, weights in [0.5, 1.5] (an exact conversion) and float64."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, ABN)):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.double()


def _leaky_reference(model: nn.Module) -> nn.Module:
    """A copy with every ``nn.ReLU`` module replaced by LeakyReLU(SLOPE) and ``ref = True`` on the blocks
    (their functional ReLUs then use leaky_relu): the function the default conversion computes."""
    ref = copy.deepcopy(model)
    for module in list(ref.modules()):
        if hasattr(module, "ref"):
            module.ref = True
        for name, child in list(module.named_children()):
            if type(child) is nn.ReLU:
                setattr(module, name, nn.LeakyReLU(SLOPE, inplace=child.inplace))
    return ref


def _run(model: nn.Module, x: torch.Tensor, training: bool = True, seed: int = 0):
    """(output, {name: grad} with "input" for x) of one forward/backward; seeded (drop path masks)."""
    model.train(training)
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    out = model(x)
    (out * torch.linspace(-1, 2, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    grads["input"] = x.grad
    return out.detach(), grads


def _assert_same_function(conv: nn.Module, ref: nn.Module, x: torch.Tensor) -> None:
    """Training outputs, all gradients and the running statistics afterwards; then eval outputs."""
    out_c, grads_c = _run(conv, x)
    out_r, grads_r = _run(ref, x)
    torch.testing.assert_close(out_c, out_r)
    # the converted GraphModule holds only what its graph uses (an unused parameter has no gradient anyway)
    assert grads_c.keys() <= grads_r.keys() and all(grads_r[n] is None for n in grads_r.keys() - grads_c.keys())
    for name in grads_c:
        torch.testing.assert_close(grads_c[name], grads_r[name], msg=lambda m: f"{name}: {m}")
    buffers_r = dict(ref.named_buffers())
    for name, buf in conv.named_buffers():
        torch.testing.assert_close(buf, buffers_r[name], msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(_run(conv, x, training=False)[0], _run(ref, x, training=False)[0])


def _entries(report):
    return {layer.name: layer for layer in report.layers}


def _call_nodes(gm, cls):
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), cls)]


def _saved_activations(model: nn.Module, x: torch.Tensor, min_bytes: int) -> int:
    """Bytes saved for backward by one training forward, counting the storages of ``min_bytes`` or more:
    the activations, without the per-channel vectors (statistics) that the fusion does not change."""
    model.train()
    _, _, storages = saved_tensor_bytes(lambda: model(x.clone()).sum(), exclude=parameters_of(model))
    return sum(n for n in storages.values() if n >= min_bytes)


class DropPath(nn.Module):
    """timm.layers.DropPath (stochastic depth per sample), recognised by its class name and drop_prob."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


# ------------------------------------------------------------------------------------ torchvision blocks
class TVBottleneck(nn.Module):
    """torchvision.models.resnet.Bottleneck: ``self.relu`` used 3 times, ``out += identity``."""

    def __init__(self, cin, mid, cout, stride=1, downsample=False):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if downsample:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)
        out = self.conv3(out)
        out = self.bn3(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class TVBasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock."""

    def __init__(self, cin, cout, stride=1, downsample=False):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if downsample:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


def _tv_resnet(block: str = "bottleneck") -> nn.Module:
    """A small torchvision-style ResNet: stem, two stages (the first block of each projects)."""
    stem = [nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
    if block == "bottleneck":
        blocks = [
            TVBottleneck(8, 4, 16, downsample=True),
            TVBottleneck(16, 4, 16),
            TVBottleneck(16, 8, 32, stride=2, downsample=True),
            TVBottleneck(32, 8, 32),
        ]
    else:
        blocks = [TVBasicBlock(8, 8), TVBasicBlock(8, 8), TVBasicBlock(8, 16, stride=2, downsample=True)]
    return _randomize_bn(nn.Sequential(*stem, *blocks))


# ------------------------------------------------------------------------------------------ timm blocks
class TimmBottleneck(nn.Module):
    """timm.models.resnet.Bottleneck: act1..act3, drop_block / aa Identities, drop_path, ``x += shortcut``."""

    def __init__(self, cin, mid, cout, downsample=False, drop_path=0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(mid, mid, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.drop_block = nn.Identity()
        self.act2 = nn.ReLU(inplace=True)
        self.aa = nn.Identity()
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = None
        if downsample:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.drop_path = DropPath(drop_path) if drop_path is not None else None

    def forward(self, x):
        shortcut = x
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.act1(x)
        x = self.conv2(x)
        x = self.bn2(x)
        x = self.drop_block(x)
        x = self.act2(x)
        x = self.aa(x)
        x = self.conv3(x)
        x = self.bn3(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        x = self.act3(x)
        return x


class ShortcutDropPath(nn.Module):
    """``x = x + self.drop_path(shortcut)`` (timm's pre-norm blocks' form) with a post-add activation:
    drop path on the residual operand, any probability (the residual is just read)."""

    def __init__(self, c, drop_path=0.2):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.drop_path = DropPath(drop_path)
        self.act = nn.ReLU()

    def forward(self, x):
        shortcut = x
        x = self.bn(self.conv(x))
        x = x + self.drop_path(shortcut)
        return self.act(x)


def _stem(block: nn.Module, c: int = 8) -> nn.Module:
    """conv + BN + ReLU in front of a block (its input is then an intermediate, not the model input)."""
    return _randomize_bn(nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(), block))


def _x(c=3, n=4, hw=8):
    return torch.randn(n, c, hw, hw, dtype=torch.float64)


# ----------------------------------------------------------------------- the add and activation forms
ADD_FORMS = {
    "out + r": lambda o, r: o + r,
    "r + out": lambda o, r: r + o,
    "out += r": None,  # written inline (an augmented assignment cannot be a lambda)
    "torch.add(out, r)": lambda o, r: torch.add(o, r),
    "torch.add(r, out, alpha=1)": lambda o, r: torch.add(r, o, alpha=1),
    "operator.add(r, out)": lambda o, r: operator.add(r, o),
    "operator.iadd(out, r)": lambda o, r: operator.iadd(o, r),
    "out.add(r)": lambda o, r: o.add(r),
    "r.add(out)": lambda o, r: r.add(o),
    "out.add_(r)": lambda o, r: o.add_(r),
}
RELU_FORMS = {
    "nn.ReLU(inplace=True)": None,  # the module: written inline
    "F.relu(inplace=True)": lambda s: F.relu(s, inplace=True),
    "F.relu": lambda s: F.relu(s),
    "torch.relu": lambda s: torch.relu(s),
    "torch.relu_": lambda s: torch.relu_(s),
    "s.relu()": lambda s: s.relu(),
    "s.relu_()": lambda s: s.relu_(),
}


class FormBlock(nn.Module):
    """conv -> BN -> <add form>(residual = a conv of the block input) -> <activation form>.

    With ``ref = True`` the ReLU forms compute leaky_relu(SLOPE) instead (the reference)."""

    def __init__(self, add_form, act_form, c=6):
        super().__init__()
        self.add_form, self.act_form, self.ref = add_form, act_form, False
        self.conv, self.bn, self.short = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.Conv2d(c, c, 1)
        self.relu = nn.ReLU(inplace=True)
        self.leaky, self.elu = nn.LeakyReLU(0.2), nn.ELU(0.7)

    def forward(self, x):
        out = self.bn(self.conv(x))
        r = self.short(x)
        if self.add_form == "out += r":
            out += r
        else:
            out = ADD_FORMS[self.add_form](out, r)
        if self.act_form == "LeakyReLU(0.2)":
            return self.leaky(out)
        if self.act_form == "ELU(0.7)":
            return self.elu(out)
        if self.ref:
            return F.leaky_relu(out, SLOPE)
        if self.act_form == "nn.ReLU(inplace=True)":
            return self.relu(out)
        return RELU_FORMS[self.act_form](out)


# =========================================================================================== the tests
@pytest.mark.parametrize("block", ["bottleneck", "basic"])
def test_torchvision_blocks_fuse_bn_add_relu(backend, block):
    model = _tv_resnet(block)
    conv, report = convert_model(model, return_report=True)
    entries = _entries(report)
    last = "bn3" if block == "bottleneck" else "bn2"
    blocks = [name for name, m in model.named_children() if isinstance(m, (TVBottleneck, TVBasicBlock))]
    for b in blocks:
        assert entries[f"{b}.{last}"].residual is not None, report.summary()
        assert entries[f"{b}.{last}"].activation == "leaky_relu" and entries[f"{b}.{last}"].activation_param == SLOPE
        assert entries[f"{b}.{last}"].source == "ReLU"
    assert len(report.fused) == len(blocks)
    # the projection shortcut's BN is an identity layer whose output is the residual
    ds = [b for b in blocks if model.get_submodule(b).downsample is not None]
    for b in ds:
        assert entries[f"{b}.downsample.1"].activation == "identity"
        assert entries[f"{b}.{last}"].residual == f"{b}.downsample.1"
    plain = [b for b in blocks if b not in ds and b != blocks[0]]
    for b in plain:  # identity shortcut: the previous block's (fused) output
        prev = blocks[blocks.index(b) - 1]
        assert entries[f"{b}.{last}"].residual == f"{prev}.{last}"
    if block == "basic":  # the first block's input is the max-pool output
        assert entries[f"{blocks[0]}.{last}"].residual == "3"
    assert f"fused with their residual add and activation (act(BN(x) + residual), one layer): {len(blocks)}" in str(
        report
    )
    # no add and no ReLU left: the shared ReLU module went away with its last call
    assert not any(n.op == "call_function" and n.target in (operator.add, operator.iadd) for n in conv.graph.nodes)
    assert not _call_nodes(conv, nn.ReLU)
    fused_calls = [n for n in conv.graph.nodes if n.op == "call_module" and "residual" in n.kwargs]
    assert len(fused_calls) == len(blocks)
    _assert_same_function(conv, _leaky_reference(model), _x())


def test_fused_blocks_save_one_activation_each(backend):
    """Exact saved-for-backward bytes: the fused layer keeps its output (what the add's ReLU kept) and the
    residual by reference (the block input / the shortcut layer's output, kept anyway); the identity
    layer's output before the add -- one block output per block -- is no longer kept."""
    model = _tv_resnet("bottleneck").float()
    x = torch.randn(2, 3, 16, 16)
    fused, report = convert_model(model, return_report=True)
    unfused = convert_model(model, fuse_residual=False)
    assert len(report.fused) == 4
    with torch.no_grad():
        outs = []
        hooks = [
            m.register_forward_hook(lambda m, i, o: outs.append(o.numel() * o.element_size()))
            for m in model
            if isinstance(m, TVBottleneck)
        ]
        model.eval()(x)
        for h in hooks:
            h.remove()
    # per-channel vectors here: at most 32 channels * 4 bytes; activations: at least 2 * 8 * 4 * 4 * 4 bytes
    min_bytes = 256
    saved_fused, saved_unfused = (_saved_activations(m, x, min_bytes) for m in (fused, unfused))
    assert saved_unfused - saved_fused == sum(outs), (saved_unfused, saved_fused, outs)
    assert saved_fused < saved_unfused < _saved_activations(model, x, min_bytes)


def test_block_traced_alone_fuses_with_its_input_as_residual(backend):
    """The block is the whole model: the residual is the model input (kept by reference, never written)."""
    model = _randomize_bn(TVBottleneck(8, 4, 8))
    conv, report = convert_model(model, return_report=True)
    assert [(layer.name, layer.residual) for layer in report.fused] == [("bn3", "input x")]
    x = _x(c=8)
    x_before = x.clone()
    _assert_same_function(conv, _leaky_reference(model), x)
    assert torch.equal(x, x_before)


def test_sync_batchnorm_fuses_into_the_sync_layer():
    """nn.SyncBatchNorm -> InPlaceABNSync, fused the same way (checked in eval: no process group here)."""
    model = nn.SyncBatchNorm.convert_sync_batchnorm(_tv_resnet("basic"))
    conv, report = convert_model(model, return_report=True)
    assert len(report.fused) == 3
    assert all(type(conv.get_submodule(layer.name)) is InPlaceABNSync for layer in report.fused)
    x = _x()
    torch.testing.assert_close(_run(conv, x, training=False)[0], _run(_leaky_reference(model), x, training=False)[0])


def test_fuse_residual_false_keeps_the_identity_layer():
    model = _tv_resnet("bottleneck")
    conv, report = convert_model(model, fuse_residual=False, return_report=True)
    assert not report.fused and report.counts() == {"leaky_relu": 9, "identity": 6}
    assert len(_call_nodes(conv, nn.ReLU)) == 4  # the ReLU after each add stays exact
    assert "fused" not in str(report)


def test_timm_bottleneck_and_drop_path_forms(backend):
    model = _randomize_bn(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            TimmBottleneck(8, 4, 16, downsample=True),
            TimmBottleneck(16, 4, 16, drop_path=0.0),
            TimmBottleneck(16, 4, 16, drop_path=None),
            ShortcutDropPath(16, drop_path=0.3),
        )
    )
    conv, report = convert_model(model, return_report=True)
    entries = _entries(report)
    for name in ("3.bn3", "4.bn3", "5.bn3", "6.bn"):
        assert entries[name].residual is not None and entries[name].activation == "leaky_relu", report.summary()
    assert entries["3.bn3"].residual == "3.downsample.1"
    assert entries["4.bn3"].residual == "3.bn3"  # through DropPath(0) on the BN branch: removed
    assert entries["6.bn"].residual == "6.drop_path"  # drop path on the residual operand: it is just read
    assert entries["3.bn2"].source == "ReLU"  # bn2 -> drop_block (Identity) -> act2
    assert not _call_nodes(conv, DropPath) or all(
        conv.get_submodule(n.target).drop_prob > 0 for n in _call_nodes(conv, DropPath)
    )
    _assert_same_function(conv, _leaky_reference(model), _x())


def test_drop_path_on_the_bn_branch_is_not_fused(backend):
    """A DropPath with drop_prob > 0 between the BN and the add is the identity in eval only."""
    model = _stem(TimmBottleneck(8, 4, 8, drop_path=0.2))
    conv, report = convert_model(model, return_report=True)
    entry = _entries(report)["3.bn3"]
    assert entry.residual is None and entry.converted and entry.activation == "identity"
    assert "DropPath between the BatchNorm and the add" in entry.not_fused
    assert "add not fused x1: DropPath" in report.summary()
    # the reference: act3 stays a ReLU here (not fused), the other ReLUs become leaky
    ref = _leaky_reference(model)
    ref[3].act3 = nn.ReLU(inplace=True)
    _assert_same_function(conv, ref, _x())


@pytest.mark.parametrize("add_form", list(ADD_FORMS))
def test_add_forms(backend, add_form):
    model = _stem(FormBlock(add_form, "nn.ReLU(inplace=True)"), c=6)
    conv, report = convert_model(model, return_report=True)
    entry = _entries(report)["3.bn"]
    assert entry.residual == "3.short" and entry.not_fused == "", report.summary()
    _assert_same_function(conv, _leaky_reference(model), _x())


@pytest.mark.parametrize("act_form", list(RELU_FORMS) + ["LeakyReLU(0.2)", "ELU(0.7)"])
def test_activation_forms(backend, act_form):
    model = _stem(FormBlock("out += r", act_form), c=6)
    conv, report = convert_model(model, return_report=True)
    entry = _entries(report)["3.bn"]
    assert entry.residual == "3.short", report.summary()
    expected = {"LeakyReLU(0.2)": ("leaky_relu", 0.2), "ELU(0.7)": ("elu", 0.7)}.get(act_form, ("leaky_relu", SLOPE))
    assert (entry.activation, entry.activation_param) == expected
    _assert_same_function(conv, _leaky_reference(model), _x())


def test_exact_relu_option_fuses_with_relu(backend):
    """activation="relu": the fused layer applies an exact ReLU after the add (no memory saved by it)."""
    model = _tv_resnet("basic")
    conv, report = convert_model(model, activation="relu", return_report=True)
    assert len(report.fused) == 3 and all(layer.activation == "relu" for layer in report.fused)
    _assert_same_function(conv, model, _x())


# ------------------------------------------------------------------------------------- unsafe patterns
class Unsafe(nn.Module):
    """conv -> BN -> add -> ReLU variants that must not be fused."""

    def __init__(self, case, c=6):
        super().__init__()
        self.case, self.ref = case, False
        self.conv, self.bn, self.short = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.Conv2d(c, c, 1)
        self.scale = nn.Parameter(torch.ones(c, 1, 1))

    def forward(self, x):
        h = self.conv(x)
        r = self.short(x)
        if self.case == "bn input is the residual":
            return F.relu(self.bn(h) + h)
        out = self.bn(h)
        if self.case == "bn output used twice":
            return F.relu(out + r) + out
        if self.case == "add result used twice":
            s = out + r
            return F.relu(s) * s
        if self.case == "residual mutated after":
            y = F.relu(out + r)
            r.mul_(2)
            return y + r
        if self.case == "residual view mutated after":
            y = F.relu(out + r)
            r.view(-1).add_(1)
            return y * r
        if self.case == "add writes into a residual read later":
            y = F.relu(r.add_(out))
            return y + r.sum()
        if self.case == "parameter operand":
            return F.relu(out + self.scale)
        if self.case == "reduced operand":
            return F.relu(out + r.mean((2, 3), keepdim=True))
        if self.case == "constant operand":
            return F.relu(out + 1.0)
        if self.case == "out + out":
            return F.relu(out + out)
        if self.case == "alpha 2":
            return F.relu(torch.add(out, r, alpha=2))
        if self.case == "silu after the add":
            return F.silu(out + r)
        raise AssertionError(self.case)


UNSAFE = {
    # case: (converted?, text in not_fused or, when not converted, in the reason)
    "bn input is the residual": (False, "its input is also used elsewhere"),
    "bn output used twice": (True, ""),
    "add result used twice": (True, "the result of the add has 2 users"),
    "residual mutated after": (True, "modified in place by call_method mul_ after the add"),
    "residual view mutated after": (True, "modified in place by call_method add_ after the add"),
    "add writes into a residual read later": (True, "the add writes into the residual"),
    "parameter operand": (True, "comes from get_attr scale and may broadcast"),
    "reduced operand": (True, "comes from call_method mean and may broadcast"),
    "constant operand": (True, "not a traced tensor"),
    "out + out": (True, "both operands of the add are the BatchNorm output"),
    "alpha 2": (True, ""),
    "silu after the add": (True, "no fusable ReLU / LeakyReLU / ELU follows the add (call_function silu)"),
}


@pytest.mark.parametrize("case", list(UNSAFE))
def test_unsafe_patterns_are_not_fused(backend, case):
    converted, text = UNSAFE[case]
    model = _randomize_bn(Unsafe(case))
    conv, report = convert_model(model, return_report=True)
    entry = report.layers[0]
    assert entry.residual is None and not report.fused
    assert entry.converted is converted, entry
    if converted:
        assert entry.activation == "identity"
        assert text in entry.not_fused, entry.not_fused
        if text:
            assert "add not fused x1" in report.summary()
    else:
        assert text in entry.reason
    # unchanged function: the ReLU after the add stays a ReLU, nothing else changed
    _assert_same_function(conv, model, _x(c=6))


def test_existing_in_place_layer_overwriting_the_output_is_respected(backend):
    """An InPlaceABN already in the model overwrites its input: the BN -> LeakyReLU before it is kept (fused,
    the layer would keep its output for backward, which the next layer then overwrites)."""
    model = _randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.LeakyReLU(0.1), InPlaceABN(4)))
    conv, report = convert_model(model, return_report=True)
    assert not report.layers[0].converted and "modified in place by call_module 3" in report.layers[0].reason
    _assert_same_function(conv, model, _x())


def test_residual_of_another_module_keeps_working():
    """The fused layer reads the residual: other layers reading it too are unaffected (a shared shortcut)."""

    class TwoHeads(nn.Module):
        def __init__(self, c=6):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)
            self.c2, self.b2 = nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)
            self.short, self.ref = nn.Conv2d(c, c, 1), False

        def forward(self, x):
            r = self.short(x)
            act = (lambda t: F.leaky_relu(t, SLOPE)) if self.ref else F.relu
            return act(self.b1(self.c1(x)) + r) * act(r + self.b2(self.c2(x))) + r

    model = _randomize_bn(TwoHeads())
    conv, report = convert_model(model, return_report=True)
    assert len(report.fused) == 2 and {layer.residual for layer in report.fused} == {"short"}
    _assert_same_function(conv, _leaky_reference(model), _x(c=6))


# ------------------------------------------------------------------------- to_batchnorm and export
def test_to_batchnorm_turns_fused_layers_back(backend):
    model = _tv_resnet("bottleneck")
    conv = convert_model(model)
    x = _x()
    back = to_batchnorm(copy.deepcopy(conv))
    assert not any(isinstance(m, ABN) for m in back.modules())
    assert isinstance(back.get_submodule("4.bn3"), BatchNormAct)
    assert isinstance(back.get_submodule("4.bn3")[0], nn.BatchNorm2d)
    for training in (False, True):
        out_c, grads_c = _run(copy.deepcopy(conv), x, training)
        out_b, grads_b = _run(copy.deepcopy(back), x, training)
        torch.testing.assert_close(out_b, out_c)
        torch.testing.assert_close(grads_b["input"], grads_c["input"])
    torch.testing.assert_close(_run(back, x, False)[0], _run(_leaky_reference(model), x, False)[0])


@pytest.mark.parametrize("activation,param", [("leaky_relu", 0.01), ("elu", 1.0), ("identity", 0.0), ("relu", 0.0)])
def test_to_batchnorm_of_a_residual_layer(activation, param):
    """A hand-written ``layer(x, residual=r)`` call works after to_batchnorm too (eval, equal outputs)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # relu: "saves no memory"
        layer = _randomize_bn(InPlaceABN(5, activation=activation, activation_param=param)).eval()
    x, r = torch.randn(3, 5, 4, 4, dtype=torch.float64), torch.randn(3, 5, 4, 4, dtype=torch.float64)
    expected = layer(x.clone(), residual=r)
    seq = to_batchnorm(copy.deepcopy(layer))
    x_in, r_in = x.clone(), r.clone()
    torch.testing.assert_close(seq(x_in, residual=r_in), expected)
    assert torch.equal(x_in, x) and torch.equal(r_in, r)  # plain BatchNorm: nothing overwritten
    torch.testing.assert_close(seq(x.clone()), layer(x.clone()))  # and without a residual, as before


def test_converted_block_exports_to_standard_ops():
    """Eval under torch.export: the fused layer lowers to batch_norm + add + leaky_relu (no inplace_abn op)."""
    model = _tv_resnet("bottleneck").float()
    conv = convert_model(model).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = conv(x.clone())
        reference = _leaky_reference(model).eval()(x.clone())
    torch.testing.assert_close(expected, reference, rtol=1e-5, atol=1e-5)
    program = torch.export.export(conv, (x,))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert not any("inplace_abn" in t for t in targets), targets
    assert sum("batch_norm" in t for t in targets) == 15 and sum("leaky_relu" in t for t in targets) == 13
    residual_adds = [
        n
        for n in program.graph.nodes
        if n.op == "call_function" and str(n.target).startswith("aten.add") and n.meta["val"].dim() == 4
    ]
    assert len(residual_adds) == 4  # the others add eps to |weight|
    torch.testing.assert_close(program.module()(x.clone()), expected, rtol=1e-5, atol=1e-6)
