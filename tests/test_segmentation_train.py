"""segmentation.train / segmentation.evaluate / segmentation.demo: outputs, exact resume, DDP, evaluation, errors.

Everything runs on a tiny generated data set (segmentation.synthetic, 64-pixel images) with a narrow
WiderResNet-38 (width 1/16), a few iterations each, one thread per process.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from segmentation import evaluate as seg_eval  # noqa: E402
from segmentation import synthetic  # noqa: E402
from segmentation import train as seg_train  # noqa: E402

WIDTH = "0.0625"
JOB_TIMEOUT_S = 120  # hard limit of the spawned DDP job (it takes a few seconds)


def _tiny(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data",
        str(data),
        "--out",
        str(out),
        "--arch",
        "wrn38",
        "--width",
        WIDTH,
        "--crop",
        "48",
        "--batch-size",
        "2",
        "--threads",
        "1",
        "--no-progress",
        "--device",
        "cpu",
        "--lr",
        "0.02",
        *extra,
    ]


def _args(*argv: str):
    return seg_train.build_parser().parse_args(list(argv))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("seg") / "data"
    synthetic.generate(str(root), num_train=6, num_val=3, size=(64, 96), seed=1, color=False)
    return root


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory) -> dict[str, Any]:
    """One short CLI run (2 epochs, 3 iterations each) whose outputs several tests inspect."""
    out = tmp_path_factory.mktemp("run") / "out"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = seg_train.main(_tiny(data_dir, out, "--epochs", "2", "--save-predictions", "2"))
    return {"rc": rc, "out": out, "stdout": buf.getvalue()}


# ------------------------------------------------------------------------------------------- outputs


def test_cli_run_writes_log_checkpoint_pngs(trained, data_dir):
    assert trained["rc"] == 0
    out: Path = trained["out"]
    with open(out / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"] and tuple(rows[0]) == seg_train.CSV_FIELDS
    assert [int(r["iters"]) for r in rows] == [3, 6]  # 6 images / batch 2
    assert all(math.isfinite(float(r["train_loss"])) for r in rows)
    assert float(rows[-1]["lr"]) == 0.0  # poly schedule ends at 0
    assert 0.0 <= float(rows[-1]["val_miou"]) <= 1.0 and 0.0 <= float(rows[-1]["pixel_acc"]) <= 1.0
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert set(seg_train.CHECKPOINT_KEYS) <= set(ckpt) and ckpt["epoch"] == 2 and ckpt["iteration"] == 6
    assert not [p for p in os.listdir(out) if p.startswith(".tmp-")]  # atomic writes left no temp file
    pngs = sorted(os.listdir(out / "predictions"))
    assert len([p for p in pngs if p.endswith("_pred.png")]) == 2 and len(pngs) == 4
    first_image = Image.open(seg_train.CityscapesSegmentation(str(data_dir), "val").files[0][0])
    with Image.open(out / "predictions" / pngs[0]) as im:
        assert im.mode == "P" and im.size == first_image.size
    final = json.loads((out / "final.json").read_text())
    assert final["miou"] == pytest.approx(float(rows[-1]["val_miou"]), abs=1e-6)
    text = trained["stdout"]
    assert "activation memory saved vs BatchNorm:" in text and "| **mIoU**" in text and "final val mIoU" in text
    # In-Place ABN saves less for backward than BatchNorm + LeakyReLU on the same input.
    assert final["memory"]["norm_mib"] < final["memory"]["bn_mib"]


def test_evaluate_cli_matches_trainer(trained, data_dir, tmp_path, capsys):
    out: Path = trained["out"]
    final = json.loads((out / "final.json").read_text())
    args = seg_eval.build_parser().parse_args(
        [
            "--checkpoint",
            str(out / "checkpoint.pt"),
            "--data",
            str(data_dir),
            "--save-predictions",
            "1",
            "--out",
            str(tmp_path / "p"),
            "--no-progress",
            "--device",
            "cpu",
        ]
    )
    result = seg_eval.run(args)
    assert result["miou"] == final["miou"] and result["pixel_acc"] == final["pixel_acc"]
    assert "| **mIoU**" in capsys.readouterr().out
    assert len(list((tmp_path / "p").glob("*_pred.png"))) == 1


def test_poly_schedule():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = seg_train.PolyLR(opt, max_iters=10, power=0.9)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expect = [0.1 * (1 - i / 10) ** 0.9 for i in range(10)]
    torch.testing.assert_close(
        torch.tensor(lrs, dtype=torch.float64), torch.tensor(expect, dtype=torch.float64), rtol=1e-12, atol=0.0
    )
    assert opt.param_groups[0]["lr"] == 0.0


def test_memory_report_counts_only_norm_difference():
    args = _args("--data", ".", "--arch", "wrn38", "--width", WIDTH, "--crop", "64", "--norm", "iabn")
    mem = seg_train.memory_report(args, batch=2)
    assert 0.3 < mem["ratio"] < 0.8 and mem["norm_mib"] < mem["bn_mib"]
    args.norm = "iabn_sync"  # counted like iabn: no process group needed
    assert seg_train.memory_report(args, batch=2) == mem
    args.norm = "bn"
    assert seg_train.memory_report(args, batch=2)["ratio"] == 1.0


def test_activation_bytes_on_meta_equal_a_real_cpu_step():
    from inplace_abn.memory import parameters_of, saved_tensor_bytes
    from segmentation import build_model

    for norm in ("bn", "iabn"):
        meta = seg_train.activation_bytes("wrn38", norm, 19, float(WIDTH), 16, batch=2, crop=40)
        model = build_model("wrn38", 19, norm=norm, width=float(WIDTH)).train()
        x, y = torch.randn(2, 3, 40, 40), torch.randint(0, 19, (2, 40, 40))
        real, _loss, _ = saved_tensor_bytes(
            lambda: torch.nn.functional.cross_entropy(model(x), y), exclude=parameters_of(model)
        )
        assert meta == real, norm


def test_amp_bfloat16_step_runs(data_dir, tmp_path):
    s = seg_train.run(
        _args(*_tiny(data_dir, tmp_path, "--iters", "2", "--amp", "--eval-every", "0", "--save-predictions", "0"))
    )
    assert len(s["losses"]) == 2 and all(math.isfinite(v) for v in s["losses"])


# ------------------------------------------------------------------------------------------- exact resume


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_is_exact(data_dir, tmp_path, workers):
    # Random scale + crop + flip on, so the augmentation RNG (main process or seeded workers) matters.
    common = [
        "--epochs",
        "2",
        "--eval-every",
        "0",
        "--save-predictions",
        "0",
        "--workers",
        str(workers),
        "--norm",
        "iabn",
    ]
    straight = seg_train.run(_args(*_tiny(data_dir, tmp_path / "a", *common)))
    first = seg_train.run(_args(*_tiny(data_dir, tmp_path / "b", *common, "--stop-after", "1")))
    assert first["stopped_after"] == 1 and not (tmp_path / "b" / "final.json").exists()
    second = seg_train.run(
        _args(*_tiny(data_dir, tmp_path / "b", *common, "--resume", str(tmp_path / "b" / "checkpoint.pt")))
    )
    assert len(straight["losses"]) == 6 and len(first["losses"]) == 3
    assert straight["losses"] == first["losses"] + second["losses"]  # bit-identical floats
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    with open(tmp_path / "b" / "log.csv", newline="") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2"]


def test_resume_refuses_different_settings(data_dir, tmp_path, capsys):
    common = ["--epochs", "1", "--eval-every", "0", "--save-predictions", "0"]
    assert seg_train.main(_tiny(data_dir, tmp_path, *common)) == 0
    rc = seg_train.main(
        _tiny(data_dir, tmp_path, *common, "--width", "0.125", "--resume", str(tmp_path / "checkpoint.pt"))
    )
    assert rc == 2 and "--width" in capsys.readouterr().err


def test_stop_after_counts_epochs_of_this_process_with_iters(data_dir, tmp_path):
    # --iters 8 at 3 iterations per epoch: epochs of 3, 3 and a partial 2; stopped after each epoch of a process.
    common = ["--iters", "8", "--eval-every", "0", "--save-predictions", "0", "--stop-after", "1"]
    straight = seg_train.run(
        _args(*_tiny(data_dir, tmp_path / "a", "--iters", "8", "--eval-every", "0", "--save-predictions", "0"))
    )
    ckpt = str(tmp_path / "b" / "checkpoint.pt")
    parts = [seg_train.run(_args(*_tiny(data_dir, tmp_path / "b", *common)))]
    for _ in range(2):
        parts.append(seg_train.run(_args(*_tiny(data_dir, tmp_path / "b", *common, "--resume", ckpt))))
    assert [p.get("stopped_after") for p in parts] == [1, 2, None] and [len(p["losses"]) for p in parts] == [3, 3, 2]
    assert straight["losses"] == [v for p in parts for v in p["losses"]]
    assert parts[-1]["iterations"] == straight["iterations"] == 8 and (tmp_path / "b" / "final.json").exists()
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(ckpt, weights_only=True)
    assert a["iteration"] == b["iteration"] == 8 and a["scheduler"] == b["scheduler"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_train_one_epoch_stops_at_the_iteration_budget(data_dir):
    from segmentation import build_model
    from segmentation.data import CityscapesSegmentation
    from segmentation.transforms import train_transform

    args = _args(*_tiny(data_dir, Path("unused"), "--iters", "5"))
    ds = CityscapesSegmentation(str(data_dir), "train", train_transform(48, scale=None, flip_p=0.0))
    loader = torch.utils.data.DataLoader(ds, batch_size=2, drop_last=True)  # 3 batches
    model = build_model("wrn38", seg_train.NUM_CLASSES, norm="iabn", width=float(WIDTH))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sched = seg_train.PolyLR(opt, max_iters=5)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    kw = dict(scheduler=sched, scaler=scaler, max_iters=5)
    first = seg_train.train_one_epoch(
        model, seg_train._loss, opt, loader, torch.device("cpu"), 1, args, iteration=0, **kw
    )
    assert first.iteration == 3 and len(first.losses) == 3
    assert first.loss == pytest.approx(sum(first.losses) / 3, rel=1e-12)
    second = seg_train.train_one_epoch(
        model, seg_train._loss, opt, loader, torch.device("cpu"), 2, args, iteration=first.iteration, **kw
    )
    assert second.iteration == 5 and len(second.losses) == 2 and sched.last_epoch == 5
    assert opt.param_groups[0]["lr"] == 0.0


def test_saved_memory_line_is_the_trainkit_meter():
    args = _args("--data", ".", "--arch", "wrn38", "--width", WIDTH, "--crop", "32", "--norm", "iabn")
    mem = seg_train.saved_memory(args, batch=2)
    assert mem.as_dict() == seg_train.memory_report(args, batch=2)
    assert mem.bn_bytes == seg_train.activation_bytes("wrn38", "bn", seg_train.NUM_CLASSES, float(WIDTH), 16, 2, 32)
    assert mem.norm_bytes == seg_train.activation_bytes("wrn38", "iabn", seg_train.NUM_CLASSES, float(WIDTH), 16, 2, 32)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_gpu_is_one_line_rc2(data_dir, tmp_path, capsys):
    argv = _tiny(data_dir, tmp_path, "--iters", "1")
    argv[argv.index("--device") + 1] = "cuda"
    assert seg_train.main(argv) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------- errors


def test_bad_data_path_is_one_line_rc2(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    rc = seg_train.main(_tiny(missing, tmp_path / "out", "--iters", "1"))
    err = capsys.readouterr().err
    assert rc == 2 and str(missing) in err and "does not exist" in err and "segmentation.synthetic" in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_incomplete_data_folder_names_the_folder(tmp_path, capsys):
    (tmp_path / "d" / "leftImg8bit" / "train").mkdir(parents=True)
    rc = seg_train.main(_tiny(tmp_path / "d", tmp_path / "out", "--iters", "1"))
    err = capsys.readouterr().err
    assert rc == 2 and "gtFine" in err


def test_bad_options_and_checkpoint(data_dir, tmp_path, capsys):
    assert seg_train.main(_tiny(data_dir, tmp_path, "--iters", "0")) == 2
    assert "--iters" in capsys.readouterr().err
    assert seg_train.main(_tiny(data_dir, tmp_path, "--batch-size", "64", "--iters", "1")) == 2
    assert "--batch-size" in capsys.readouterr().err
    missing = tmp_path / "missing.pt"
    assert seg_eval.main(["--checkpoint", str(missing), "--data", str(data_dir)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "not found" in err
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    assert seg_train.main(_tiny(data_dir, tmp_path, "--iters", "1", "--resume", str(corrupt))) == 2
    assert "corrupt" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- DDP (2 gloo ranks)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_entry(rank: int, world: int, port: int, argv: list[str], outdir: str) -> None:
    """One torchrun-like rank: the env:// variables, then segmentation.train.run in this process."""
    os.environ.update(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    if os.path.exists("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    code = 0
    try:
        s = seg_train.run(seg_train.build_parser().parse_args(argv), return_model=True)
        torch.save(
            {"state": s["model"].state_dict(), "losses": s["losses"], "world": s["world_size"]},
            os.path.join(outdir, f"rank{rank}.pt"),
        )
    except BaseException:
        code = 1
        with open(os.path.join(outdir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
    sys.exit(code)


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")
def test_ddp_two_ranks_iabn_sync(tmp_path):
    # Square images = crop, no scaling/flip: the augmentations are the identity, so the 2-rank batches
    # (2 + 2 images) are exactly the single-process batch of 4.
    data = tmp_path / "data"
    synthetic.generate(str(data), num_train=4, num_val=2, size=(48, 48), seed=2, color=False)
    # resnet50: no dropout (WiderResNet-38's mod6/mod7 Dropout2d would draw different masks per rank).
    common = [
        "--data",
        str(data),
        "--arch",
        "resnet50",
        "--width",
        WIDTH,
        "--crop",
        "48",
        "--scale-min",
        "1",
        "--scale-max",
        "1",
        "--flip-p",
        "0",
        "--iters",
        "1",
        "--eval-every",
        "0",
        "--save-predictions",
        "0",
        "--threads",
        "1",
        "--no-progress",
        "--device",
        "cpu",
        "--lr",
        "0.02",
        "--dtype",
        "float64",
    ]
    outdir = tmp_path / "ranks"
    outdir.mkdir()
    argv = common + ["--norm", "iabn_sync", "--batch-size", "2", "--out", str(tmp_path / "ddp")]
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_ddp_entry, args=(r, 2, port, argv, str(outdir)), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + JOB_TIMEOUT_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    errors = {r: (outdir / f"rank{r}.err").read_text() for r in range(2) if (outdir / f"rank{r}.err").exists()}
    assert not hung, f"DDP ranks {hung} still running after {JOB_TIMEOUT_S} s (killed)"
    assert not errors and all(p.exitcode == 0 for p in procs), errors
    r0 = torch.load(outdir / "rank0.pt", weights_only=True)
    r1 = torch.load(outdir / "rank1.pt", weights_only=True)
    assert r0["world"] == r1["world"] == 2 and len(r0["losses"]) == len(r1["losses"]) == 1
    # Identical parameters AND running statistics on both ranks (no buffer broadcast: iabn_sync synchronises).
    stats = [k for k in r0["state"] if k.endswith("running_mean") or k.endswith("running_var")]
    assert stats
    for k in r0["state"]:
        torch.testing.assert_close(r0["state"][k], r1["state"][k], rtol=0, atol=0, msg=k)
    assert (tmp_path / "ddp" / "checkpoint.pt").exists()  # written by rank 0 only
    assert (tmp_path / "ddp" / "log.csv").exists()

    # Reference in this process: the same initial model with local In-Place ABN on the concatenated batch
    # (rank 0's images, then rank 1's), loss = mean over ranks of the per-rank mean losses (what DDP's gradient
    # averaging optimises), one SGD step: the same running statistics and the same parameters.
    from torch.utils.data import DistributedSampler

    from segmentation import build_model
    from segmentation.data import CityscapesSegmentation
    from segmentation.transforms import train_transform
    from trainkit import seed_everything

    ds = CityscapesSegmentation(str(data), "train", train_transform(48, scale=None, flip_p=0.0))
    xs, ys = [], []
    for r in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=r, shuffle=True, seed=0, drop_last=True)
        sampler.set_epoch(1)
        for i in list(sampler)[:2]:
            x, y = ds[i]
            xs.append(x)
            ys.append(y)
    x, y = torch.stack(xs), torch.stack(ys)
    seed_everything(0)
    model = build_model("resnet50", seg_train.NUM_CLASSES, norm="iabn", output_stride=16, width=float(WIDTH))
    model = model.double().train()
    x = x.double()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)
    logits = model(x)
    losses = [
        torch.nn.functional.cross_entropy(logits[2 * r : 2 * r + 2], y[2 * r : 2 * r + 2], ignore_index=255)
        for r in range(2)
    ]
    ((losses[0] + losses[1]) / 2).backward()
    opt.step()
    ref = model.state_dict()
    assert r0["losses"][0] == pytest.approx(losses[0].item(), rel=1e-5)
    assert r1["losses"][0] == pytest.approx(losses[1].item(), rel=1e-5)
    # float64 (--dtype float64) with differently ordered reductions: compare each tensor's change in this step.
    # A wrong gradient average (e.g. one global mean over pixels) is off by several % here; rounding by < 4e-8
    # (measured). In float32 the same comparison is ill-conditioned on these 3x3 feature maps: rounding
    # differences of ~1e-7 moved every gradient by ~1% (measured on both backends, with other data), so
    # float32 cannot tell a wrong average from rounding.
    for k in ref:
        change = (ref[k].double() - initial[k].double()).norm().item()
        diff = (r0["state"][k].double() - ref[k].double()).norm().item()
        assert diff <= 1e-6 * change + 1e-12, (k, diff, change)


# ------------------------------------------------------------------------------------------- demo


def test_demo_generates_data_and_trains(tmp_path, capsys, monkeypatch):
    from segmentation import demo

    monkeypatch.setattr(synthetic, "generate", _small_generate)
    rc = demo.main(
        [
            "--data",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / "run"),
            "--width",
            WIDTH,
            "--crop",
            "48",
            "--batch-size",
            "2",
            "--iters",
            "2",
            "--save-predictions",
            "1",
            "--threads",
            "1",
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "generating the synthetic data set" in out and "final val mIoU" in out
    assert "activation memory saved vs BatchNorm" in out
    assert (tmp_path / "data" / "leftImg8bit" / "train").is_dir() and (tmp_path / "run" / "final.json").exists()


_real_generate = synthetic.generate


def _small_generate(out: str, **kwargs: Any) -> None:
    kwargs.update(num_train=4, num_val=2, size=(48, 64), color=False)
    _real_generate(out, **kwargs)


# ------------------------------------------------------------------------------------------- divergence


def _poison_step_at(monkeypatch, at: int) -> None:
    """Makes the optimizer step number ``at`` (1-based, counted over the whole process) write a NaN weight."""
    real_step = torch.optim.SGD.step
    calls = {"n": 0}

    def step(self, *a, **k):
        out = real_step(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == at:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", step)


@pytest.mark.parametrize("mode", [[], ["--amp"]], ids=["float32", "amp"])
@pytest.mark.parametrize("at", [5, 6], ids=["mid-epoch", "last-step"])
def test_divergence_stops_with_the_iteration_and_keeps_the_good_checkpoint(
    data_dir, tmp_path, capsys, monkeypatch, mode, at
):
    # 2 epochs of 3 iterations; the weights become NaN at step `at` of epoch 2 (6 = the very last step).
    _poison_step_at(monkeypatch, at)
    rc = seg_train.main(
        _tiny(data_dir, tmp_path, "--epochs", "2", "--eval-every", "0", "--save-predictions", "0", *mode)
    )
    err = capsys.readouterr().err
    assert rc == 2 and f"diverged at iteration {at} (epoch 2)" in err and "Traceback" not in err
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["iteration"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (tmp_path / "final.json").exists()


def test_huge_learning_rate_diverges_without_a_checkpoint(data_dir, tmp_path, capsys):
    rc = seg_train.main(
        _tiny(data_dir, tmp_path, "--iters", "3", "--eval-every", "0", "--save-predictions", "0", "--lr", "1e30")
    )
    err = capsys.readouterr().err
    assert rc == 2 and re.search(r"diverged at iteration [123] \(epoch 1\)", err) and "Traceback" not in err
    assert not (tmp_path / "checkpoint.pt").exists()


# ------------------------------------------------------------------------------------------- --out protection


def test_out_with_an_earlier_run_is_refused_unless_resume_or_overwrite(data_dir, tmp_path, capsys):
    common = ["--iters", "1", "--eval-every", "0", "--save-predictions", "0"]
    assert seg_train.main(_tiny(data_dir, tmp_path, *common)) == 0
    first = {n: (tmp_path / n).read_bytes() for n in ("checkpoint.pt", "log.csv", "final.json")}
    capsys.readouterr()
    assert seg_train.main(_tiny(data_dir, tmp_path, *common, "--seed", "5")) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite" in err and "--resume" in err
    assert {n: (tmp_path / n).read_bytes() for n in first} == first
    (tmp_path / ".tmp-killed.pt").write_bytes(b"\0" * 4096)  # an interrupted atomic write
    assert seg_train.main(_tiny(data_dir, tmp_path, *common, "--seed", "5", "--overwrite")) == 0
    assert (tmp_path / "checkpoint.pt").read_bytes() != first["checkpoint.pt"]
    assert not list(tmp_path.glob(".tmp-*"))


def test_out_that_is_a_file_fails_before_training(data_dir, tmp_path, capsys):
    out = tmp_path / "file"
    out.write_bytes(b"")
    assert seg_train.main(_tiny(data_dir, out, "--iters", "1")) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "is a file" in err and "epoch" not in err


# ------------------------------------------------------------------------------------------- damaged checkpoints


def test_damaged_checkpoint_is_refused_by_resume_and_evaluate(data_dir, tmp_path, capsys):
    from helpers import damage_checkpoint

    common = ["--iters", "2", "--eval-every", "0", "--save-predictions", "0"]
    assert seg_train.main(_tiny(data_dir, tmp_path, *common)) == 0
    ckpt = tmp_path / "checkpoint.pt"
    damage_checkpoint(ckpt, nbytes=4096)
    capsys.readouterr()
    assert seg_train.main(_tiny(data_dir, tmp_path, *common, "--resume", str(ckpt))) == 2
    err = capsys.readouterr().err
    assert "is damaged" in err and str(ckpt) in err and "--resume" in err
    assert (
        seg_eval.main(
            [
                "--checkpoint",
                str(ckpt),
                "--data",
                str(data_dir),
                "--save-predictions",
                "0",
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "is damaged" in err and "--checkpoint" in err


# ------------------------------------------------------------------------------------------- label files


@pytest.mark.parametrize("damage", ["jpeg", "values"])
def test_label_file_that_is_not_what_it_claims_stops_the_run_naming_it(tmp_path, capsys, damage):
    data = tmp_path / "data"
    synthetic.generate(str(data), num_train=4, num_val=2, size=(64, 96), seed=1, color=False)
    lab = sorted((data / "gtFine" / "train").glob("*/*_gtFine_labelIds.png"))[1]
    if damage == "jpeg":
        Image.open(lab).save(lab, format="JPEG")
    else:
        ids = np.array(Image.open(lab))
        ids[5, 5] = 77
        Image.fromarray(ids).save(lab)
    rc = seg_train.main(_tiny(data, tmp_path / "out", "--epochs", "1", "--eval-every", "0", "--save-predictions", "0"))
    err = capsys.readouterr().err
    assert rc == 2 and str(lab) in err and "Traceback" not in err
    assert not (tmp_path / "out" / "checkpoint.pt").exists()
