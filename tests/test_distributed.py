"""Synchronised In-Place ABN across real processes (torch.multiprocessing "spawn", gloo, 127.0.0.1 only).

Every multi-process check is compared with ONE process running the local layer over the concatenated
batch (float64, tolerance 1e-10). To keep the file fast, each spawned job runs many cases and returns its
raw per-rank results (torch.save into tmp files); the tests below only compare. Every job has a hard
wall-clock limit: on expiry the processes are killed and the test fails with a message, so a collective
that never completes can never hang CI.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import inplace_abn
from inplace_abn import InPlaceABN, InPlaceABNSync, active_group, convert_local, convert_sync, set_active_group
from inplace_abn.functions import inplace_abn_sync
from inplace_abn.reference import batch_norm_act

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)

BACKENDS = ["cpp", "python"] if inplace_abn.extension_loaded() else ["python"]
ACTIVATIONS = [("leaky_relu", 0.01), ("elu", 1.0), ("identity", 0.0)]
C = 4
TOL = dict(rtol=0.0, atol=1e-10)
GLOO_TIMEOUT_S = 20  # timeout of the process group in the normal jobs
JOB_TIMEOUT_S = 120  # hard wall-clock limit of one spawned job (normal jobs take a few seconds)
# Data of the layer cases: per-rank batch sizes and spatial sizes (unequal on purpose).
SIZES = {
    2: {"equal": [(3, 5, 4), (5, 5, 4)], "spatial": [(2, 3, 7), (3, 6, 2)]},
    3: {"equal": [(2, 5, 4), (3, 5, 4), (5, 5, 4)], "spatial": [(2, 3, 7), (3, 6, 2), (1, 4, 5)]},
}
STEPS = 2  # two steps per case: the running statistics are compounded with the global counts


# --------------------------------------------------------------------------------------------------
# Harness
# --------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, world: int, port: int, timeout_s: float) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def _entry(rank: int, world: int, port: int, job: str, outdir: str, payload: Any) -> None:
    """Process entry point: runs JOBS[job] and writes rank{r}.pt (result) or rank{r}.err (traceback)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if os.path.exists("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    torch.set_num_threads(1)
    torch.manual_seed(1234 + rank)
    code = 0
    try:
        result = JOBS[job](rank, world, port, payload)
        torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
    except BaseException:  # reported by the parent from the .err file, not printed here
        code = 1
        with open(os.path.join(outdir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass
    # Leave without the interpreter's teardown: a c10d / gloo background thread that is still joinable
    # then makes std::terminate abort the process ("terminate called without an active exception",
    # exit code -6) after the job has succeeded and written its result. Seen in full-suite runs.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _spawn(job: str, world: int, outdir: str, payload: Any = None, limit_s: float = JOB_TIMEOUT_S) -> dict[str, Any]:
    """Runs ``job`` on ``world`` processes; returns {"results", "errors", "exitcodes", "hung", "elapsed", "ended"}
    (``ended``: "done", "port taken" or "deadline"), with "retried_after" (the first attempt's dict) on a retry.

    Never blocks longer than ``limit_s``: stragglers are terminated (then killed) and reported as None.
    The port comes from ``_free_port``, which cannot reserve it: if another process takes it before
    rank 0 binds, the job is run once more on a new port (only for that error, never for others).
    """
    run = _spawn_once(job, world, os.path.join(outdir, "try0"), payload, limit_s)
    if _port_was_taken(os.path.join(outdir, "try0"), world):
        first, run = run, _spawn_once(job, world, os.path.join(outdir, "try1"), payload, limit_s)
        run["retried_after"] = first
    return run


_PORT_TAKEN = "address already in use"  # c10d's EADDRINUSE message, lower-cased


def _port_was_taken(outdir: str, world: int) -> bool:
    for r in range(world):
        path = os.path.join(outdir, f"rank{r}.err")
        if os.path.exists(path):
            with open(path) as f:
                if _PORT_TAKEN in f.read().lower():
                    return True
    return False


def _spawn_once(job: str, world: int, outdir: str, payload: Any, limit_s: float) -> dict[str, Any]:
    os.makedirs(outdir, exist_ok=True)
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, job, outdir, payload), daemon=True) for r in range(world)]
    start = time.monotonic()
    for p in procs:
        p.start()
    deadline = start + limit_s
    ended = "deadline"
    while time.monotonic() < deadline:
        alive = [p for p in procs if p.is_alive()]
        if not alive:
            ended = "done"
            break
        if _port_was_taken(outdir, world):
            ended = "port taken"
            break  # the other ranks would wait for rank 0 until their timeout
        alive[0].join(0.05)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].terminate()
    for r in hung:
        procs[r].join(5)
        if procs[r].is_alive():
            procs[r].kill()
            procs[r].join(5)
    elapsed = time.monotonic() - start
    results, errors = {}, {}
    for r in range(world):
        ok, err = os.path.join(outdir, f"rank{r}.pt"), os.path.join(outdir, f"rank{r}.err")
        if os.path.exists(ok):
            results[r] = torch.load(ok, weights_only=False)
        if os.path.exists(err):
            with open(err) as f:
                errors[r] = f.read()
    return {
        "results": results,
        "errors": errors,
        "exitcodes": [None if r in hung else procs[r].exitcode for r in range(world)],
        "hung": hung,
        "elapsed": elapsed,
        "ended": ended,
    }


def _require_success(run: dict[str, Any], job: str) -> dict[int, Any]:
    if run["hung"]:
        pytest.fail(f"job {job!r}: ranks {run['hung']} still running after {run['elapsed']:.0f} s (killed): hang")
    if run["errors"] or any(code != 0 for code in run["exitcodes"]):
        msg = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(run["errors"].items()))
        pytest.fail(f"job {job!r} failed, exit codes {run['exitcodes']}:\n{msg}")
    return run["results"]


# --------------------------------------------------------------------------------------------------
# Collective accounting (installed in the workers)
# --------------------------------------------------------------------------------------------------

_COLLECTIVES = (
    "all_gather", "all_reduce", "broadcast", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
    "all_to_all", "all_to_all_single", "barrier", "gather", "scatter", "reduce", "all_gather_object",
    "broadcast_object_list", "send", "recv", "isend", "irecv",
)  # fmt: skip


class _Counter:
    """Wraps the torch.distributed collectives; while ``on``, logs (name, bytes of this rank's tensor)."""

    def __init__(self) -> None:
        self.on = False
        self.log: list[tuple] = []
        for name in _COLLECTIVES:
            orig = getattr(dist, name, None)
            if orig is not None:
                setattr(dist, name, self._wrap(name, orig))

    def _wrap(self, name: str, orig: Callable) -> Callable:
        def wrapped(*args, **kwargs):
            if self.on:
                tensor = None
                if name in ("all_gather", "all_gather_into_tensor") and len(args) > 1:
                    tensor = args[1]
                elif args and isinstance(args[0], torch.Tensor):
                    tensor = args[0]
                nbytes = tensor.numel() * tensor.element_size() if isinstance(tensor, torch.Tensor) else -1
                dtype = str(tensor.dtype) if isinstance(tensor, torch.Tensor) else None
                self.log.append((name, nbytes, dtype))
            return orig(*args, **kwargs)

        return wrapped

    def take(self, fn: Callable[[], Any]) -> tuple:
        self.log, self.on = [], True
        try:
            out = fn()
        finally:
            self.on = False
        return out, list(self.log)


# --------------------------------------------------------------------------------------------------
# Data and the single-process reference
# --------------------------------------------------------------------------------------------------


def _make_data(sizes: list[tuple], seed: int, dims: int = 4) -> list[list[dict[str, torch.Tensor]]]:
    """data[step][rank] = {"x", "dy"} float64, per-rank shapes (N, C, H, W) (or (N, C) for dims=2)."""
    g = torch.Generator().manual_seed(seed)
    data = []
    for step in range(STEPS):
        per_rank = []
        for r, size in enumerate(sizes):
            shape = (size[0], C) + tuple(size[1:]) if dims == 4 else (size[0], C)
            x = torch.randn(shape, generator=g, dtype=torch.float64) * (1.0 + r) + (0.5 * r - step)
            dy = torch.randn(shape, generator=g, dtype=torch.float64)
            per_rank.append({"x": x, "dy": dy})
        data.append(per_rank)
    return data


def _params() -> dict[str, torch.Tensor]:
    # one negative weight: the layer scales by |w| + eps and dweight carries sign(w)
    return {
        "weight": torch.tensor([1.5, -0.7, 0.3, 2.0], dtype=torch.float64),
        "bias": torch.tensor([0.1, -0.2, 0.0, 0.4], dtype=torch.float64),
    }


def _make_layer(cls, activation: str, param: float, **kw) -> nn.Module:
    layer = cls(C, momentum=0.3, activation=activation, activation_param=param, **kw).double()
    with torch.no_grad():
        p = _params()
        layer.weight.copy_(p["weight"])
        layer.bias.copy_(p["bias"])
    return layer


def _run_layer(layer: nn.Module, steps: list[dict[str, torch.Tensor]], counter: _Counter | None = None) -> list:
    """Train-mode forward + backward of ``layer`` for each step; per-step copies of everything."""
    out = []
    for d in steps:
        a = d["x"].clone().requires_grad_(True)
        if counter is None:
            y = layer(a.clone())
            y.backward(d["dy"])
            fwd = bwd = None
        else:
            y, fwd = counter.take(lambda: layer(a.clone()))
            _, bwd = counter.take(lambda: y.backward(d["dy"]))
        out.append({
            "y": y.detach().clone(), "dx": a.grad.clone(),
            "dweight": layer.weight.grad.clone(), "dbias": layer.bias.grad.clone(),
            "running_mean": layer.running_mean.clone(), "running_var": layer.running_var.clone(),
            "num_batches_tracked": layer.num_batches_tracked.clone(), "fwd": fwd, "bwd": bwd,
        })  # fmt: skip
        layer.weight.grad, layer.bias.grad = None, None
    return out


def _flatten(x: torch.Tensor) -> torch.Tensor:
    """(N, C, *) -> (C, N * prod(*)): the values one channel's statistics are taken over."""
    return x.transpose(0, 1).reshape(x.size(1), -1)


def _reference(data: list[list[dict]], ranks: list[int], activation: str, param: float, backend: str) -> list:
    """One process, local InPlaceABN over all ``ranks``' data of each step, split back per rank.

    Per-rank chunks are laid side by side per channel as one (1, C, M) input, which is exactly one batch
    of all their values (batch norm reduces over everything but C), so unequal spatial sizes work too.
    """
    with inplace_abn.use_backend(backend):
        layer = _make_layer(InPlaceABN, activation, param)
        ref_layer_stats = (layer.running_mean.clone(), layer.running_var.clone())
        out = []
        for step in data:
            x = torch.cat([_flatten(step[r]["x"]) for r in ranks], 1).unsqueeze(0)
            dy = torch.cat([_flatten(step[r]["dy"]) for r in ranks], 1).unsqueeze(0)
            res = _run_layer(layer, [{"x": x, "dy": dy}])[0]
            # Independent check of the kernels: the float64 autograd reference of the definitions.
            rm, rv = ref_layer_stats
            xr = x.clone().requires_grad_(True)
            p = {k: v.clone().requires_grad_(True) for k, v in _params().items()}
            yr = batch_norm_act(xr, p["weight"], p["bias"], rm, rv, True, 0.3, 1e-5, activation, param)
            yr.backward(dy)
            for k, v in (("y", yr.detach()), ("dx", xr.grad), ("dweight", p["weight"].grad), ("dbias", p["bias"].grad),
                         ("running_mean", rm), ("running_var", rv)):  # fmt: skip
                torch.testing.assert_close(
                    res[k], v, rtol=1e-9, atol=1e-9, msg=lambda m: f"{k}: kernels vs reference: {m}"
                )
            sizes = [step[r]["x"].numel() // C for r in ranks]
            per_rank = {}
            for r, y_r, dx_r in zip(ranks, res["y"][0].split(sizes, 1), res["dx"][0].split(sizes, 1)):
                shape = step[r]["x"].transpose(0, 1).shape
                per_rank[r] = {"y": y_r.reshape(shape).transpose(0, 1), "dx": dx_r.reshape(shape).transpose(0, 1)}
            out.append({**res, "per_rank": per_rank})
        return out


def _compare_layer_case(results: dict[int, list], ref: list, ranks: list[int], what: str) -> dict[str, float]:
    """Asserts per rank y, dx, running stats, num_batches_tracked; sum over ranks of dweight/dbias."""
    worst: dict[str, float] = {}

    def check(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
        assert got.shape == want.shape, f"{what}: {name} shape {tuple(got.shape)} != {tuple(want.shape)}"
        diff = (got - want).abs().max().item() if got.numel() else 0.0
        worst[name] = max(worst.get(name, 0.0), diff)
        torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"{what}: {name}: {m}")

    for step, want in enumerate(ref):
        for r in ranks:
            got = results[r][step]
            check("y", got["y"], want["per_rank"][r]["y"])
            check("dx", got["dx"], want["per_rank"][r]["dx"])
            check("running_mean", got["running_mean"], want["running_mean"])
            check("running_var", got["running_var"], want["running_var"])
            assert int(got["num_batches_tracked"]) == step + 1
        # DDP averages the parameter gradients; their SUM over ranks is the one-process gradient.
        check("dweight(sum over ranks)", sum(results[r][step]["dweight"] for r in ranks), want["dweight"])
        check("dbias(sum over ranks)", sum(results[r][step]["dbias"] for r in ranks), want["dbias"])
    return worst


# --------------------------------------------------------------------------------------------------
# Worker jobs
# --------------------------------------------------------------------------------------------------


def _job_layer_suite(rank: int, world: int, port: int, payload: dict) -> dict:
    """Exactness (both backends x activations, equal and unequal spatial sizes), functional API, eval,
    tiny / empty batches, subgroups (world 3) and collective accounting."""
    _init(rank, world, port, GLOO_TIMEOUT_S)
    counter = _Counter()
    res: dict[str, Any] = {}
    # a) exactness, with collectives counted
    for backend in BACKENDS:
        inplace_abn.set_backend(backend)
        for activation, param in ACTIVATIONS:
            for kind in ("equal", "spatial"):
                data = payload[kind]
                layer = _make_layer(InPlaceABNSync, activation, param)
                res[("layer", backend, activation, kind)] = _run_layer(layer, [s[rank] for s in data], counter)
    inplace_abn.set_backend(BACKENDS[0])

    # b) functional inplace_abn_sync, positional, group=None, equals the module
    data = payload["equal"]
    layer = _make_layer(InPlaceABNSync, "leaky_relu", 0.01)
    module_out = _run_layer(layer, [data[0][rank]])[0]
    w = _params()["weight"].requires_grad_(True)
    b = _params()["bias"].requires_grad_(True)
    rm, rv = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    a = data[0][rank]["x"].clone().requires_grad_(True)
    y = inplace_abn_sync(a.clone(), w, b, rm, rv, True, 0.3, 1e-5, "leaky_relu", 0.01, None)
    y.backward(data[0][rank]["dy"])
    res["functional"] = {
        "module": module_out,
        "functional": {"y": y.detach(), "dx": a.grad, "dweight": w.grad, "dbias": b.grad, "running_mean": rm,
                       "running_var": rv},
    }  # fmt: skip

    # c) eval: no collective at all. Only rank 0 runs it while the others wait in the barrier; a
    # collective here would mismatch the barrier (error or gloo timeout), never pass silently.
    if rank == 0:
        sync = _make_layer(InPlaceABNSync, "elu", 1.0)
        with torch.no_grad():
            sync.running_mean.copy_(torch.tensor([0.5, -1.0, 0.0, 2.0]))
            sync.running_var.copy_(torch.tensor([2.0, 0.5, 1.0, 3.0]))
        sync.eval()
        local = _make_layer(InPlaceABN, "elu", 1.0).eval()
        local.load_state_dict(sync.state_dict())
        x, dy = data[0][0]["x"], data[0][0]["dy"]
        outs = []
        for m in (sync, local):
            a = x.clone().requires_grad_(True)
            y, fwd = counter.take(lambda: m(a.clone()))
            _, bwd = counter.take(lambda: y.backward(dy))
            outs.append({"y": y.detach(), "dx": a.grad, "dweight": m.weight.grad, "dbias": m.bias.grad,
                         "running_mean": m.running_mean.clone(), "fwd": fwd, "bwd": bwd})  # fmt: skip
        res["eval"] = outs
    dist.barrier()

    # d) empty / one-element local batches: fine while the GLOBAL count is > 1
    tiny = payload["tiny"]
    layer = _make_layer(InPlaceABNSync, "leaky_relu", 0.01)
    res["tiny"] = _run_layer(layer, [s[rank] for s in tiny["ok"]])
    layer = _make_layer(InPlaceABNSync, "leaky_relu", 0.01)
    try:
        layer(tiny["bad"][rank]["x"].clone())
        res["tiny_bad"] = None
    except Exception as e:  # noqa: BLE001 - the type is asserted by the parent
        res["tiny_bad"] = (type(e).__name__, str(e))

    # e) subgroups (world 3): per-step groups from active_group + set_active_group, and set_group
    if world == 3:
        sub = {}
        model = nn.Sequential(_make_layer(InPlaceABNSync, "leaky_relu", 0.01))
        for i, members in enumerate(payload["subgroup_steps"]):
            group = active_group(rank in members)
            again = active_group(rank in members)
            set_active_group(model, group)
            info = {"is_world": group is dist.group.WORLD, "cached": group is again,
                    "layer_group_set": model[0].group is group}  # fmt: skip
            if rank in members:
                fresh = _make_layer(InPlaceABNSync, "leaky_relu", 0.01)
                set_active_group(fresh, group)
                info["out"] = _run_layer(fresh, [s[rank] for s in payload["equal"]])
            sub[i] = info
        group02 = dist.new_group([0, 2])
        if rank in (0, 2):
            layer = _make_layer(InPlaceABNSync, "elu", 1.0)
            layer.set_group(group02)
            sub["set_group_02"] = _run_layer(layer, [s[rank] for s in payload["equal"]])
        else:
            # a rank outside the group may still use the layer in eval (no collective)
            layer = _make_layer(InPlaceABNSync, "elu", 1.0, group=group02).eval()
            sub["eval_outside"] = layer(payload["equal"][0][rank]["x"].clone()).detach()
            try:  # training on a rank outside the group: recorded (misuse; what the user sees)
                layer.train()(payload["equal"][0][rank]["x"].clone())
                sub["train_outside"] = None
            except Exception as e:  # noqa: BLE001
                sub["train_outside"] = (type(e).__name__, str(e)[:300])
        res["subgroup"] = sub
    dist.barrier()
    return res


class _Net(nn.Module):
    def __init__(self, norm: Callable[..., nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = norm(6, activation="leaky_relu", activation_param=0.05)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1, stride=2)
        self.bn2 = norm(8, activation="elu", activation_param=1.0)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _make_net() -> nn.Module:
    torch.manual_seed(7)
    net = _Net(InPlaceABN).double()
    with torch.no_grad():  # non-trivial BN affine parameters
        for bn in (net.bn1, net.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
    return net


DDP_STEPS = 3
DDP_LR = 0.2


def _ddp_loss(net: nn.Module, x: torch.Tensor, t: torch.Tensor, global_batch: int, world: int) -> torch.Tensor:
    # DDP averages gradients over ranks: sum over local samples / global batch * world makes the averaged
    # gradient that of the mean loss over the global batch.
    return F.cross_entropy(net(x), t, reduction="sum") / global_batch * world


def _job_ddp(rank: int, world: int, port: int, payload: dict) -> dict:
    """f) a few SGD steps of a small conv net with InPlaceABNSync inside DistributedDataParallel."""
    _init(rank, world, port, GLOO_TIMEOUT_S)
    inplace_abn.set_backend(payload["backend"])
    init = _make_net()
    net = convert_sync(_make_net())
    assert all(type(m) is not InPlaceABN for m in net.modules())
    # reload the exact float64 init: convert_sync alone is checked by test_convert_round_trip_keeps_state
    net.load_state_dict(init.state_dict())
    losses = _ddp_sgd_steps(net, payload, rank, world)
    totals = []
    for loss in losses:  # the loss of the global batch
        total = torch.tensor(loss / world, dtype=torch.float64)
        dist.all_reduce(total)
        totals.append(total.item())
    return {"state": {k: v.clone() for k, v in net.state_dict().items()}, "losses": totals}


def _ddp_sgd_steps(net: nn.Module, payload: dict, rank: int, world: int) -> list[float]:
    """DDP_STEPS SGD(momentum) steps of ``net`` inside DistributedDataParallel; this rank's losses."""
    ddp = nn.parallel.DistributedDataParallel(net)  # find_unused_parameters=False: every parameter needs a grad
    opt = torch.optim.SGD(ddp.parameters(), lr=DDP_LR, momentum=0.9)
    losses = []
    for step in range(DDP_STEPS):
        x, t = payload["batches"][step][rank]
        global_batch = sum(b[0].size(0) for b in payload["batches"][step])
        opt.zero_grad()
        loss = _ddp_loss(ddp, x, t, global_batch, world)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _job_fail(rank: int, world: int, port: int, payload: dict) -> dict:
    """g) rank 1 misbehaves (mode in payload); rank 0 records how and when its collective fails."""
    mode = payload["mode"]
    if rank == 1 and mode == "never_joins":
        time.sleep(payload["timeout"] + 2)  # alive, but never calls init_process_group
        return {}
    start = time.monotonic()
    try:
        _init(rank, world, port, payload["timeout"])
        layer = _make_layer(InPlaceABNSync, "leaky_relu", 0.01)
        x = torch.randn(4, C, 3, 3, dtype=torch.float64)
        if rank == 1 and mode == "raises":
            raise RuntimeError("injected failure before the forward collective")
        if rank == 1 and mode == "exits":
            os._exit(3)  # dies without any cleanup before the forward collective
        a = x.clone().requires_grad_(True)
        y = layer(a.clone())
        if rank == 1 and mode == "dies_before_backward":
            os._exit(3)
        y.backward(torch.ones_like(y))
        dist.barrier()
        return {"error": None, "elapsed": time.monotonic() - start}
    except Exception as e:  # noqa: BLE001
        if rank == 1:
            raise
        return {"error": (type(e).__name__, str(e)[:500]), "elapsed": time.monotonic() - start}


def _densenet(memory: str) -> nn.Module:
    """A small float64 DenseNet-BC with In-Place ABN; the same initial weights for every memory mode."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    from densenet import densenet_bc

    torch.manual_seed(11)
    return densenet_bc(10, growth_rate=4, num_classes=3, norm="iabn", memory=memory).double()


def _job_densenet_ddp(rank: int, world: int, port: int, payload: dict) -> dict:
    """h) the memory-efficient DenseNet inside DistributedDataParallel: a few SGD steps."""
    _init(rank, world, port, GLOO_TIMEOUT_S)
    inplace_abn.set_backend(payload["backend"])
    net = _densenet("efficient")
    losses = _ddp_sgd_steps(net, payload, rank, world)
    return {"state": {k: v.clone() for k, v in net.state_dict().items()}, "losses": losses}


JOBS = {"layer_suite": _job_layer_suite, "ddp": _job_ddp, "fail": _job_fail, "densenet_ddp": _job_densenet_ddp}


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


def _suite_payload(world: int) -> dict:
    payload = {k: _make_data(v, seed=10 * world + i) for i, (k, v) in enumerate(SIZES[world].items())}
    # tiny: (N, C) inputs; ok: N = 0 / 1 / 1 ... (global count > 1); bad: global count == 1
    ok_sizes = [(0,), (1,), (1,)][:world] if world == 3 else [(0,), (2,)]
    bad_sizes = [(0,)] * (world - 1) + [(1,)]
    payload["tiny"] = {"ok": _make_data(ok_sizes, seed=99, dims=2), "bad": _make_data(bad_sizes, seed=98, dims=2)[0]}
    payload["subgroup_steps"] = [(0, 1), (1, 2), (0, 1, 2), (0, 1)]
    return payload


_SUITES: dict[int, tuple] = {}


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def suite(request, tmp_path_factory):
    """Runs the layer job once per world size; (world, payload, per-rank results, elapsed)."""
    world = request.param
    if world not in _SUITES:
        payload = _suite_payload(world)
        run = _spawn("layer_suite", world, str(tmp_path_factory.mktemp(f"suite{world}")), payload)
        _SUITES[world] = (world, payload, _require_success(run, f"layer_suite(world={world})"), run["elapsed"])
    return _SUITES[world]


@pytest.mark.parametrize("kind", ["equal", "spatial"])
@pytest.mark.parametrize("activation,param", ACTIVATIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sync_matches_one_big_batch(suite, backend, activation, param, kind):
    """a) unequal per-rank N (and H*W for kind="spatial"), float64: output, running stats,
    num_batches_tracked and dx per rank, and the sum over ranks of dweight / dbias, equal one process
    running InPlaceABN over the concatenated batch, within 1e-10."""
    world, payload, results, _ = suite
    ranks = list(range(world))
    ref = _reference(payload[kind], ranks, activation, param, backend)
    got = {r: results[r][("layer", backend, activation, kind)] for r in ranks}
    worst = _compare_layer_case(got, ref, ranks, f"world={world} {backend} {activation} {kind}")
    print(f"\n[world={world} {backend} {activation} {kind}] max |diff|: "
          + ", ".join(f"{k}={v:.1e}" for k, v in worst.items()))  # fmt: skip


def test_one_collective_each_way(suite):
    """h) per layer and step: one all_gather of 2C+1 opmath values in forward, one all_reduce of 2C in
    backward, nothing else."""
    world, _, results, _ = suite
    for r in range(world):
        for key, steps in results[r].items():
            if not (isinstance(key, tuple) and key[0] == "layer"):
                continue
            for s in steps:
                assert s["fwd"] == [("all_gather", (2 * C + 1) * 8, "torch.float64")], (key, s["fwd"])
                assert s["bwd"] == [("all_reduce", 2 * C * 8, "torch.float64")], (key, s["bwd"])
    print(
        f"\n[world={world}] per layer/step/rank: forward all_gather {(2 * C + 1) * 8} B sent "
        f"({world * (2 * C + 1) * 8} B gathered), backward all_reduce {2 * C * 8} B (C={C}, float64)"
    )


def test_functional_equals_module(suite):
    """b) inplace_abn_sync(x, w, b, rm, rv, True, momentum, eps, act, param, None) == InPlaceABNSync."""
    world, _, results, _ = suite
    for r in range(world):
        mod, fun = results[r]["functional"]["module"], results[r]["functional"]["functional"]
        for k in ("y", "dx", "dweight", "dbias", "running_mean", "running_var"):
            torch.testing.assert_close(fun[k], mod[k], rtol=0, atol=0, msg=lambda m: f"rank {r} {k}: {m}")


def test_eval_has_no_collective(suite):
    """c) eval mode on one rank alone (the others are in a barrier): returns, no collective, and equals
    InPlaceABN (convert_local) in eval, gradients included."""
    _, _, results, _ = suite
    sync, local = results[0]["eval"]
    assert sync["fwd"] == [] and sync["bwd"] == [], (sync["fwd"], sync["bwd"])
    for k in ("y", "dx", "dweight", "dbias", "running_mean"):
        torch.testing.assert_close(sync[k], local[k], rtol=0, atol=0, msg=lambda m: f"{k}: {m}")


def test_tiny_and_empty_local_batches(suite):
    """d) N=0 or N=1 on a rank is fine while the global count is > 1; a global count <= 1 raises
    ValueError on every rank (after the collective, so no rank is left waiting)."""
    world, payload, results, _ = suite
    ranks = list(range(world))
    ref = _reference(payload["tiny"]["ok"], ranks, "leaky_relu", 0.01, BACKENDS[0])
    _compare_layer_case({r: results[r]["tiny"] for r in ranks}, ref, ranks, f"tiny world={world}")
    for r in ranks:
        err = results[r]["tiny_bad"]
        assert err is not None and err[0] == "ValueError", f"rank {r}: {err}"
        assert "Expected more than 1 value per channel" in err[1], err


def test_subgroups(suite):
    """e) per-step groups from active_group(...) applied with set_active_group, and set_group with
    dist.new_group([0, 2]): the members match one process over their concatenated batch."""
    world, payload, results, _ = suite
    if world != 3:
        pytest.skip("subgroups are exercised with 3 ranks")
    for i, members in enumerate(payload["subgroup_steps"]):
        for r in range(world):
            info = results[r]["subgroup"][i]
            assert info["cached"] and info["layer_group_set"], (i, r, info)
            assert info["is_world"] == (len(members) == world), (i, r)
        ref = _reference(payload["equal"], list(members), "leaky_relu", 0.01, BACKENDS[0])
        got = {r: results[r]["subgroup"][i]["out"] for r in members}
        _compare_layer_case(got, ref, list(members), f"active_group {members}")
    ref = _reference(payload["equal"], [0, 2], "elu", 1.0, BACKENDS[0])
    got = {r: results[r]["subgroup"]["set_group_02"] for r in (0, 2)}
    _compare_layer_case(got, ref, [0, 2], "set_group(new_group([0, 2]))")
    assert results[1]["subgroup"]["eval_outside"].shape == payload["equal"][0][1]["x"].shape
    print(f"\n[subgroup] training on a rank outside the layer's group: {results[1]['subgroup']['train_outside']}")


def _ddp_payload(world: int, backend: str) -> dict:
    g = torch.Generator().manual_seed(5)
    sizes = [3, 5, 2][:world]
    batches = []
    for _ in range(DDP_STEPS):
        per_rank = []
        for n in sizes:
            t = torch.randint(0, 3, (n,), generator=g)
            x = torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64) + t.view(-1, 1, 1, 1).double()
            per_rank.append((x, t))
        batches.append(per_rank)
    return {"batches": batches, "backend": backend}


def test_spawn_retries_once_when_the_port_is_taken(tmp_path, monkeypatch):
    """The harness: a port taken between _free_port and rank 0's bind reruns the job on a new port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        ports = iter([taken.getsockname()[1], _free_port()])
        monkeypatch.setattr(sys.modules[__name__], "_free_port", lambda: next(ports))
        run = _spawn("ddp", 2, str(tmp_path), _ddp_payload(2, "python"))
    assert _port_was_taken(str(tmp_path / "try0"), 2)  # the first attempt met the taken port
    assert sorted(run["results"]) == [0, 1] and not run["errors"], run["errors"]  # the second one ran
    # ... and the harness stopped the first attempt on seeing the error, without waiting for the other rank
    # (checked on why it stopped, not on the clock, which a loaded machine stretches).
    assert run["retried_after"]["ended"] == "port taken", run["retried_after"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ddp_training_steps(tmp_path, backend):
    """f) DDP, 2 ranks with 3 and 5 samples, 3 SGD(momentum) steps: parameters, running statistics and
    losses equal one process training convert_local(same init) on the concatenated batches."""
    world = 2
    payload = _ddp_payload(world, backend)
    results = _require_success(_spawn("ddp", world, str(tmp_path), payload), "ddp")
    with inplace_abn.use_backend(backend):
        net = _make_net()
        opt = torch.optim.SGD(net.parameters(), lr=DDP_LR, momentum=0.9)
        losses = []
        for step in range(DDP_STEPS):
            x = torch.cat([b[0] for b in payload["batches"][step]])
            t = torch.cat([b[1] for b in payload["batches"][step]])
            opt.zero_grad()
            loss = F.cross_entropy(net(x), t)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    want = net.state_dict()
    worst = 0.0
    for r in range(world):
        got = results[r]["state"]
        assert got.keys() == want.keys()
        for k in want:
            if want[k].is_floating_point():
                worst = max(worst, (got[k] - want[k]).abs().max().item())
            torch.testing.assert_close(got[k], want[k], **TOL, msg=lambda m: f"rank {r} {k}: {m}")
        assert results[r]["losses"] == pytest.approx(losses, abs=1e-12)
    print(f"\n[ddp {backend}] losses {[f'{v:.6f}' for v in losses]}, max |param/buffer diff| {worst:.1e}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_densenet_efficient_under_ddp(tmp_path, backend):
    """h) DenseNet memory="efficient" in DDP (2 ranks, 3 and 5 samples, 3 SGD steps) equals the NAIVE model
    trained by one process the way DDP computes: per-rank batch statistics, gradients averaged over
    ranks, buffers broadcast from rank 0 before every forward. Parameters on every rank and rank 0's
    running statistics agree to 1e-10 (float64)."""
    world = 2
    payload = _ddp_payload(world, backend)
    results = _require_success(_spawn("densenet_ddp", world, str(tmp_path), payload), "densenet_ddp")
    with inplace_abn.use_backend(backend):
        net = _densenet("naive")
        opt = torch.optim.SGD(net.parameters(), lr=DDP_LR, momentum=0.9)
        losses: dict[int, list[float]] = {r: [] for r in range(world)}
        for step in range(DDP_STEPS):
            global_batch = sum(b[0].size(0) for b in payload["batches"][step])
            opt.zero_grad()
            start = {k: v.clone() for k, v in net.named_buffers()}
            for r in reversed(range(world)):  # rank 0 last: its buffer updates are the ones DDP keeps
                with torch.no_grad():
                    for k, v in net.named_buffers():
                        v.copy_(start[k])
                x, t = payload["batches"][step][r]
                loss = F.cross_entropy(net(x), t, reduction="sum") / global_batch
                loss.backward()  # the gradients add up over ranks: DDP's average of world * loss
                losses[r].append(loss.item() * world)
            opt.step()
    want = net.state_dict()
    buffers = {k for k, _ in net.named_buffers()}
    for r in range(world):
        got = results[r]["state"]
        assert got.keys() == want.keys()
        for k in want:
            if k in buffers and r != 0:
                continue  # rank 1's buffers hold its own last update; rank 0's are broadcast each step
            torch.testing.assert_close(got[k], want[k], **TOL, msg=lambda m: f"rank {r} {k}: {m}")
        assert results[r]["losses"] == pytest.approx(losses[r], abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_convert_round_trip_keeps_state(dtype):
    """f) convert_sync / convert_local swap the layer types and keep the state dict (bit for bit, in the
    model's dtype) and the training flag."""
    net = _make_net().to(dtype)
    for bn in (net.bn1, net.bn2):
        with torch.no_grad():
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.num_batches_tracked.fill_(7)
    net.bn2.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    synced = convert_sync(net)
    assert type(synced.bn1) is InPlaceABNSync and type(synced.bn2) is InPlaceABNSync
    assert synced.bn1.training and not synced.bn2.training
    assert synced.bn1.activation_param == 0.05 and synced.bn2.activation == "elu"
    synced_state = {k: v.clone() for k, v in synced.state_dict().items()}
    back = convert_local(synced)  # in place: synced is back now
    assert type(back.bn1) is InPlaceABN and type(back.bn2) is InPlaceABN
    assert not back.bn2.training
    for label, state in (("convert_sync", synced_state), ("convert_sync + convert_local", back.state_dict())):
        assert state.keys() == before.keys()
        for k in before:
            assert state[k].dtype == before[k].dtype, (k, state[k].dtype, before[k].dtype)
            diff = (state[k].double() - before[k].double()).abs().max().item()
            assert torch.equal(state[k], before[k]), f"{label} ({dtype}): {k} changed by up to {diff:.1e}"
    single = convert_sync(InPlaceABN(3))
    assert type(single) is InPlaceABNSync


FAIL_TIMEOUT_S = 5  # gloo / store timeout of the failure jobs
FAIL_LIMIT_S = 60  # the surviving rank must report an error within this wall time


@pytest.mark.parametrize("mode", ["raises", "exits", "dies_before_backward", "never_joins"])
def test_dead_rank_fails_fast(tmp_path, mode):
    """g) a rank that raises, exits, dies between forward and backward, or never joins: the other rank
    fails with an exception (no hang) within a bounded time."""
    payload = {"mode": mode, "timeout": FAIL_TIMEOUT_S}
    run = _spawn("fail", 2, str(tmp_path), payload, limit_s=FAIL_LIMIT_S)
    assert 0 not in run["hung"], f"{mode}: rank 0 still blocked after {FAIL_LIMIT_S} s (hang)"
    assert 0 in run["results"], f"{mode}: rank 0 left no result: {run['errors'].get(0)}"
    res = run["results"][0]
    assert res["error"] is not None, f"{mode}: rank 0 completed although rank 1 {mode}"
    assert res["elapsed"] < FAIL_LIMIT_S
    print(f"\n[fail {mode}] rank 0 after {res['elapsed']:.1f} s: {res['error'][0]}: {res['error'][1][:160]!r}")
