"""Train a small conv net with synchronised In-Place ABN under DistributedDataParallel.

Run with torchrun (one process per CPU worker or GPU)::

    torchrun --nproc_per_node=2 examples/train_ddp.py --steps 20

or as a single process (a 1-process group is created on 127.0.0.1)::

    python examples/train_ddp.py --steps 20

The backend is gloo on CPU and nccl when CUDA is available (override with ``--backend``). The data are
generated (class-dependent patterns plus noise, no download); with ``--uneven`` (default) rank r gets
``batch_size + r`` samples per step, which InPlaceABNSync handles exactly. Rank 0 prints the loss (mean
over the global batch) and accuracy per step, then the bytes autograd keeps for backward in one forward
of this model versus the same model with nn.BatchNorm2d + LeakyReLU(inplace=True).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import socket
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from inplace_abn import InPlaceABNSync
from inplace_abn.memory import parameters_of, saved_tensor_bytes


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="training steps (default 20)")
    p.add_argument("--batch-size", type=int, default=16, help="samples per rank and step (default 16)")
    p.add_argument("--uneven", action=argparse.BooleanOptionalAction, default=True,
                   help="rank r gets batch_size + r samples (default on)")  # fmt: skip
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--width", type=int, default=32, help="channels of the first conv (default 32)")
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--backend", choices=["gloo", "nccl"], default=None,
                   help="default: nccl if CUDA is available, else gloo")  # fmt: skip
    p.add_argument("--timeout", type=float, default=60.0, help="process-group timeout in seconds")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def setup(backend: str, timeout_s: float) -> tuple[int, int, torch.device]:
    """Joins the process group of torchrun, or makes a 1-process one; returns (rank, world, device)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun
        dist.init_process_group(backend, timeout=timeout)
    else:
        with socket.socket() as s:  # a free port on the loopback interface
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, timeout=timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    if backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return rank, world, torch.device("cuda", local_rank)
    return rank, world, torch.device("cpu")


def make_net(norm_act: Callable[[int], nn.Module], width: int, classes: int) -> nn.Sequential:
    """conv -> norm+act, three times (two strided), global pooling, linear classifier."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False), norm_act(width),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), norm_act(2 * width),
        nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1, bias=False), norm_act(2 * width),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, classes),
    )  # fmt: skip


def inplace_abn_sync(channels: int) -> nn.Module:
    return InPlaceABNSync(channels, activation="leaky_relu", activation_param=0.01)


def bn_leaky_relu(channels: int) -> nn.Module:
    return nn.Sequential(nn.BatchNorm2d(channels), nn.LeakyReLU(0.01, inplace=True))


class SyntheticImages:
    """Class k = a fixed random low-frequency pattern (shared by all ranks) + noise (per rank)."""

    def __init__(self, classes: int, size: int, seed: int, rank: int, device: torch.device) -> None:
        g = torch.Generator().manual_seed(seed)
        low = torch.randn(classes, 3, 4, 4, generator=g)
        self.templates = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False).to(device)
        self.gen = torch.Generator().manual_seed(seed + 1000 * (rank + 1))
        self.classes, self.device = classes, device

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, self.classes, (n,), generator=self.gen)
        noise = 1.5 * torch.randn((n,) + tuple(self.templates.shape[1:]), generator=self.gen)
        labels = labels.to(self.device)
        return self.templates[labels] + noise.to(self.device), labels


def forward_saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward in one training forward of ``model`` (parameters excluded)."""
    model = copy.deepcopy(model).train()  # the measurement must not move the running statistics
    total, _out, _ = saved_tensor_bytes(lambda: model(x.clone()), exclude=parameters_of(model))
    return total


def main() -> None:
    args = parse_args()
    backend = args.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    rank, world, device = setup(backend, args.timeout)
    torch.manual_seed(args.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    model = make_net(inplace_abn_sync, args.width, args.classes).to(device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9)
    data = SyntheticImages(args.classes, args.image_size, args.seed, rank, device)

    local_batch = args.batch_size + (rank if args.uneven else 0)
    global_batch = sum(args.batch_size + (r if args.uneven else 0) for r in range(world))
    if rank == 0:
        print(f"backend={backend} world={world} device={device} global batch={global_batch} "
              f"(per rank {[args.batch_size + (r if args.uneven else 0) for r in range(world)]})", flush=True)  # fmt: skip

    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        x, y = data.batch(local_batch)
        logits = ddp(x)
        # DDP averages gradients over ranks: scale the local sum so the result is the global-batch mean.
        loss = F.cross_entropy(logits, y, reduction="sum") / global_batch * world
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        stats = torch.stack([loss.detach() / world, (logits.argmax(1) == y).sum().float()]).to(device)
        dist.all_reduce(stats)
        if rank == 0:
            bar = "#" * (20 * step // args.steps)
            print(f"step {step:3d}/{args.steps} [{bar:<20}] loss {stats[0].item():.4f} "
                  f"acc {stats[1].item() / global_batch:.3f} ({time.perf_counter() - start:.3f} s)", flush=True)  # fmt: skip

    # Memory: every rank runs the measuring forward of the synchronised model (its statistics are a
    # collective); the BatchNorm2d + LeakyReLU baseline is local.
    x, _ = data.batch(args.batch_size)
    inplace_bytes = forward_saved_bytes(model, x)
    if rank == 0:
        torch.manual_seed(args.seed)
        baseline = make_net(bn_leaky_relu, args.width, args.classes).to(device)
        base_bytes = forward_saved_bytes(baseline, x)
        saved = base_bytes - inplace_bytes
        mib = 1024.0**2
        print(f"saved for backward, one forward of {args.batch_size} x 3 x {args.image_size}^2: "
              f"BatchNorm2d+LeakyReLU(inplace) {base_bytes / mib:.2f} MiB, InPlaceABNSync {inplace_bytes / mib:.2f} MiB "
              f"-> {saved / mib:.2f} MiB saved ({100.0 * saved / base_bytes:.1f}%)", flush=True)  # fmt: skip
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
