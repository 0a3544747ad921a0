"""Deployment: in eval mode under export the layer lowers to standard operators.

torch.export and the ONNX exporter then see only aten / ONNX standard ops (batch_norm with weight
|w| + eps, then the activation), so any runtime and graph pass understands the exported model.
"""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch
from torch import nn

import inplace_abn
from inplace_abn import InPlaceABN

ACTIVATIONS = [("leaky_relu", 0.01), ("elu", 1.0), ("identity", 0.0), ("relu", 0.0)]


def _model(activation: str, param: float, dims: int = 2) -> nn.Module:
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # relu: "saves no memory"
        model = nn.Sequential(
            conv(3, 8, 3, padding=1),
            InPlaceABN(8, activation=activation, activation_param=param),
            conv(8, 4, 1),
            InPlaceABN(4, activation=activation, activation_param=param),
        )
    for layer in model:
        if isinstance(layer, InPlaceABN):
            with torch.no_grad():  # negative and tiny weights too: the exported scale must be |w| + eps
                layer.weight.uniform_(-1.5, 2.0)
                layer.weight[0] = 0.0
                layer.bias.uniform_(-1, 1)
                layer.running_mean.uniform_(-1, 1)
                layer.running_var.uniform_(0.5, 2)
    return model.eval()


def _input(dims: int = 2) -> torch.Tensor:
    return torch.randn((2, 3) + (9, 11, 5)[:dims])


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("activation,param", ACTIVATIONS)
def test_torch_export_lowers_to_standard_ops(activation, param, dims):
    model, x = _model(activation, param, dims), _input(dims)
    with torch.no_grad():
        expected = model(x.clone())
    program = torch.export.export(model, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("inplace_abn" in t for t in targets), targets
    assert any("batch_norm" in t for t in targets), targets
    torch.testing.assert_close(program.module()(x.clone()), expected, atol=1e-6, rtol=1e-5)


def test_export_does_not_touch_training_or_eager_eval():
    """Outside export the fused op runs (in place); training is never lowered."""
    model, x = _model("leaky_relu", 0.01), _input()
    layer = model[1]

    def reference(inp, training):
        return inplace_abn.reference.batch_norm_act(
            inp, layer.weight, layer.bias, layer.running_mean.clone(), layer.running_var.clone(), training,
            layer.momentum, layer.eps, "leaky_relu", 0.01,
        ).float()  # fmt: skip

    with torch.no_grad():
        inp = model[0](x)
        expected = reference(inp, False)
        out = layer(inp)
    assert out is inp  # eager eval: in place, fused kernel
    torch.testing.assert_close(out, expected)
    model.train()
    inp = model[0](x)
    expected = reference(inp.detach(), True)
    rm, rv = layer.running_mean.clone(), layer.running_var.clone()
    out = layer(inp)
    assert out is inp
    torch.testing.assert_close(out.detach(), expected.detach())
    assert not torch.equal(layer.running_mean, rm) and not torch.equal(layer.running_var, rv)  # trained
    assert layer.num_batches_tracked.item() == 1


_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime", "onnxscript"))


@pytest.mark.skipif(not _ONNX, reason="onnx, onnxruntime and onnxscript are not installed (pip install them)")
@pytest.mark.parametrize("activation,param", ACTIVATIONS)
def test_onnx_export_runs_in_onnxruntime(tmp_path, activation, param):
    import onnxruntime

    model, x = _model(activation, param), _input()
    with torch.no_grad():
        expected = model(x.clone())
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True, verbose=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), expected, atol=1e-5, rtol=1e-4)


def test_export_uses_the_in_place_scale():
    """The lowered graph scales by |w| + eps, exactly as the fused kernels."""
    layer = InPlaceABN(3, activation="identity").eval()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([-2.0, 0.0, 0.5]))
    program = torch.export.export(layer, (torch.randn(4, 3, 2),))
    x = torch.randn(4, 3, 2)
    expected = inplace_abn.reference.batch_norm_act(
        x, layer.weight, layer.bias, layer.running_mean, layer.running_var, False, 0.1, 1e-5, "identity", 0.0
    )
    torch.testing.assert_close(program.module()(x), expected.float())


def test_conv_bn_folding_after_to_batchnorm():
    """to_batchnorm gives plain Conv -> BatchNorm -> activation, which standard passes fold."""
    from torch.fx.experimental.optimization import fuse

    model, x = _model("leaky_relu", 0.01), _input()
    with torch.no_grad():
        expected = model(x.clone())
    plain = inplace_abn.to_batchnorm(model)
    assert not any(isinstance(m, inplace_abn.ABN) for m in plain.modules())
    folded = fuse(plain)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules()), "conv-BN pairs were not folded"
    with torch.no_grad():
        torch.testing.assert_close(folded(x), expected, atol=1e-5, rtol=1e-5)
