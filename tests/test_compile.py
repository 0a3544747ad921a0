"""torch.compile of models containing InPlaceABN: no graph break, eager-equal results, one saved activation.

(a) ``torch._dynamo.explain``: zero graph breaks (train and eval, both backends).
(b) ``torch.compile(fullgraph=True)`` (inductor, and aot_eager) vs eager over 3 training steps with an SGD
    update in between: outputs, input grad, every parameter grad, running_mean/var, num_batches_tracked;
    train and eval; float64 and float32; backends "cpp" and "python".
(c) dynamic shapes: ``dynamic=True`` serves 3 (N, H, W) shapes with one compiled frame, results equal eager.
(d) what the compiled training step keeps for backward, counted two ways:
    - at run time, with ``torch.autograd.graph.saved_tensors_hooks`` around the *inductor*-compiled module:
      AOTAutograd's ``CompiledFunction`` stores its residuals with ``ctx.save_for_backward``, so the pack
      hook sees exactly the tensors the compiled backward will read;
    - on the AOT graphs: ``aot_autograd`` with recording compilers; the residuals are the backward graph's
      placeholders that are not ``tangents_*`` (checked with both AOT partitioners).
    Full-size activations (numel N * C * H * W of the normalised layers) are counted per distinct storage /
    graph value and compared with BatchNorm2d + activation(inplace=True).

Switching the inplace_abn backend changes what dynamo traces, so every compile starts from
``torch._dynamo.reset()``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from helpers import COMPILED_TOLERANCES, aot_recording_backend, check_close, set_module_state

import inplace_abn
from inplace_abn import InPlaceABN

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

C = 8  # channels of every normalised layer: the full-activation size is N * C * H * W
SHAPE = (4, 3, 8, 8)


def _randomise(m: nn.Module, dtype: torch.dtype) -> None:
    """Random state of every norm layer (one negative weight; a BatchNorm2d gets |w| + eps), then ``dtype``."""
    for mod in m.modules():
        if isinstance(mod, (InPlaceABN, nn.BatchNorm2d)):
            set_module_state(mod, mod.num_features, in_place_weight=isinstance(mod, InPlaceABN))
    m.to(dtype)


def make_model(kind: str = "iabn", dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """Conv -> layer(leaky_relu 0.01) -> Conv -> layer(elu 1.0) -> Conv -> layer(identity)."""
    torch.manual_seed(seed)
    if kind == "iabn":
        norm = [
            lambda: InPlaceABN(C, activation="leaky_relu", activation_param=0.01),
            lambda: InPlaceABN(C, activation="elu", activation_param=1.0),
            lambda: InPlaceABN(C, activation="identity"),
        ]
    else:  # the reference: BatchNorm2d followed by the in-place activation module
        norm = [
            lambda: nn.Sequential(nn.BatchNorm2d(C), nn.LeakyReLU(0.01, inplace=True)),
            lambda: nn.Sequential(nn.BatchNorm2d(C), nn.ELU(1.0, inplace=True)),
            lambda: nn.BatchNorm2d(C),
        ]
    layers = []
    cin = SHAPE[1]
    for make_norm in norm:
        layers += [nn.Conv2d(cin, C, 3, padding=1, bias=False), make_norm()]
        cin = C
    model = nn.Sequential(*layers)
    _randomise(model, dtype)
    return model


def run_steps(model, shapes, dtype, train, steps_per_shape=1, lr=0.05):
    """Steps of (forward, weighted-sum loss, backward, SGD update); returns what each step produced."""
    model.train(train)
    named = getattr(model, "_orig_mod", model)  # an OptimizedModule prefixes names with "_orig_mod."
    records = []
    gen = torch.Generator().manual_seed(1234)
    for shape in shapes:
        for _ in range(steps_per_shape):
            x = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
            out = model(x)
            w = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype)
            (out * w).sum().backward()
            rec = {"out": out.detach().clone(), "dx": x.grad.clone()}
            for name, p in named.named_parameters():
                rec["grad." + name] = p.grad.clone()
            with torch.no_grad():
                for p in model.parameters():
                    p -= lr * p.grad
                    p.grad = None
            for name, b in named.named_buffers():
                rec["buf." + name] = b.clone()
            records.append(rec)
    return records


def compare(compiled_records, eager_records, dtype):
    assert len(compiled_records) == len(eager_records)
    for step, (c, e) in enumerate(zip(compiled_records, eager_records)):
        assert c.keys() == e.keys()
        for key in e:
            if key.endswith("num_batches_tracked"):
                assert c[key].item() == e[key].item(), f"step {step} {key}"
            else:
                check_close(c[key], e[key], dtype, f"step {step} {key}", tol=COMPILED_TOLERANCES[dtype])


# ------------------------------------------------------------------------------------------ (a) breaks
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_no_graph_break(backend, train):
    torch._dynamo.reset()
    model = make_model().train(train)
    explanation = torch._dynamo.explain(model)(torch.randn(SHAPE))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


# ------------------------------------------------------------------------------- (b) compiled == eager
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_compiled_matches_eager_inductor(backend, train, dtype):
    torch._dynamo.reset()
    eager = make_model(dtype=dtype)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    shapes = [SHAPE] * 3
    e = run_steps(eager, shapes, dtype, train)
    c = run_steps(compiled, shapes, dtype, train)
    compare(c, e, dtype)
    expected_batches = 3 if train else 0
    for m in compiled_model.modules():
        if isinstance(m, InPlaceABN):
            assert m.num_batches_tracked.item() == expected_batches
            assert m.running_mean.dtype == dtype


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_compiled_matches_eager_aot_eager(backend, train):
    """aot_eager runs the functionalised AOT graphs without inductor: isolates AOTAutograd's handling
    (auto_functionalized clone of the mutated input, partitioning) from inductor's codegen."""
    torch._dynamo.reset()
    dtype = torch.float64
    eager = make_model(dtype=dtype)
    compiled = torch.compile(copy.deepcopy(eager), backend="aot_eager", fullgraph=True)
    shapes = [SHAPE] * 3
    compare(run_steps(compiled, shapes, dtype, train), run_steps(eager, shapes, dtype, train), dtype)


# ------------------------------------------------------------------------------------ (c) dynamic shapes
# Non-square, pairwise-distinct sizes: a first shape with H == W would make dynamo's duck sizing guard
# H == W and recompile on the next shape, whatever the model.
DYNAMIC_SHAPES = [(4, 3, 8, 10), (3, 3, 10, 12), (5, 3, 7, 9)]


def _frames(kind, backend_name, dynamic, dtype=torch.float64, train=True):
    """(compiled frames, compiled records, eager records) for the 3 dynamic shapes."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = make_model(kind, dtype=dtype)
    eager(torch.randn(2, 3, 4, 5, dtype=dtype))  # first call outside dynamo (see test_no_recompile_on_first_use)
    eager = make_model(kind, dtype=dtype)
    compiled = torch.compile(copy.deepcopy(eager), backend=backend_name, fullgraph=True, dynamic=dynamic)
    c = run_steps(compiled, DYNAMIC_SHAPES, dtype, train)
    e = run_steps(eager, DYNAMIC_SHAPES, dtype, train)
    # dynamo's count of distinct compiled graphs (CompileCounterWithBackend.frame_count also counts
    # AOTAutograd's separate invocations and reads 2 for one graph)
    return counters["stats"]["unique_graphs"], c, e


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_dynamic_shapes_aot_eager_one_frame(backend, train):
    """dynamic=True through AOTAutograd: one compiled frame serves all 3 shapes, results equal eager."""
    frames, c, e = _frames("iabn", "aot_eager", True, train=train)
    compare(c, e, torch.float64)
    assert frames == 1, f"{frames} graphs for {len(DYNAMIC_SHAPES)} shapes"


@pytest.mark.parametrize("dynamic", [True, None], ids=["dynamic", "automatic"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_dynamic_shapes_inductor(backend, train, dynamic):
    """Inductor: results equal eager for the 3 shapes. Inductor's CPU convolution lowering itself
    specialises H and W (a Conv2d-only model recompiles per spatial size too, torch 2.13), so the frame
    count is compared with the nn.BatchNorm2d + activation model: the layer adds no recompile of its own."""
    frames, c, e = _frames("iabn", "inductor", dynamic, train=train)
    compare(c, e, torch.float64)
    reference_frames, _, _ = _frames("bn", "inductor", dynamic, train=train)
    assert frames <= reference_frames, f"InPlaceABN model {frames} frames, BatchNorm2d model {reference_frames}"


def test_no_recompile_on_first_use():
    """A fresh process whose first call of the layer is compiled must not recompile on the second call.

    KNOWN BUG (inplace_abn/_ops.py): ``_native`` resolves the op overloads lazily (``if _overloads is
    None: _overloads = _Overloads()``); dynamo guards on ``_overloads is None`` during the first trace,
    the assignment then makes that guard fail, so the second call recompiles (one extra frame)."""
    if not inplace_abn.extension_loaded():
        pytest.skip("compiled extension not loaded")
    import subprocess
    import sys

    script = (
        "import torch, torch.nn as nn\n"
        "from torch._dynamo.utils import counters\n"
        "import inplace_abn\n"
        "inplace_abn.set_backend('cpp')\n"
        "m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), inplace_abn.InPlaceABN(8))\n"
        "f = torch.compile(m, backend='aot_eager', fullgraph=True, dynamic=True)\n"
        "for s in [(4, 3, 8, 10), (3, 3, 10, 12)]:\n"
        "    f(torch.randn(s)).sum().backward()\n"
        "print(counters['stats']['unique_graphs'])\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "1", "recompiled on the second call: " + out.stdout


# ------------------------------------------------------------------------ (d) saved for backward, counted
def _activation_storages_saved_at_runtime(model, x):
    """Distinct storages of full-size activations (numel N*C*H*W) saved for backward by one forward."""
    act_numel = x.size(0) * C * x.size(2) * x.size(3)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}
    keep = []

    def pack(t):
        keep.append(t)  # keeps storages alive: data pointers cannot be reused within the forward
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return sum(1 for n in storages.values() if n == act_numel), out


# Derivation of the expected counts (3 normalised layers: leaky_relu, elu, identity):
#   InPlaceABN: each layer saves only its output y_i; y_1 and y_2 are also the inputs the next convs
#     save (same storage), y_3 is the model output.                                   -> 3 = 1 per layer.
#   BatchNorm2d + act(inplace): BN saves its input (the conv output), the in-place activation saves its
#     output (= the next conv's input): 2 for the leaky and elu layers; the last BN (no activation)
#     saves only its input.                                                           -> 2 + 2 + 1 = 5.
# The model input x (3 channels) is saved by the first conv in both models and is not full-size.
EXPECTED_ACTIVATIONS = {"iabn": 3, "bn": 5}


@pytest.mark.parametrize("kind", ["iabn", "bn"])
def test_saved_activations_eager_vs_inductor(backend, kind):
    torch._dynamo.reset()
    eager = make_model(kind)
    compiled = torch.compile(copy.deepcopy(eager), fullgraph=True)
    x = torch.randn(SHAPE, requires_grad=True)
    compiled(x).sum().backward()  # compile outside the hooks
    n_eager, out_e = _activation_storages_saved_at_runtime(eager, x)
    n_compiled, out_c = _activation_storages_saved_at_runtime(compiled, x)
    assert n_eager == EXPECTED_ACTIVATIONS[kind]
    assert n_compiled == EXPECTED_ACTIVATIONS[kind], (
        f"compiled {kind} keeps {n_compiled} full-size activations for backward, eager {n_eager}"
    )
    out_c.sum().backward()  # the saved tensors are the ones the compiled backward uses


@pytest.mark.parametrize("partition", ["default", "min_cut"])
@pytest.mark.parametrize("kind", ["iabn", "bn"])
def test_saved_activations_on_aot_graph(backend, kind, partition):
    backend_fn, graphs = aot_recording_backend(partition)
    torch._dynamo.reset()
    model = torch.compile(make_model(kind), backend=backend_fn, fullgraph=True)
    x = torch.randn(SHAPE, requires_grad=True)
    model(x).sum().backward()
    act_numel = SHAPE[0] * C * SHAPE[2] * SHAPE[3]
    residuals = [
        n for n in graphs["bw"].graph.nodes
        if n.op == "placeholder" and not n.name.startswith("tangents")
    ]  # fmt: skip
    full = [
        n.name for n in residuals if isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].numel() == act_numel
    ]
    assert len(full) == EXPECTED_ACTIVATIONS[kind], f"{kind} residuals of full size: {full}"
    if kind == "iabn" and backend == "cpp":
        # and nothing in the forward graph clones a full-size activation that survives into backward:
        # every full-size residual is an output of auto_functionalized (the layer's y), never a clone.
        fw_nodes = {n.name: n for n in graphs["fw"].graph.nodes}
        for name in full:
            node = fw_nodes[name]
            assert node.target.__name__ == "getitem", (name, node.target)
            assert "auto_functionalized" in str(node.args[0].target), (name, node.args[0].target)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_layer_overwriting_a_graph_input(backend, compiler, with_residual):
    """The tensor the layer overwrites is an input of the compiled graph (here the model's input; also the
    first tensor after a graph break). AOTAutograd used to apply the Function's write into it outside
    autograd and hand back the input with its old history: dx came out equal to dy, silently
    (functions._apply). Output, dx, d(residual), parameter gradients and the overwritten input equal eager."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = InPlaceABN(C, activation="leaky_relu", activation_param=0.1).double()
    with torch.no_grad():
        eager.weight.uniform_(0.5, 1.5)
        eager.bias.normal_()
    compiled_layer = copy.deepcopy(eager)
    x = torch.randn(2, C, 5, 4, dtype=torch.float64)
    r = torch.randn_like(x) if with_residual else None
    dy = torch.randn_like(x)
    results = []
    for layer in (eager, torch.compile(compiled_layer, backend=compiler, fullgraph=True)):
        leaf = x.clone().requires_grad_()
        r_leaf = None if r is None else r.clone().requires_grad_()
        inp = leaf * 1.0  # a non-leaf graph input, which the layer may overwrite
        y = layer(inp) if r_leaf is None else layer(inp, r_leaf)
        y.backward(dy)
        results.append((y.detach(), inp.detach(), leaf.grad, None if r_leaf is None else r_leaf.grad))
    (y_e, inp_e, dx_e, dr_e), (y_c, inp_c, dx_c, dr_c) = results
    tol = COMPILED_TOLERANCES[torch.float64]
    check_close(y_c, y_e, tol=tol, label="output")
    check_close(inp_c, y_e, tol=tol, label="the overwritten input")
    assert not torch.equal(dx_c, dy), "dx == dy: the layer's backward was dropped"
    check_close(dx_c, dx_e, tol=tol, label="dx")
    if with_residual:
        check_close(dr_c, dr_e, tol=tol, label="d(residual)")
    for name, p in eager.named_parameters():
        check_close(dict(compiled_layer.named_parameters())[name].grad, p.grad, tol=tol, label=f"grad {name}")
    torch._dynamo.reset()


def test_inductor_runs_layer_in_place_without_layout_optimization():
    """With inductor's CPU conv layout optimisation off, the compiled forward calls forward_train_ directly
    on the conv output (re-inplaced: no clone); with it on, inductor makes its conv outputs channels_last
    and copies each into a contiguous buffer before the layer (transient, not saved for backward)."""
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    if not inplace_abn.extension_loaded():
        pytest.skip("compiled extension not loaded")
    with inplace_abn.use_backend("cpp"):
        torch._dynamo.reset()
        with inductor_config.patch(layout_optimization=False):
            compiled = torch.compile(make_model(), fullgraph=True)
            x = torch.randn(SHAPE, requires_grad=True)
            _, codes = run_and_get_code(lambda: compiled(x).sum().backward())
    forward_code = codes[0]
    calls = [line for line in forward_code.splitlines() if "inplace_abn.forward_train_.default(" in line]
    assert len(calls) == 3
    # no kernel named after the layer (that would be the functionalisation clone of its input)
    assert "cpp_fused_forward_train_" not in forward_code
    for line in calls:
        arg = line.split("forward_train_.default(")[1].split(",")[0]
        assert f"{arg} = extern_kernels.convolution(" in forward_code, line
