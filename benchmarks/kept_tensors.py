"""Where the fused model and torch.compile's memory budget differ, tensor by tensor (torchvision resnet50).

Lists, per residual block, what one training step keeps for backward:

* ``torch.compile`` of the BatchNorm + ReLU model with ``torch._functorch.config.activation_memory_budget =
  B``: the inputs of the backward graph that the partitioner chose (inductor's decompositions and its
  min-cut partitioner, as ``torch.compile`` runs them; the graphs themselves run uncompiled), each under
  the module whose forward produced it;
* this package, eager (``convert_model``: fused residual layers, ``RecomputeMaxPool2d``): the tensors
  autograd saves (saved-tensor hooks), under the module running when each storage was first saved.

Parameters and the input image are excluded from both. Bytes at the given batch, MB = 1e6 bytes.

    python benchmarks/kept_tensors.py [--budget 0.5] [--batch 2] [--size 224]

Needs torchvision usable with the installed torch. Prints a markdown table (README, "Residual networks").
"""

from __future__ import annotations

import argparse
import collections
import copy
import functools
import re
import sys
import warnings
from pathlib import Path

import torch
import torch.nn as nn

try:  # the installed package, else the source tree (see bench_residual.py)
    import inplace_abn  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _provenance import float_range, int_range, provenance  # noqa: E402  (benchmarks/, the script's folder)
from bench_residual import nontrivial_batchnorm  # noqa: E402

from inplace_abn import convert_model  # noqa: E402
from inplace_abn.memory import parameters_of, saved_tensor_bytes  # noqa: E402

MB = 1e6


def _place(module_name: str) -> tuple[str, str]:
    """("layer1.0", "conv3") for a module inside a residual block, ("stem/head", name) otherwise."""
    m = re.match(r"(layer\d\.\d+)\.(.+)", module_name)
    return (m.group(1), m.group(2)) if m else ("stem/head", module_name)


def compiler_kept(model: nn.Module, x: torch.Tensor, budget: float) -> collections.Counter:
    """(place, "module:op") -> bytes the budget's partitioner keeps for backward."""
    import torch._functorch.config as functorch_config  # the budget's documented knob
    import torch._inductor.lowering  # noqa: F401 - inductor's decompositions consult it
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table

    graphs = {}

    def record(name):
        def compiler(gm, example_inputs):
            graphs.setdefault(name, gm)
            return make_boxed_func(gm.forward)

        return compiler

    backend = aot_autograd(
        fw_compiler=record("fw"),
        bw_compiler=record("bw"),
        decompositions=select_decomp_table(),
        partition_fn=functools.partial(min_cut_rematerialization_partition, compiler="inductor"),
    )
    with functorch_config.patch(activation_memory_budget=budget):
        torch.compile(model, backend=backend, fullgraph=True)(x).sum().backward()
    forward_nodes = {n.name: n for n in graphs["fw"].graph.nodes}
    kept = collections.Counter()
    for node in graphs["bw"].graph.find_nodes(op="placeholder"):
        value, source = node.meta.get("val"), forward_nodes.get(node.name)
        if "tangents" in node.name or not isinstance(value, torch.Tensor) or source is None:
            continue
        if source.op == "placeholder":  # a parameter or the input
            continue
        stack = source.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else "?"
        # dynamo's spelling of a module path, e.g. L['self'].layer1[0].conv1 -> layer1.0.conv1
        path = re.sub(r"\[(\d+)\]", r".\1", path.replace("L['self'].", "").replace("L['self']", ""))
        place, module = _place(path)
        op = str(source.target).replace("aten.", "").replace(".default", "")
        kept[(place, f"{module}:{op}")] += value.numel() * value.element_size()
    return kept


def eager_kept(model: nn.Module, x: torch.Tensor) -> collections.Counter:
    """(place, "module:class") -> bytes autograd keeps for backward, eager."""
    modules = dict(model.named_modules())
    current = ["?"]
    for name, m in modules.items():
        if not list(m.children()):
            m.register_forward_pre_hook(lambda mod, inp, name=name: current.__setitem__(0, name))
    kept = collections.Counter()

    def on_save(key, tensor):
        place, module = _place(current[0])
        kept[(place, f"{module}:{type(modules[current[0]]).__name__}")] += tensor.untyped_storage().nbytes()

    _, loss, _ = saved_tensor_bytes(lambda: model(x).sum(), exclude=parameters_of(model) + [x], on_save=on_save)
    loss.backward()
    return kept


def _cell(kept: collections.Counter, place: str) -> str:
    items = sorted((k[1], v) for k, v in kept.items() if k[0] == place)
    return f"{sum(v for _, v in items) / MB:.2f}: " + ", ".join(f"{name} {v / MB:.2f}" for name, v in items)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float_range(0, 1, low_open=True), default=0.5)
    parser.add_argument("--batch", type=int_range(1), default=2)
    parser.add_argument("--size", type=int_range(32), default=224)
    args = parser.parse_args(argv)
    try:
        from torchvision.models import resnet50
    except Exception as exc:  # noqa: BLE001 - any import failure means: no torchvision here
        raise SystemExit(f"kept_tensors.py needs torchvision usable with this torch ({exc})") from exc
    bn = nontrivial_batchnorm(lambda: resnet50(weights=None))  # the model bench_residual.py measures
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = convert_model(copy.deepcopy(bn))
    x = torch.randn(args.batch, 3, args.size, args.size)
    compiled, eager = compiler_kept(copy.deepcopy(bn), x, args.budget), eager_kept(fused, x)
    meta = provenance()
    print(f"# resnet50 {args.batch}x3x{args.size}x{args.size}, torch {meta['torch_version']}, {meta['run_id']}")
    print(
        f"# kept for backward: torch.compile at budget {args.budget}: {sum(compiled.values()) / MB:.2f} MB; "
        f"this package, eager: {sum(eager.values()) / MB:.2f} MB"
    )
    print(f"| block | torch.compile, budget {args.budget} (MB) | this package, eager (MB) | difference |")
    print("|---|---|---|---|")
    places = sorted({k[0] for k in compiled} | {k[0] for k in eager}, key=lambda p: (p != "stem/head", p))
    for place in places:
        diff = sum(v for k, v in eager.items() if k[0] == place) - sum(v for k, v in compiled.items() if k[0] == place)
        print(f"| {place} | {_cell(compiled, place)} | {_cell(eager, place)} | {diff / MB:+.2f} |")


if __name__ == "__main__":
    main()
