"""Module-level drop-in behaviour: state dicts, constructor, repr, attributes, warnings, identity of the
output tensor, autograd safety, import surface, copying, and a training step inside a model."""

from __future__ import annotations

import copy
import importlib
import io
import os
import pickle
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import assert_close

import inplace_abn
import inplace_abn.activations as activations
from inplace_abn import ABN, InPlaceABN, InPlaceABNSync
from inplace_abn.reference import batch_norm_act

MODULES = [ABN, InPlaceABN, InPlaceABNSync]
EPS = 1e-5


def _no_dist():
    return not (dist.is_available() and dist.is_initialized())


@pytest.fixture
def fresh_relu_warning(monkeypatch):
    """Re-arms the once-per-process ReLU warning for the duration of a test."""
    monkeypatch.setattr(activations, "_warned_non_invertible", False)


@pytest.fixture
def quiet():
    """Silences the expected warnings (sync without torch.distributed, ReLU) where not under test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _set_random_state(m, c=4):
    with torch.no_grad():
        if m.weight is not None:
            m.weight.copy_(torch.randn(c))
            m.bias.copy_(torch.randn(c))
        if m.running_mean is not None:
            m.running_mean.copy_(torch.randn(c))
            m.running_var.copy_(torch.rand(c) + 0.5)
            m.num_batches_tracked.fill_(7)


# ---------------------------------------------------------------------------------------------------
# state dicts
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
def test_state_dict_matches_batchnorm2d(cls, affine, track):
    m = cls(8, 1e-5, 0.1, affine, track)
    bn = nn.BatchNorm2d(8, 1e-5, 0.1, affine, track)
    sd, ref = m.state_dict(), bn.state_dict()
    assert list(sd.keys()) == list(ref.keys())
    for k in ref:
        assert sd[k].shape == ref[k].shape and sd[k].dtype == ref[k].dtype, k
        assert_close(sd[k], ref[k])  # same initial values (weight 1, bias 0, mean 0, var 1, count 0)
    assert [n for n, _ in m.named_parameters()] == [n for n, _ in bn.named_parameters()]
    assert [n for n, _ in m.named_buffers()] == [n for n, _ in bn.named_buffers()]
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert (getattr(m, name) is None) == (getattr(bn, name) is None), name
    # Loadable both ways with strict=True.
    m.load_state_dict(bn.state_dict())
    bn.load_state_dict(m.state_dict())


@pytest.mark.parametrize("version", [1, None], ids=["version1", "no-version"])
@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
def test_old_state_dict_without_num_batches_tracked(cls, version):
    src = cls(4)
    _set_random_state(src)
    sd = src.state_dict()
    del sd["num_batches_tracked"]
    if version is None:
        del sd._metadata
    else:
        sd._metadata[""]["version"] = version
    dst = cls(4)
    dst.num_batches_tracked.fill_(3)
    result = dst.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert dst.num_batches_tracked.item() == 0 and dst.num_batches_tracked.dtype == torch.long
    assert_close(dst.running_mean, src.running_mean)
    assert_close(dst.running_var, src.running_var)
    assert_close(dst.weight, src.weight)


def test_old_state_dict_nested_prefix():
    """Backfill also works for a layer inside a model (prefixed keys), as nn.BatchNorm."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), InPlaceABN(4))
    sd = model.state_dict()
    del sd["1.num_batches_tracked"]
    sd._metadata["1"]["version"] = 1
    model2 = nn.Sequential(nn.Conv2d(3, 4, 1), InPlaceABN(4))
    model2[1].num_batches_tracked.fill_(9)
    model2.load_state_dict(sd)
    assert model2[1].num_batches_tracked.item() == 0


def test_missing_num_batches_tracked_with_version2_is_strict_error():
    """A current-version dict lacking the key is a genuine missing key (nn.BatchNorm behaves the same)."""
    sd = InPlaceABN(4).state_dict()
    del sd["num_batches_tracked"]
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        InPlaceABN(4).load_state_dict(sd)
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        nn.BatchNorm2d(4).load_state_dict(sd)


@pytest.mark.parametrize("pair", [(InPlaceABN, ABN), (ABN, InPlaceABN), (InPlaceABNSync, InPlaceABN)])
def test_state_dict_round_trip(pair):
    a_cls, b_cls = pair
    a = a_cls(4)
    _set_random_state(a)
    b = b_cls(4)
    b.load_state_dict(a.state_dict())
    a2 = a_cls(4)
    a2.load_state_dict(b.state_dict())
    for k, v in a.state_dict().items():
        assert_close(b.state_dict()[k], v, rtol=0, atol=0)
        assert_close(a2.state_dict()[k], v, rtol=0, atol=0)


def test_batchnorm_checkpoint_through_torch_save():
    a = InPlaceABN(4)
    _set_random_state(a)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = ABN(4)
    b.load_state_dict(torch.load(buf))
    assert_close(b.running_var, a.running_var)
    assert b.num_batches_tracked.item() == 7


# ---------------------------------------------------------------------------------------------------
# constructor, class hierarchy, repr, attributes
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
def test_positional_constructor_order(cls, quiet):
    m = cls(6, 1e-3, 0.2, False, False, "elu", 0.5)
    assert (m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats) == (6, 1e-3, 0.2, False, False)
    assert (m.activation, m.activation_param) == ("elu", 0.5)
    assert m.weight is None and m.running_mean is None and m.num_batches_tracked is None
    defaults = cls(6)
    assert (defaults.eps, defaults.momentum, defaults.affine, defaults.track_running_stats) == (1e-5, 0.1, True, True)
    assert (defaults.activation, defaults.activation_param) == ("leaky_relu", 0.01)


def test_sync_group_argument_is_eighth():
    sentinel = object()
    m = InPlaceABNSync(4, 1e-5, 0.1, True, True, "leaky_relu", 0.01, sentinel)
    assert m.group is sentinel
    assert InPlaceABNSync(4).group is None


def test_isinstance():
    assert isinstance(InPlaceABN(4), ABN)
    assert isinstance(InPlaceABNSync(4), ABN)
    assert isinstance(InPlaceABN(4), nn.Module)
    assert not isinstance(ABN(4), InPlaceABN)


@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
def test_extra_repr(cls):
    assert cls(64).extra_repr() == "64, eps=1e-05, momentum=0.1, affine=True, activation=leaky_relu[0.01]"
    assert cls(8, activation="identity").extra_repr() == "8, eps=1e-05, momentum=0.1, affine=True, activation=identity"
    assert cls(8, 1e-3, None, False, activation="elu", activation_param=1.0).extra_repr() == (
        "8, eps=0.001, momentum=None, affine=False, activation=elu[1.0]"
    )
    assert repr(cls(64)) == f"{cls.__name__}(64, eps=1e-05, momentum=0.1, affine=True, activation=leaky_relu[0.01])"


@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
def test_activation_attributes_are_read_at_forward(cls, quiet):
    m = cls(3, activation="leaky_relu", activation_param=0.5).eval()
    with torch.no_grad():
        m.running_mean.copy_(torch.tensor([0.5, -0.2, 0.1]))
    x = torch.randn(2, 3, 4, 5)
    before = m(x.clone())
    assert (before < 0).any()
    m.activation = "identity"
    after = m(x.clone())
    expected = batch_norm_act(x, m.weight, m.bias, m.running_mean.clone(), m.running_var.clone(), False, 0.1, EPS,
                              "identity", 0.0, in_place_weight=cls is not ABN).float()  # fmt: skip
    assert_close(after, expected)
    assert not torch.equal(before, after)
    m.activation, m.activation_param = "leaky_relu", 0.2
    assert_close(m(x.clone()), F.leaky_relu(expected, 0.2))
    m.activation, m.activation_param = "elu", 2.0
    assert_close(m(x.clone()), F.elu(expected, 2.0))
    assert "activation=elu[2.0]" in repr(m)


@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
def test_legacy_none_is_identity(cls, quiet):
    x = torch.randn(4, 3, 5)
    a = cls(3, activation="none")
    b = cls(3, activation="identity")
    assert_close(a(x.clone()), b(x.clone()), rtol=0, atol=0)
    ya = cls(3, activation="none")(x.clone())
    assert (ya < 0).any()  # nothing clipped


def test_invalid_activation_rejected_at_construction():
    with pytest.raises(ValueError):
        InPlaceABN(3, activation="gelu")
    with pytest.raises(ValueError):
        ABN(3, activation="leaky_relu", activation_param=-0.1)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    # In-place activation modules: in-place ELU differentiates through its output (dy * (y + alpha)),
    # 1 ulp away from the out-of-place formula, and ABN is BatchNorm + in-place activation.
    "activation,param,act", [("leaky_relu", 0.1, nn.LeakyReLU(0.1, True)), ("elu", 0.7, nn.ELU(0.7, True)),
                             ("relu", 0.0, nn.ReLU(True)), ("identity", 0.0, nn.Identity())],
    ids=["leaky", "elu", "relu", "identity"],
)  # fmt: skip
def test_abn_equals_batchnorm_with_raw_weight(activation, param, act, training):
    m = ABN(4, activation=activation, activation_param=param)
    bn = nn.BatchNorm2d(4)
    w, b = torch.tensor([1.5, -0.7, 0.0, 0.3]), torch.randn(4)
    with torch.no_grad():
        for layer in (m, bn):
            layer.weight.copy_(w)
            layer.bias.copy_(b)
            layer.running_mean.copy_(torch.arange(4.0) / 10)
            layer.running_var.copy_(torch.arange(4.0) + 0.5)
    m.train(training)
    ref = nn.Sequential(bn, act).train(training)
    x0 = torch.randn(3, 4, 5, 6, requires_grad=True)
    x1 = x0.detach().clone().requires_grad_()
    y, yr = m(x0), ref(x1)
    assert_close(y, yr, rtol=0, atol=0)
    g = torch.randn_like(y)
    y.backward(g)
    yr.backward(g)
    assert_close(x0.grad, x1.grad, rtol=0, atol=0)
    assert_close(m.weight.grad, bn.weight.grad, rtol=0, atol=0)
    assert_close(m.bias.grad, bn.bias.grad, rtol=0, atol=0)
    assert_close(m.running_mean, bn.running_mean, rtol=0, atol=0)
    assert_close(m.running_var, bn.running_var, rtol=0, atol=0)
    assert m.num_batches_tracked.item() == bn.num_batches_tracked.item()


@pytest.mark.parametrize("cls", [InPlaceABN, InPlaceABNSync], ids=lambda c: c.__name__)
def test_inplace_layers_scale_by_abs_weight_plus_eps(cls, quiet):
    m = cls(4, activation="leaky_relu", activation_param=0.1)
    bn = nn.BatchNorm2d(4)
    w, b = torch.tensor([1.5, -0.7, 0.0, 0.3]), torch.randn(4)
    with torch.no_grad():
        m.weight.copy_(w)
        m.bias.copy_(b)
        bn.weight.copy_(w.abs() + m.eps)
        bn.bias.copy_(b)
    x = torch.randn(3, 4, 5, 6)
    expected = F.leaky_relu(bn(x.clone()), 0.1)
    assert_close(m(x.clone()), expected)
    # With the raw weight the negative / zero channels would differ: the test distinguishes the two.
    with torch.no_grad():
        bn.weight.copy_(w)
    assert not torch.allclose(F.leaky_relu(bn(x.clone()), 0.1), expected)


def test_sync_without_distributed_warns_and_equals_inplace_abn(monkeypatch):
    """Training without torch.distributed warns once per process; eval needs no collective and never warns."""
    assert _no_dist()
    monkeypatch.setattr(inplace_abn.sync, "_warned_no_distributed", False)
    a, s = InPlaceABN(4), InPlaceABNSync(4)
    _set_random_state(a)
    s.load_state_dict(a.state_dict())
    for step, training in enumerate((True, True, False)):
        a.train(training)
        s.train(training)
        x0 = torch.randn(3, 4, 5, 5, requires_grad=True)
        x1 = x0.detach().clone().requires_grad_()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ys = s(x1.clone())
        ours = [w for w in caught if "torch.distributed is not initialised" in str(w.message)]
        assert len(ours) == (1 if step == 0 else 0), [str(w.message) for w in caught]
        ya = a(x0.clone())
        assert_close(ys, ya)
        g = torch.randn_like(ya)
        ya.backward(g)
        ys.backward(g)
        assert_close(x1.grad, x0.grad)
        assert_close(s.weight.grad, a.weight.grad)
        assert_close(s.bias.grad, a.bias.grad)
        assert_close(s.running_mean, a.running_mean)
        assert_close(s.running_var, a.running_var)
        assert s.num_batches_tracked.item() == a.num_batches_tracked.item()


def test_set_active_group_reaches_all_sync_modules():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1),
        InPlaceABNSync(4),
        nn.Sequential(InPlaceABN(4), InPlaceABNSync(4, group="initial")),
    )
    sentinel = object()
    inplace_abn.set_active_group(model, sentinel)
    assert model[1].group is sentinel and model[2][1].group is sentinel
    assert not hasattr(model[2][0], "group")
    inplace_abn.set_active_group(model, None)
    assert model[1].group is None and model[2][1].group is None


def test_set_group_method():
    m = InPlaceABNSync(4)
    sentinel = object()
    m.set_group(sentinel)
    assert m.group is sentinel


def test_active_group_requires_distributed():
    assert _no_dist()
    with pytest.raises(RuntimeError, match="init_process_group"):
        inplace_abn.active_group(True)
    with pytest.raises(RuntimeError, match="torch.distributed"):
        inplace_abn.group.active_group(False)


# ---------------------------------------------------------------------------------------------------
# in-place semantics and autograd safety
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
def test_output_is_input_object(backend, training):
    m = InPlaceABN(4).train(training)
    x = torch.randn(2, 4, 3, 3)
    ptr = x.data_ptr()
    expected = batch_norm_act(x.clone(), m.weight, m.bias, m.running_mean.clone(), m.running_var.clone(), training,
                              0.1, EPS, "leaky_relu", 0.01).float()  # fmt: skip
    y = m(x)
    assert y is x
    assert y.data_ptr() == ptr
    assert_close(x, expected)
    # Also with autograd (a non-leaf input).
    leaf = torch.randn(2, 4, 3, 3, requires_grad=True)
    h = leaf * 2
    ptr = h.data_ptr()
    out = m(h)
    assert out is h and out.data_ptr() == ptr and out.grad_fn is not None


def test_functional_returns_input_object(backend):
    for fn in (inplace_abn.functions.inplace_abn, inplace_abn.functions.inplace_abn_sync):
        x = torch.randn(3, 2, 4)
        expected = batch_norm_act(x.clone(), None, None, None, None, True, 0.1, EPS, "leaky_relu", 0.01).float()
        ptr = x.data_ptr()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # sync without torch.distributed
            y = fn(x, None, None, None, None, True, 0.1, EPS, "leaky_relu", 0.01)
        assert y is x and y.data_ptr() == ptr
        assert_close(x, expected)


@pytest.mark.parametrize("activation,param", [("leaky_relu", 0.01), ("elu", 1.0), ("identity", 0.0), ("relu", 0.0)])
def test_inplace_modification_of_output_is_detected(backend, activation, param, quiet):
    m = InPlaceABN(4, activation=activation, activation_param=param)
    x0 = torch.randn(2, 4, 3, 3, requires_grad=True)
    y = m(x0 * 1)
    y.mul_(2)  # e.g. a following ReLU(inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_following_inplace_relu_is_detected(backend):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), InPlaceABN(4), nn.ReLU(inplace=True))
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        model(x).sum().backward()


def test_leaf_requiring_grad_is_refused(backend):
    x = torch.randn(2, 4, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf"):
        InPlaceABN(4)(x)


def test_create_graph_gives_first_order_grads_and_refuses_second_order(backend):
    """backward(create_graph=True) (e.g. for a gradient penalty elsewhere in the model) gives the same
    first-order gradients; differentiating through the layer's own backward raises instead of being wrong."""
    torch.manual_seed(0)
    base = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    grads = []
    for create_graph in (False, True):
        layer = InPlaceABN(3).double()
        with torch.no_grad():
            layer.weight.copy_(torch.tensor([0.5, -2.0, 0.0]))
        y = layer(base * 1.0)
        grads.append(torch.autograd.grad(y.square().sum(), [base, layer.weight], create_graph=create_graph))
    for plain, graphed in zip(*grads):
        assert_close(graphed, plain)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grads[1][0].sum().backward()


def test_torch_func_transforms_are_refused_naming_the_layer(backend):
    """The layer's autograd.Function has no vmap rule: vmap raises (instead of running unbatched) with a
    message naming the layer and the way out, PyTorch's own refusal chained as the cause."""
    x = torch.randn(3, 2, 4, 5)
    weight, bias = torch.ones(4), torch.zeros(4)
    with pytest.raises(RuntimeError, match="inplace_abn .* cannot run under torch.func transforms") as e:
        torch.func.vmap(lambda t: inplace_abn.functions.inplace_abn(t.clone(), weight, bias, None, None))(x)
    assert "setup_context" in str(e.value.__cause__)


@pytest.mark.skipif(not inplace_abn.extension_loaded(), reason="needs both backends")
@pytest.mark.parametrize("forward_backend,backward_backend", [("python", "cpp"), ("cpp", "python")])
def test_backend_may_change_between_forward_and_backward(forward_backend, backward_backend):
    """Both backends keep the same state for backward (y, var); the backward of either backend takes the
    state of either forward and gives the same gradients."""
    torch.manual_seed(0)
    base = torch.randn(4, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.tensor([0.5, -2.0, 0.0], dtype=torch.float64)
    grads = []
    for backends in ((forward_backend, forward_backend), (forward_backend, backward_backend)):
        layer = InPlaceABN(3).double()
        with torch.no_grad():
            layer.weight.copy_(weight)
        with inplace_abn.use_backend(backends[0]):
            y = layer(base * 1.0)
        with inplace_abn.use_backend(backends[1]):
            grads.append(torch.autograd.grad(y.square().sum(), [base, layer.weight, layer.bias]))
    for same, switched in zip(*grads):
        assert_close(switched, same)


@pytest.mark.parametrize("spelling", [("relu", 0.01), ("leaky_relu", 0.0)], ids=["relu", "leaky0"])
def test_relu_mode_warns_once_and_is_correct(backend, spelling, fresh_relu_warning):
    activation, param = spelling
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = InPlaceABN(4, activation=activation, activation_param=param)
        x0 = torch.randn(3, 4, 5, 5, requires_grad=True)
        g = torch.randn(3, 4, 5, 5)
        y = m(x0.clone())
        y.backward(g)
        m2 = InPlaceABN(4, activation=activation, activation_param=param)
        m2(torch.randn(2, 4, 3, 3))
    relu_warnings = [w for w in caught if issubclass(w.category, RuntimeWarning) and "not invertible" in str(w.message)]
    assert len(relu_warnings) == 1, [str(w.message) for w in caught]
    assert "memory" in str(relu_warnings[0].message)
    w_ref = torch.ones(4, dtype=torch.float64, requires_grad=True)  # the module's initial weight
    b_ref = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    xr = x0.detach().double().requires_grad_()
    yr = batch_norm_act(xr, w_ref, b_ref, None, None, True, 0.1, EPS, "relu", 0.0)
    yr.backward(g.double())
    assert_close(y, yr.float())
    assert (y == 0).any()  # the dead half is present, so the wrong-gradient defect would show
    assert_close(x0.grad, xr.grad.float(), atol=1e-5, rtol=1e-4)
    assert_close(m.weight.grad, w_ref.grad.float(), atol=1e-4, rtol=1e-4)
    assert_close(m.bias.grad, b_ref.grad.float(), atol=1e-4, rtol=1e-4)


def test_relu_mode_warns_on_functional_call(fresh_relu_warning):
    with pytest.warns(RuntimeWarning, match="memory"):
        inplace_abn.functions.inplace_abn(torch.randn(3, 2, 4), None, None, None, None, True, 0.1, 1e-5, "relu", 0.0)


def test_abn_relu_does_not_warn(fresh_relu_warning):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = ABN(4, activation="relu")
        y = m(torch.randn(2, 4, 3))
    assert (y >= 0).all() and (y == 0).any()
    assert activations._warned_non_invertible is False


# ---------------------------------------------------------------------------------------------------
# import surface and backend
# ---------------------------------------------------------------------------------------------------


def test_import_surface():
    assert isinstance(inplace_abn.__version__, str) and inplace_abn.__version__
    for name in ("inplace_abn.abn", "inplace_abn.functions", "inplace_abn.group"):
        importlib.import_module(name)
    from inplace_abn.abn import ABN as A  # noqa: N817
    from inplace_abn.abn import InPlaceABN as I
    from inplace_abn.abn import InPlaceABNSync as S
    from inplace_abn.functions import inplace_abn as f
    from inplace_abn.functions import inplace_abn_sync as fs
    from inplace_abn.group import active_group, set_active_group

    assert (A, I, S) == (ABN, InPlaceABN, InPlaceABNSync)
    assert callable(f) and callable(fs)
    assert inplace_abn.active_group is active_group and inplace_abn.set_active_group is set_active_group


def test_default_backend_is_the_one_the_environment_selects():
    """cpp whenever the extension loaded, unless INPLACE_ABN_BACKEND=python asks for the pure path; the
    compiled ops are registered exactly when the extension loaded, whichever backend is selected."""
    requested = os.environ.get("INPLACE_ABN_BACKEND", "").strip().lower()
    loaded = inplace_abn.extension_loaded()
    assert inplace_abn.get_backend() == ("python" if requested == "python" or not loaded else "cpp"), requested
    assert hasattr(torch.ops.inplace_abn, "forward_") == loaded, inplace_abn.extension_error()


# ---------------------------------------------------------------------------------------------------
# copying and use in a model
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
def test_deepcopy_and_pickle(cls, quiet):
    m = cls(4, 1e-4, None, True, True, "elu", 0.5)
    _set_random_state(m)
    x = torch.randn(2, 4, 3, 3)
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert type(clone) is cls
        assert (clone.eps, clone.momentum, clone.activation, clone.activation_param) == (1e-4, None, "elu", 0.5)
        for k, v in m.state_dict().items():
            assert_close(clone.state_dict()[k], v, rtol=0, atol=0)
            assert clone.state_dict()[k].data_ptr() != v.data_ptr()
        assert_close(clone.eval()(x.clone()), copy.deepcopy(m).eval()(x.clone()), rtol=0, atol=0)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert_close(loaded.running_var, m.running_var)


@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
def test_trains_in_sequential(backend, cls, quiet):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        cls(8),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        cls(8, activation="elu", activation_param=1.0),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    )
    x, target = torch.randn(8, 3, 6, 6), torch.randint(0, 2, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss0 = F.cross_entropy(model(x), target)
    opt.zero_grad()
    loss0.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    opt.step()
    with torch.no_grad():
        loss1 = F.cross_entropy(model(x), target)
    assert loss1 < loss0
    assert model[1].num_batches_tracked.item() == 2
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
