"""Model conversion: to_batchnorm, convert_model (torch.fx dataflow analysis), the 1.1.0 checkpoint helper.

The hand-written models run everywhere; the torchvision / timm tests skip (with the reason) where those
packages cannot be imported with the installed torch.
"""

from __future__ import annotations

import argparse
import collections
import copy
import io
import operator
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from inplace_abn import ABN, InPlaceABN, InPlaceABNSync
from inplace_abn.convert import (
    BatchNormNd,
    convert_model,
    convert_sync,
    load_inplace_abn_v1_state_dict,
    to_batchnorm,
)
from inplace_abn.memory import parameters_of, saved_tensor_bytes


# ---------------------------------------------------------------------------------------------- helpers
def _randomize_bn(model: nn.Module, low: float = 0.5) -> nn.Module:
    """Non-trivial statistics and weights >= low (so that the conversion is exact)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, ABN)):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                if m.affine:
                    m.weight.uniform_(low, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
    return model


def _n(model, cls):
    return sum(type(m) is cls for m in model.modules())


def _saved(model, x):
    model.train()

    def run():
        out = model(x)
        return (out["out"] if isinstance(out, dict) else out).sum()

    total, _, _ = saved_tensor_bytes(run, exclude=parameters_of(model))
    return total


def _train_step(model, x):
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    out = model(x)
    if isinstance(out, dict):
        out = out["out"]
    loss = out.square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    return loss


class Bottleneck(nn.Module):
    """torchvision's Bottleneck: self.relu reused 3 times, `out += identity` in place."""

    def __init__(self, cin=8, mid=4, cout=8, downsample=False):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout)) if downsample else None
        )

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


def _resnetish():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        Bottleneck(8, 4, 16, downsample=True),
        Bottleneck(16, 4, 16),
    )


def _x(*shape):
    return torch.randn(*shape)


# ------------------------------------------------------------------------------------------ to_batchnorm
@pytest.mark.parametrize("ndim", [2, 3, 4, 5])
@pytest.mark.parametrize(
    "cls,act,param",
    [
        (InPlaceABN, "leaky_relu", 0.01),
        (InPlaceABN, "elu", 1.0),
        (InPlaceABN, "identity", 0.0),
        (InPlaceABNSync, "leaky_relu", 0.1),
        (ABN, "relu", 0.0),
        (ABN, "leaky_relu", 0.2),
    ],
)
def test_to_batchnorm_eval_equal(ndim, cls, act, param):
    layer = _randomize_bn(cls(6, activation=act, activation_param=param), low=-1.0).eval()  # negative weights too
    shape = (4, 6) + (5,) * (ndim - 2)
    x = _x(*shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = layer(x.clone())
    dims = {2: 1, 3: 1, 4: 2, 5: 3}[ndim]
    for d in (dims, None):
        seq = to_batchnorm(copy.deepcopy(layer), dims=d)
        assert type(seq[0]) is (
            BatchNormNd if d is None else {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[d]
        )
        assert not seq.training
        torch.testing.assert_close(seq(x.clone()), ref, rtol=1e-5, atol=1e-6)


def test_to_batchnorm_in_model_and_modes():
    model = nn.Sequential(nn.Conv2d(3, 6, 3), InPlaceABN(6), nn.Conv2d(6, 6, 1), InPlaceABN(6, activation="elu"))
    _randomize_bn(model, low=-1.0)
    x = _x(2, 3, 8, 8)
    ref = model.eval()(x)
    out = to_batchnorm(model)
    assert _n(out, InPlaceABN) == 0 and _n(out, nn.BatchNorm2d) == 2
    assert isinstance(out[1][1], nn.LeakyReLU) and isinstance(out[3][1], nn.ELU)
    torch.testing.assert_close(out(x), ref, rtol=1e-5, atol=1e-6)
    _train_step(out.train(), x)


# ----------------------------------------------------------------------------------------- convert_model
def test_bottleneck_shared_relu_and_residual():
    model = _randomize_bn(_resnetish()).eval()
    x = _x(2, 3, 8, 8)
    ref = model(x)
    conv, report = convert_model(model, activation="relu", return_report=True)
    assert _n(model, nn.BatchNorm2d) == 8 and _n(model, InPlaceABN) == 0  # original untouched
    assert _n(conv, InPlaceABN) == 8 and _n(conv, nn.BatchNorm2d) == 0, report.summary()
    # bn3 + add + the shared ReLU's third call: one fused layer per block (the downsample BN: identity)
    assert report.counts() == {"relu": 7, "identity": 1}
    assert [layer.name for layer in report.fused] == ["3.bn3", "4.bn3"]
    assert [layer.residual for layer in report.fused] == ["3.downsample.1", "3.bn3"]
    relu_calls = [
        n for n in conv.graph.nodes if n.op == "call_module" and isinstance(conv.get_submodule(n.target), nn.ReLU)
    ]
    assert not relu_calls
    assert not any(n.target in (operator.iadd, operator.add) for n in conv.graph.nodes)
    torch.testing.assert_close(conv(x), ref, rtol=1e-5, atol=1e-5)
    assert conv.state_dict().keys() == model.state_dict().keys()
    # without residual fusion, the shared ReLU still runs after each residual add
    conv, report = convert_model(model, activation="relu", fuse_residual=False, return_report=True)
    assert report.counts() == {"relu": 5, "identity": 3} and not report.fused
    relu_calls = [
        n for n in conv.graph.nodes if n.op == "call_module" and isinstance(conv.get_submodule(n.target), nn.ReLU)
    ]
    assert len(relu_calls) == 2
    assert not any(n.target in (operator.iadd,) for n in conv.graph.nodes)
    torch.testing.assert_close(conv(x), ref, rtol=1e-5, atol=1e-5)


def test_leaky_conversion_trains_and_saves_memory():
    model = _randomize_bn(_resnetish())
    x = _x(2, 3, 16, 16)
    conv, report = convert_model(model, return_report=True)
    assert report.counts() == {"leaky_relu": 7, "identity": 1}
    assert all(
        m.activation_param == 0.01 for m in conv.modules() if isinstance(m, InPlaceABN) and m.activation == "leaky_relu"
    )
    before, after = _saved(model, x.clone()), _saved(conv, x.clone())
    assert after < 0.7 * before, (before, after)  # ~43% here, ~45% on resnet50 (~18% / 19% with fuse_residual=False)
    for _ in range(2):
        _train_step(conv, x.clone())


def test_eval_equal_with_relu_and_training_mode_equal():
    model = _randomize_bn(_resnetish())
    conv = convert_model(model, activation="relu")
    x = _x(4, 3, 8, 8)
    torch.testing.assert_close(conv.train()(x.clone()), model.train()(x.clone()), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(conv.eval()(x.clone()), model.eval()(x.clone()), rtol=1e-4, atol=1e-5)


def test_input_used_twice_is_not_converted():
    class TwoBranches(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)
            self.other = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = self.conv(x)
            return F.relu(self.bn(y)) + self.other(y)

    model = _randomize_bn(TwoBranches())
    conv, report = convert_model(model, return_report=True)
    assert _n(conv, nn.BatchNorm2d) == 1 and "used elsewhere" in report.kept[0].reason
    x = _x(2, 3, 5, 5)
    torch.testing.assert_close(conv(x), model(x))
    _train_step(conv, x)


def test_output_modified_in_place_and_other_kept_cases():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)  # output used twice, one in place
            self.c2, self.b2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)  # single in-place user: rewritten
            self.b3 = nn.BatchNorm2d(4)  # shared: called twice
            self.b0 = nn.BatchNorm2d(3)  # input of the model
            self.act = nn.SiLU(inplace=True)

        def forward(self, x):
            x = self.b0(x)
            a = self.b1(self.c1(x))
            s = a.sum()
            a.mul_(2)
            b = self.act(self.b2(self.c2(a)))
            return self.b3(b + 1) + self.b3(b - 1) + s

    model = _randomize_bn(M())
    conv, report = convert_model(model, return_report=True)
    reasons = {layer.name: layer.reason for layer in report.layers}
    assert "input of the traced module" in reasons["b0"]
    assert "modified in place" in reasons["b1"]
    assert "called 2 times" in reasons["b3"]
    assert reasons["b2"] == "" and isinstance(conv.b2, InPlaceABN) and conv.b2.activation == "identity"
    x = _x(2, 3, 5, 5)
    torch.testing.assert_close(conv.eval()(x), model.eval()(x), rtol=1e-5, atol=1e-5)
    _train_step(conv, x)


def test_identity_passthrough_and_functional_relu():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.bn, self.drop = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Identity()
            self.c2, self.bn2 = nn.Conv1d(4, 4, 1), nn.BatchNorm1d(4)

        def forward(self, x):
            y = F.relu(self.drop(self.bn(self.c(x))), inplace=True)
            y = y.flatten(2)
            return F.leaky_relu(self.bn2(self.c2(y)), 0.2)

    model = _randomize_bn(M())
    conv, report = convert_model(model, activation="relu", return_report=True)
    assert _n(conv, InPlaceABN) == 2, report.summary()
    assert (conv.bn.activation, conv.bn2.activation, conv.bn2.activation_param) == ("relu", "leaky_relu", 0.2)
    x = _x(2, 3, 5, 5)
    torch.testing.assert_close(conv.eval()(x), model.eval()(x), rtol=1e-5, atol=1e-5)
    _train_step(conv, x)


def test_negative_and_tiny_weights():
    model = _randomize_bn(_resnetish())
    with torch.no_grad():
        model[1].weight[:3] = -model[1].weight[:3]  # negative: folded into the conv before it
        model[3].bn2.weight[0] = 0.0  # tiny: clamped (scale eps instead of 0)
        model[3].bn2.weight[1] = 1e-7
    x = _x(2, 3, 8, 8)
    ref = model.eval()(x)
    conv, report = convert_model(model, activation="relu", return_report=True)
    entry = {layer.name: layer for layer in report.layers}
    assert entry["1"].converted and entry["1"].folded == 3
    assert entry["3.bn2"].converted and entry["3.bn2"].clamped == 2 and entry["3.bn2"].max_scale_change <= 1e-5
    assert _n(conv, InPlaceABN) == 8
    torch.testing.assert_close(conv.eval()(x), ref, rtol=1e-4, atol=1e-4)
    assert (model[1].weight[:3] < 0).all()  # the original is untouched
    _train_step(conv, x)
    # "keep" keeps a BN with a negative weight
    conv2, rep2 = convert_model(model, negative_weights="keep", return_report=True)
    assert "negative" in {l.name: l for l in rep2.layers}["1"].reason
    with torch.no_grad():
        model[3].bn3.weight[0] = -1.0  # identity layer before the residual add: folded into conv3 as well
    conv3, rep3 = convert_model(model, "relu", negative_weights="fold", return_report=True)
    assert {l.name: l for l in rep3.layers}["3.bn3"].folded == 1
    torch.testing.assert_close(conv3.eval()(x), model.eval()(x), rtol=1e-4, atol=1e-4)


def test_unfoldable_negative_clamp_warns():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.bn = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            return torch.relu(self.bn(self.a(x) + self.b(x)))

    model = _randomize_bn(M())
    with torch.no_grad():
        model.bn.weight[0] = -0.5
    _, rep = convert_model(model, return_report=True)
    assert not rep.layers[0].converted and "cannot absorb" in rep.layers[0].reason
    with pytest.warns(RuntimeWarning, match="clamped"):
        conv, rep = convert_model(model, negative_weights="clamp", return_report=True)
    assert rep.layers[0].converted and rep.layers[0].clamped == 1 and rep.layers[0].max_scale_change > 0.5


def test_untraceable_falls_back_to_children():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: not traceable
                return self.body(x)
            return self.body(-x)

    model = _randomize_bn(Dynamic())
    with pytest.warns(RuntimeWarning, match="could not trace"):
        conv, report = convert_model(model, return_report=True)
    assert type(conv) is Dynamic and _n(conv, InPlaceABN) == 1 and report.untraced
    _train_step(conv, _x(2, 3, 4, 4))


def test_already_converted_layers_are_leaves_and_sync():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), InPlaceABN(4), nn.Conv2d(4, 4, 1), nn.SyncBatchNorm(4), nn.ReLU())
    conv = convert_model(model)
    assert _n(conv, InPlaceABN) == 1 and _n(conv, InPlaceABNSync) == 1
    conv = convert_sync(conv)
    assert _n(conv, InPlaceABNSync) == 2


def test_bad_arguments():
    with pytest.raises(ValueError):
        convert_model(nn.Sequential(), activation="identity")
    with pytest.raises(ValueError):
        convert_model(nn.Sequential(), negative_weights="nope")
    with pytest.raises(ValueError):
        to_batchnorm(nn.Sequential(), dims=4)


# ------------------------------------------------------------------------------------- 1.1.0 checkpoints
def _v1_model():
    return nn.Sequential(nn.Conv2d(3, 4, 1), InPlaceABN(4), nn.Conv2d(4, 4, 1), ABN(4, activation="relu"))


def _v1_state(drop_nbt=False, prefix="", metadata_version=1):
    """A state dict as 1.1.0 (and older) wrote it: same keys; old versions lack num_batches_tracked."""
    src = _randomize_bn(_v1_model())
    sd = src.state_dict()
    out = collections.OrderedDict(
        (prefix + k, v) for k, v in sd.items() if not (drop_nbt and k.endswith("num_batches_tracked"))
    )
    out._metadata = collections.OrderedDict(
        ((prefix + k if k else prefix.rstrip(".")), {"version": metadata_version if k in ("1", "3") else 1})
        for k in sd._metadata
    )
    return src, out


@pytest.mark.parametrize("drop_nbt", [False, True])
@pytest.mark.parametrize("prefix", ["", "module.", "module.module."])
@pytest.mark.parametrize("container", [None, "state_dict", "file"])
def test_load_v1_checkpoint(drop_nbt, prefix, container):
    src, sd = _v1_state(drop_nbt, prefix)
    obj = sd
    if container == "state_dict":
        obj = {"state_dict": sd, "epoch": 3}
    elif container == "file":
        buf = io.BytesIO()
        torch.save({"state_dict": sd, "epoch": 3}, buf)
        buf.seek(0)
        obj = buf
    dst = _v1_model()
    result = load_inplace_abn_v1_state_dict(dst, obj)
    assert not result.missing_keys and not result.unexpected_keys
    for k, v in src.state_dict().items():
        if drop_nbt and k.endswith("num_batches_tracked"):
            assert int(dst.state_dict()[k]) == 0
        else:
            assert torch.equal(dst.state_dict()[k], v), k
    assert list(sd.keys())[0].startswith(prefix)  # the caller's dict is not modified


def test_load_v1_checkpoint_into_wrapped_model_and_path(tmp_path):
    src, sd = _v1_state(drop_nbt=True)
    path = tmp_path / "v1.pth"
    torch.save(sd, path)
    wrapped = nn.DataParallel(_v1_model())
    load_inplace_abn_v1_state_dict(wrapped, str(path))
    torch.testing.assert_close(wrapped.module[1].weight, src[1].weight)
    with pytest.raises(RuntimeError):
        load_inplace_abn_v1_state_dict(_v1_model(), {"0.weight": torch.zeros(4, 3, 1, 1)})
    load_inplace_abn_v1_state_dict(_v1_model(), {"0.weight": torch.zeros(4, 3, 1, 1)}, strict=False)


def _mutate_data(y):
    y.data.mul_(0.5)


def _init_on_data(y):  # (fx cannot trace item assignment on a proxy: such a model stays unconverted)
    nn.init.zeros_(y.data)


def _transpose_attr(y):
    y.mT.add_(1.0)


def _tensor_method_on_data(y):
    torch.clamp_(y.data, max=0.1)


def _detach_then_fill(y):
    y.detach().view(-1)[:3].fill_(2.0)


# Writes into the output of a BatchNorm -> activation pair that autograd does not see (through .data, a
# detached view, an aliasing attribute). The fused layer keeps that output for backward: such a pair stays
# unconverted, and the report says why.
HIDDEN_MUTATIONS = [
    ("data-mul_", _mutate_data, "call_method mul_"),
    ("nn.init.zeros_-on-data", _init_on_data, "call_method zero_"),
    ("mT-add_", _transpose_attr, "call_method add_"),
    ("torch.clamp_-on-data", _tensor_method_on_data, "call_function clamp_"),
    ("detach-view-fill_", _detach_then_fill, "call_method fill_"),
]


@pytest.mark.parametrize("mutate, fragment", [r[1:] for r in HIDDEN_MUTATIONS], ids=[r[0] for r in HIDDEN_MUTATIONS])
def test_hidden_mutation_of_the_output_keeps_the_pair_and_says_so(mutate, fragment):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.act = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.LeakyReLU(0.01)
            self.head = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            y = self.act(self.bn(self.conv(x)))
            mutate(y)
            return self.head(y)

    torch.manual_seed(0)
    model = _randomize_bn(M()).double()
    conv, report = convert_model(model, return_report=True)
    assert not report.layers[0].converted and isinstance(conv.bn, nn.BatchNorm2d)
    assert "its output is modified in place by " + fragment in report.layers[0].reason
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    grads = []
    for m in (model, conv):
        m.train().zero_grad()
        m(x).square().mean().backward()
        grads.append([p.grad for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def _v1_file(path, kind):
    """Writes a 1.1.0-style checkpoint file at ``path``, intact or damaged as ``kind`` says."""
    _, sd = _v1_state(drop_nbt=False)
    if kind == "missing":
        return
    if kind == "pickled-object":  # intact, but holds an object the safe loader refuses
        torch.save({"state_dict": sd, "args": argparse.Namespace(lr=0.1)}, path)
        return
    torch.save({"state_dict": sd}, path, _use_new_zipfile_serialization=kind.endswith("zip"))
    data = path.read_bytes()
    path.write_bytes(
        {
            "empty": b"",
            "garbage": b"\x00garbage" * 50,
            "truncated-zip": data[: len(data) // 2],
            "truncated-legacy": data[: len(data) // 2],
        }[kind]
    )


@pytest.mark.parametrize(
    "kind, exc, fragment",
    [
        ("missing", FileNotFoundError, "not found"),
        ("empty", ValueError, "is empty (0 bytes)"),
        ("garbage", ValueError, "is not a PyTorch checkpoint"),
        ("truncated-zip", ValueError, "is not a PyTorch checkpoint"),
        ("truncated-legacy", ValueError, "is corrupt or truncated"),
        ("pickled-object", ValueError, "Only if the file is intact and from a source you trust"),
    ],
)
def test_load_v1_bad_files_name_the_file(tmp_path, kind, exc, fragment):
    path = tmp_path / "v1.pth"
    _v1_file(path, kind)
    with pytest.raises(exc, match="state_dict_or_path") as e:
        load_inplace_abn_v1_state_dict(_v1_model(), str(path))
    assert fragment in str(e.value) and str(path) in str(e.value)
    if kind == "pickled-object":  # the documented way out for a trusted file
        load_inplace_abn_v1_state_dict(_v1_model(), str(path), weights_only=False)
    elif kind != "missing":
        assert "weights_only=False" not in str(e.value)  # a damaged file gets no hint at the unsafe loader


def test_load_v1_legacy_format_file(tmp_path):
    src, sd = _v1_state(drop_nbt=False)
    torch.save(sd, tmp_path / "v1.pth", _use_new_zipfile_serialization=False)
    dst = _v1_model()
    load_inplace_abn_v1_state_dict(dst, str(tmp_path / "v1.pth"))
    torch.testing.assert_close(dst[1].weight, src[1].weight)


# ------------------------------------------------------------------------ third-party models (optional)
def _import_or_skip(name):
    """pytest.importorskip that also skips when the import fails for another reason (e.g. torchvision
    built for another torch raises RuntimeError: operator torchvision::nms does not exist)."""
    try:
        return __import__(name)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"{name} not usable with torch {torch.__version__}: {type(exc).__name__}: {exc}")


def _check_third_party(model, x, expect_converted, max_kept):
    model = _randomize_bn(model)
    conv, report = convert_model(model, return_report=True)
    assert len(report.converted) >= expect_converted, report.summary()
    assert len(report.kept) <= max_kept, report.summary()
    before, after = _saved(model, x.clone()), _saved(conv, x.clone())
    assert after < 0.85 * before, (before, after)
    _train_step(conv, x.clone())
    # with exact ReLU the converted model computes the same function
    exact = convert_model(model, activation="relu")
    out_a, out_b = model.eval()(x), exact.eval()(x)
    if isinstance(out_a, dict):
        out_a, out_b = out_a["out"], out_b["out"]
    torch.testing.assert_close(out_b, out_a, rtol=1e-3, atol=1e-3)
    return report


def _leaky_relu_reference(model):
    """A copy with every nn.ReLU module replaced by LeakyReLU(0.01): what the default conversion computes."""
    ref = copy.deepcopy(model)
    for module in list(ref.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.ReLU:
                setattr(module, name, nn.LeakyReLU(0.01, inplace=child.inplace))
    return ref


def _forward_backward(model, x):
    """(output, {name: grad}, with "input") of one float64 training step (no update); seeded (dropout)."""
    model.train()
    x = x.clone().requires_grad_()
    torch.manual_seed(0)
    out = model(x)
    out = out["out"] if isinstance(out, dict) else out
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    grads["input"] = x.grad
    return out.detach(), grads


def _check_residual_fusion(model, x, block_type, last_bn):
    """Every ``block_type`` block's ``last_bn`` is fused with its residual add and ReLU; in float64 and
    training mode the output and every gradient equal the model with ReLU -> LeakyReLU(0.01)."""
    model = _randomize_bn(model).double()
    x = x.double()
    conv, report = convert_model(model, return_report=True)
    blocks = [name for name, m in model.named_modules() if type(m) is block_type]
    assert blocks and {layer.name for layer in report.fused} == {f"{b}.{last_bn}" for b in blocks}, report.summary()
    assert all(layer.activation == "leaky_relu" and layer.source == "ReLU" for layer in report.fused)
    assert f"one layer): {len(blocks)}" in str(report)
    out_c, grads_c = _forward_backward(conv, x)
    out_r, grads_r = _forward_backward(_leaky_relu_reference(model), x)
    torch.testing.assert_close(out_c, out_r)
    assert grads_c.keys() <= grads_r.keys()
    for name in grads_c:
        torch.testing.assert_close(grads_c[name], grads_r[name], msg=lambda m: f"{name}: {m}")
    return report


def test_torchvision_resnet50():
    _import_or_skip("torchvision")
    from torchvision.models import resnet50
    from torchvision.models.resnet import Bottleneck as TVBottleneck

    report = _check_third_party(resnet50(weights=None), _x(1, 3, 64, 64), 53, 0)
    # 16 bottlenecks: bn3 + add + ReLU fused; the 4 downsample BNs are identity layers
    assert report.counts() == {"leaky_relu": 49, "identity": 4}
    _check_residual_fusion(resnet50(weights=None), _x(2, 3, 64, 64), TVBottleneck, "bn3")


def test_torchvision_deeplabv3_resnet50():
    _import_or_skip("torchvision")
    from torchvision.models.resnet import Bottleneck as TVBottleneck
    from torchvision.models.segmentation import deeplabv3_resnet50

    model = deeplabv3_resnet50(weights=None, weights_backbone=None, aux_loss=False)
    report = _check_third_party(model, _x(2, 3, 64, 64), 50, 10)
    assert report.counts()["leaky_relu"] >= 49
    model = deeplabv3_resnet50(weights=None, weights_backbone=None, aux_loss=False)
    _check_residual_fusion(model, _x(2, 3, 64, 64), TVBottleneck, "bn3")


def test_timm_resnet18():
    _import_or_skip("torchvision")
    timm = _import_or_skip("timm")
    report = _check_third_party(timm.create_model("resnet18", pretrained=False), _x(1, 3, 64, 64), 20, 0)
    assert report.counts() == {"leaky_relu": 17, "identity": 3}


def test_timm_resnet50_residual_fusion():
    _import_or_skip("torchvision")
    timm = _import_or_skip("timm")
    from timm.models.resnet import Bottleneck as TimmBottleneck

    _check_residual_fusion(timm.create_model("resnet50", pretrained=False), _x(2, 3, 64, 64), TimmBottleneck, "bn3")
    # With stochastic depth the DropPath between bn3 and the add is no identity in training: bn3 is not
    # fused there. The first block has no DropPath (rate 0): bn3 fused. A block with a projection shortcut
    # fuses the shortcut's BN instead, the main branch (drop_path(bn3(...))) being its residual.
    model = _randomize_bn(timm.create_model("resnet50", pretrained=False, drop_path_rate=0.1))
    conv, report = convert_model(model, return_report=True)
    blocks = {n: m for n, m in model.named_modules() if type(m) is TimmBottleneck}
    dropping = [n for n, m in blocks.items() if m.drop_path is not None]
    expected = {
        f"{n}.bn3" if m.drop_path is None else f"{n}.downsample.1"
        for n, m in blocks.items()
        if m.drop_path is None or m.downsample is not None
    }
    assert 0 < len(dropping) < 16 and {layer.name for layer in report.fused} == expected, report.summary()
    assert all(
        layer.residual == layer.name.replace("downsample.1", "drop_path")
        for layer in report.fused
        if "downsample" in layer.name
    )
    assert report.not_fused_reasons() == {
        "DropPath between the BatchNorm and the add (not an identity in training)": len(dropping)
    }, report.summary()
    ref = _leaky_relu_reference(model)
    for name in dropping:
        if blocks[name].downsample is None:
            ref.get_submodule(name).act3 = nn.ReLU(inplace=True)
    # eval: the DropPath modules stay leaves, so they are identities here although converted in training
    x = _x(2, 3, 64, 64)
    torch.testing.assert_close(conv.eval()(x), ref.eval()(x), rtol=1e-4, atol=1e-4)
