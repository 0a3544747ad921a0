"""trainkit: RNG state round trip, atomic checkpoint writes, checkpoint errors, CSV log, progress bar fallback,
exact resume and --stop-after (trainkit.resume), the saved-memory meter (trainkit.memory_meter)."""

from __future__ import annotations

import io
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import trainkit  # noqa: E402
from trainkit import (  # noqa: E402
    CheckpointError,
    DeviceError,
    Progress,
    ResumeError,
    ResumePoint,
    atomic_save,
    check_same_args,
    check_stop_after,
    compare_saved_memory,
    load_checkpoint,
    load_resume_checkpoint,
    read_csv,
    restore_training_state,
    rng_state,
    run_cli,
    save_training_checkpoint,
    saved_bytes_on_meta,
    seed_everything,
    set_epoch_seed,
    set_rng_state,
    stop_after_reached,
    write_csv,
)


def _draw():
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_rng_state_round_trip_through_weights_only_checkpoint(tmp_path):
    seed_everything(5)
    _draw()
    atomic_save({"rng": rng_state()}, str(tmp_path / "c.pt"))
    expect = _draw()
    seed_everything(99)  # scramble
    set_rng_state(torch.load(tmp_path / "c.pt", weights_only=True)["rng"])
    assert _draw() == expect


def test_atomic_save_failure_keeps_old_file_and_no_temp(tmp_path):
    path = tmp_path / "ck.pt"
    atomic_save({"a": torch.ones(2)}, str(path))

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"a": Unpicklable()}, str(path))
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert os.listdir(tmp_path) == ["ck.pt"]


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt") as e:
        load_checkpoint(str(bad))
    assert str(bad) in str(e.value)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, other)
    with pytest.raises(CheckpointError, match=r"not a demo checkpoint \(missing \['model'\]\)"):
        load_checkpoint(str(other), required=("model",), kind="demo")

    class MyError(CheckpointError):
        pass

    with pytest.raises(MyError, match="--checkpoint"):
        load_checkpoint(str(tmp_path / "missing.pt"), option="--checkpoint", error=MyError)


def test_check_same_args_names_options():
    check_same_args({"lr": 0.1, "depth": 4}, {"lr": 0.1, "depth": 4}, ("lr", "depth"), "x.pt")
    with pytest.raises(CheckpointError, match=r"--batch-size 8 \(now 4\)"):
        check_same_args({"batch_size": 8}, {"batch_size": 4}, ("batch_size",), "x.pt")


def test_check_same_args_takes_defaults_for_options_older_checkpoints_lack():
    """An option added later (segmentation's --dtype) compares as its default when the checkpoint lacks it."""
    check_same_args(
        {"lr": 0.1}, {"lr": 0.1, "dtype": "float32"}, ("lr", "dtype"), "x.pt", defaults={"dtype": "float32"}
    )
    with pytest.raises(CheckpointError, match=r"--dtype 'float32' \(now 'float64'\)"):
        check_same_args(
            {"lr": 0.1}, {"lr": 0.1, "dtype": "float64"}, ("lr", "dtype"), "x.pt", defaults={"dtype": "float32"}
        )
    with pytest.raises(CheckpointError, match=r"--dtype None \(now 'float32'\)"):  # no default: still refused
        check_same_args({"lr": 0.1}, {"lr": 0.1, "dtype": "float32"}, ("lr", "dtype"), "x.pt")


def test_csv_round_trip_and_epoch_filter(tmp_path):
    path = str(tmp_path / "log.csv")
    assert read_csv(path) == []
    write_csv(path, [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.25}], ("epoch", "loss"))
    assert read_csv(path) == [{"epoch": "1", "loss": "0.5"}, {"epoch": "2", "loss": "0.25"}]
    assert read_csv(path, upto_epoch=1) == [{"epoch": "1", "loss": "0.5"}]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def test_progress_builtin_terminal_redraws_one_line():
    s = _Stream(tty=True)
    with Progress(4, "epoch 1/2", stream=s, backend="builtin", refresh=0.0) as bar:
        for _ in range(4):
            bar.update(1)
            bar.set_postfix(loss="0.123")
    text = s.getvalue()
    assert "\n" not in text and text.count("\r") >= 4
    assert "epoch 1/2" in text and "4/4" in text and "100%" in text and "loss=0.123" in text
    assert text.endswith("\r")  # the line is cleared on close (like tqdm leave=False)


def test_progress_builtin_non_terminal_prints_periodic_lines():
    s = _Stream(tty=False)
    bar = Progress(3, "eval", stream=s, backend="builtin", interval=0.0)
    for _ in range(3):
        bar.update(1)
    bar.close()
    lines = s.getvalue().splitlines()
    assert len(lines) == 3 and "\r" not in s.getvalue() and lines[-1].startswith("eval: 100%")
    s2 = _Stream(tty=False)
    quiet = Progress(3, "x", stream=s2, backend="builtin", interval=3600.0)
    quiet.update(3)
    quiet.close()
    assert s2.getvalue() == ""  # nothing before the interval has passed


def test_progress_disabled_and_bad_backend():
    s = _Stream(tty=True)
    bar = trainkit.progress(2, "x", enabled=False, stream=s)
    bar.update(2)
    bar.set_postfix(a=1)
    bar.close()
    assert s.getvalue() == ""
    with pytest.raises(ValueError, match="backend"):
        Progress(1, backend="rich")


def test_progress_uses_tqdm_on_terminals_when_installed():
    pytest.importorskip("tqdm")
    s = _Stream(tty=True)
    with Progress(2, "t", stream=s) as bar:
        assert bar._tqdm is not None
        bar.update(2)
    assert "/2 [" in s.getvalue()  # tqdm drew on the stream
    with Progress(2, "t", stream=_Stream(tty=False)) as bar:  # logs: built-in plain lines
        assert bar._tqdm is None


def test_format_seconds():
    assert trainkit.format_seconds(75.3) == "1:15" and trainkit.format_seconds(3725) == "1:02:05"
    assert trainkit.format_seconds(float("inf")) == "?"


def test_run_cli_exit_codes(capsys):
    """User errors print one line and give 2; anything else propagates with its traceback."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--fail", default="")

    parser.add_argument("--mode", choices=("a", "b"), default="a")

    def run(args):
        if args.fail == "user":
            raise ValueError("bad --fail value")
        if args.fail == "cuda":
            raise DeviceError("--device cuda: no CUDA GPU")
        if args.fail == "bug":
            raise KeyError("bug")
        if args.fail == "other":
            raise RuntimeError("CUDA mentioned in a message is no reason to hide a traceback")

    assert run_cli(parser, run, [], (ValueError,)) == 0
    assert run_cli(parser, run, ["--fail", "user"], (ValueError,)) == 2
    assert capsys.readouterr().err == "error: bad --fail value\n"
    assert run_cli(parser, run, ["--fail", "cuda"], (ValueError, DeviceError)) == 2
    assert capsys.readouterr().err == "error: --device cuda: no CUDA GPU\n"
    is_device = lambda e: isinstance(e, DeviceError)  # noqa: E731 - classification by type, never by message
    assert run_cli(parser, run, ["--fail", "cuda"], (ValueError,), is_user_error=is_device) == 2
    with pytest.raises(DeviceError):
        run_cli(parser, run, ["--fail", "cuda"], (ValueError,))
    with pytest.raises(RuntimeError, match="CUDA mentioned"):
        run_cli(parser, run, ["--fail", "other"], (ValueError, DeviceError))
    with pytest.raises(KeyError):
        run_cli(parser, run, ["--fail", "bug"], (ValueError,), is_user_error=is_device)
    # A value argparse rejects: argparse's own message, and its exit status returned instead of raised.
    capsys.readouterr()
    assert run_cli(parser, run, ["--mode", "c"], (ValueError,)) == 2
    assert "invalid choice: 'c'" in capsys.readouterr().err


def test_setup_distributed_cuda_without_gpu_is_device_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="--device cpu"):
        trainkit.setup_distributed("cuda")
    assert issubclass(DeviceError, RuntimeError)  # callers catching RuntimeError still do


# ------------------------------------------------------------------------------------------- resume


_MUST_MATCH = ("lr", "width")


class _Toy(torch.nn.Module):
    """Linear -> BatchNorm1d -> ReLU -> Dropout -> Linear: parameters, running statistics and RNG use."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, width),
            torch.nn.BatchNorm1d(width),
            torch.nn.ReLU(),
            torch.nn.Dropout(0.3),
            torch.nn.Linear(width, 3),
        )

    def forward(self, x):
        return self.net(x)


def _toy_run(out: Path, epochs: int, resume: bool = False, stop_after=None, width: int = 8) -> ResumePoint:
    """A miniature trainer walked exactly as densenet.train / segmentation.train walk trainkit."""
    args = {"lr": 0.1, "width": width, "seed": 3}
    path = str(out / "checkpoint.pt")
    ckpt = load_resume_checkpoint(path, args, _MUST_MATCH, kind="toy") if resume else None
    seed_everything(args["seed"])
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(30, 4, generator=g), torch.randint(0, 3, (30,), generator=g))
    shuffle = torch.Generator()
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True, generator=shuffle, drop_last=True)
    model = _Toy(width)
    optimizer = torch.optim.SGD(model.parameters(), lr=args["lr"], momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    start = restore_training_state(ckpt, path, model, optimizer, scheduler) if ckpt else ResumePoint()
    iteration = start.iteration
    for epoch in range(start.epoch + 1, epochs + 1):
        set_epoch_seed(shuffle, args["seed"], epoch)
        model.train()
        for x, y in loader:
            x = x + 0.01 * torch.randn_like(x)  # an "augmentation" drawing from the global RNG
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            iteration += 1
        scheduler.step()
        save_training_checkpoint(
            path,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            epoch=epoch,
            iteration=iteration,
            args=args,
            elapsed=float(epoch),
        )
        if stop_after_reached(stop_after, epoch - start.epoch, epoch, epochs):
            break
    return start


def test_resume_two_epochs_equal_one_plus_resume_plus_one_bitwise(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _toy_run(tmp_path / "a", epochs=2)
    _toy_run(tmp_path / "b", epochs=2, stop_after=1)
    half = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert half["epoch"] == 1 and half["iteration"] == 3 and half["elapsed"] == 1.0
    seed_everything(12345)  # the resumed process starts from scrambled RNGs
    torch.rand(100)
    start = _toy_run(tmp_path / "b", epochs=2, resume=True)
    assert start == ResumePoint(epoch=1, iteration=3, elapsed=1.0, rng_exact=True, resumed=True)
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2 and a["iteration"] == b["iteration"] == 6
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
    assert a["scheduler"] == b["scheduler"]
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])  # the RNG streams ended in the same place


def test_resume_refuses_other_settings_and_misfit_states(tmp_path):
    _toy_run(tmp_path, epochs=1)
    path = str(tmp_path / "checkpoint.pt")
    with pytest.raises(ResumeError, match=r"--width 8 \(now 16\)"):
        load_resume_checkpoint(path, {"lr": 0.1, "width": 16}, _MUST_MATCH, kind="toy")
    with pytest.raises(ResumeError, match="not found"):
        load_resume_checkpoint(str(tmp_path / "nope.pt"), {}, (), kind="toy")
    ckpt = load_resume_checkpoint(path, {"lr": 0.1, "width": 8}, _MUST_MATCH, kind="toy")
    wide = _Toy(16)
    with pytest.raises(ResumeError, match="does not fit") as e:
        restore_training_state(ckpt, path, wide, torch.optim.SGD(wide.parameters(), lr=0.1))
    assert path in str(e.value) and isinstance(e.value.__cause__, RuntimeError)
    broken = dict(ckpt, rng={"torch": torch.get_rng_state()})  # numpy/python states missing
    model = _Toy(8)
    with pytest.raises(ResumeError, match="malformed RNG state"):
        restore_training_state(broken, path, model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))


def test_restore_picks_this_ranks_rng_state(tmp_path):
    states = []
    for seed in (1, 2):
        seed_everything(seed)
        states.append(rng_state())
    model = _Toy()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = str(tmp_path / "c.pt")
    save_training_checkpoint(
        path,
        model=model,
        optimizer=opt,
        scheduler=torch.optim.lr_scheduler.StepLR(opt, 1),
        epoch=4,
        iteration=40,
        args={"x": 1},
        rng_per_rank=states,
        num_classes=3,
    )
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["num_classes"] == 3 and torch.equal(ckpt["rng"]["torch"], states[0]["torch"])
    point = restore_training_state(ckpt, path, model, opt, rank=1, world_size=2)
    assert point.rng_exact and point.epoch == 4 and point.iteration == 40
    seed_everything(2)
    expect = torch.rand(3)
    restore_training_state(ckpt, path, model, opt, rank=1, world_size=2)
    assert torch.equal(torch.rand(3), expect)
    # Another number of processes: rank 0's state, flagged as not exact.
    assert not restore_training_state(ckpt, path, model, opt, rank=0, world_size=3).rng_exact
    seed_everything(1)
    expect = torch.rand(3)
    restore_training_state(ckpt, path, model, opt, rank=2, world_size=3)
    assert torch.equal(torch.rand(3), expect)


def test_stop_after_counts_this_process():
    check_stop_after(None)
    check_stop_after(1)
    with pytest.raises(ValueError, match="--stop-after"):
        check_stop_after(0)
    assert not stop_after_reached(None, 5, 5, 10)
    assert stop_after_reached(2, 2, 2, 10)
    assert not stop_after_reached(2, 1, 5, 10)  # resumed at 4: one epoch of this process so far
    assert stop_after_reached(2, 2, 6, 10)
    assert not stop_after_reached(1, 1, 10, 10)  # the last epoch finishes the run normally


def test_stop_after_resume_chain_matches_straight_run(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _toy_run(tmp_path / "a", epochs=3)
    _toy_run(tmp_path / "b", epochs=3, stop_after=1)
    assert _toy_run(tmp_path / "b", epochs=3, resume=True, stop_after=1).epoch == 1
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["epoch"] == 2
    assert _toy_run(tmp_path / "b", epochs=3, resume=True, stop_after=1).epoch == 2
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_set_epoch_seed_orders_depend_on_seed_epoch_rank_only():
    data = torch.utils.data.TensorDataset(torch.arange(20))
    gen = torch.Generator()
    loader = torch.utils.data.DataLoader(data, batch_size=20, shuffle=True, generator=gen)

    def order(seed, epoch, rank=0):
        set_epoch_seed(gen, seed, epoch, rank)
        torch.rand(5)  # the global RNG plays no part
        return next(iter(loader))[0].tolist()

    assert order(0, 1) == order(0, 1) and sorted(order(0, 1)) == list(range(20))
    assert order(0, 1) != order(0, 2) and order(0, 1) != order(1, 1) and order(0, 1) != order(0, 1, rank=1)


# ------------------------------------------------------------------------------------------- memory meter


def _conv_iabn(norm: str) -> torch.nn.Module:
    from inplace_abn import InPlaceABN

    layers = [torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)]
    if norm == "bn":
        layers += [torch.nn.BatchNorm2d(8), torch.nn.LeakyReLU(0.01)]
    else:
        layers += [InPlaceABN(8, activation="leaky_relu", activation_param=0.01)]
    layers += [torch.nn.Conv2d(8, 4, 1), torch.nn.Dropout(0.2)]
    return torch.nn.Sequential(*layers)


def _step(model: torch.nn.Module) -> torch.Tensor:
    x = torch.empty(2, 3, 10, 12).normal_()
    return model(x).logsumexp(1).mean()


@pytest.mark.parametrize("norm", ["bn", "iabn"])
def test_meter_equals_a_direct_count(norm):
    from inplace_abn.memory import parameters_of, saved_tensor_bytes

    before = torch.get_rng_state()
    meta = saved_bytes_on_meta(lambda: _conv_iabn(norm), _step)
    assert torch.equal(torch.get_rng_state(), before)  # the meter leaves the global RNG alone
    model = _conv_iabn(norm).train()
    real, _loss, _ = saved_tensor_bytes(lambda: _step(model), exclude=parameters_of(model))
    assert meta == real > 0


def test_compare_saved_memory_and_line():
    counted = []

    def count(norm):
        counted.append(norm)
        return {"bn": 3 * 2**20, "iabn": 2**20}[norm]

    mem = compare_saved_memory(count, "iabn")
    assert counted == ["iabn", "bn"]
    assert mem.as_dict() == {"bn_mib": 3.0, "norm_mib": 1.0, "ratio": 1 / 3}
    assert mem.line("float32 training step, batch 2 x 3 x 8 x 8") == (
        "activation memory saved vs BatchNorm: 3.0 MiB -> 1.0 MiB (0.33x) [saved for backward by one float32 "
        "training step, batch 2 x 3 x 8 x 8, norm=bn -> norm=iabn, parameters excluded]"
    )
    counted.clear()
    same = compare_saved_memory(count, "bn")
    assert counted == ["bn"] and same.ratio == 1.0  # the baseline itself is counted once
    real = compare_saved_memory(lambda norm: saved_bytes_on_meta(lambda: _conv_iabn(norm), _step), "iabn")
    assert real.norm_bytes < real.bn_bytes


# ------------------------------------------------------------------------------------------- divergence


@pytest.mark.parametrize("where", ["weight", "buffer", "loss"])
def test_check_finite_step_names_iteration_and_tensor(where):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    trainkit.check_finite_step(model, torch.tensor(1.0), 1)  # all finite: no error
    loss = torch.tensor(1.0)
    with torch.no_grad():
        if where == "weight":
            model[0].weight[1, 1] = float("nan")
        elif where == "buffer":
            model[1].running_var[0] = float("inf")
        else:
            loss = torch.tensor(float("-inf"))
    expect = {"weight": "'0.weight'", "buffer": "'1.running_var'", "loss": "loss -inf"}[where]
    with pytest.raises(trainkit.DivergenceError, match=rf"iteration 7 \(epoch 2\): .*{expect}"):
        trainkit.check_finite_step(model, loss, 7, epoch=2)


def test_save_training_checkpoint_refuses_non_finite_weights(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    path = tmp_path / "checkpoint.pt"
    save_training_checkpoint(str(path), model=model, optimizer=opt, scheduler=sched, epoch=1, args={})
    with torch.no_grad():
        model.bias[0] = float("nan")
    with pytest.raises(trainkit.DivergenceError, match="'bias'"):
        save_training_checkpoint(str(path), model=model, optimizer=opt, scheduler=sched, epoch=2, args={})
    assert torch.load(path, weights_only=True)["epoch"] == 1 and os.listdir(tmp_path) == ["checkpoint.pt"]


# ------------------------------------------------------------------------------------------- --out protection

_RUN = ("checkpoint.pt", "log.csv", "final.json")


@pytest.mark.parametrize(
    "layout, kwargs, fragment",
    [
        ({"checkpoint.pt": b"x"}, {}, "already holds a run (checkpoint.pt)"),
        ({"log.csv": b"x", "final.json": b"{}"}, {}, "already holds a run (log.csv, final.json)"),
        ({"log.csv": b"x"}, {"create": False}, "--overwrite"),
        ("file", {}, "is a file, not a folder"),
        ("file", {"resume": "ck.pt"}, "is a file, not a folder"),
        ("under-a-file", {}, "cannot be written"),
    ],
    ids=["checkpoint", "log-and-final", "read-only-check", "file", "file-with-resume", "under-a-file"],
)
def test_prepare_out_dir_refuses(tmp_path, layout, kwargs, fragment):
    out = tmp_path / "out"
    if layout == "file":
        out.write_bytes(b"not a folder")
    elif layout == "under-a-file":
        (tmp_path / "f").write_bytes(b"")
        out = tmp_path / "f" / "out"
    else:
        out.mkdir()
        for name, data in layout.items():
            (out / name).write_bytes(data)
    before = {p.name: p.read_bytes() for p in out.iterdir()} if out.is_dir() else None
    with pytest.raises(trainkit.OutDirError, match="--out") as e:
        trainkit.prepare_out_dir(str(out), _RUN, **kwargs)
    assert fragment in str(e.value) and str(out) in str(e.value)
    if before is not None:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched


def test_prepare_out_dir_resume_overwrite_and_stale_temp_files(tmp_path):
    out = tmp_path / "run"
    trainkit.prepare_out_dir(str(out), _RUN)  # creates a missing folder
    assert out.is_dir() and os.listdir(out) == []
    (out / "checkpoint.pt").write_bytes(b"ck")
    (out / "final.json").write_bytes(b"{}")
    (out / ".tmp-abc123.pt").write_bytes(b"\0" * 1000)  # what a killed atomic_save leaves
    (out / "notes.txt").write_bytes(b"mine")
    trainkit.prepare_out_dir(str(out), _RUN, resume=str(out / "checkpoint.pt"))
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "final.json", "notes.txt"]  # the run kept, temp gone
    trainkit.prepare_out_dir(str(out), _RUN, overwrite=True)
    assert os.listdir(out) == ["notes.txt"]  # the earlier run's files removed, nothing else


# ------------------------------------------------------------------------------------------- checksums


def _tamper_tensor_bytes(path):
    from helpers import damage_checkpoint

    damage_checkpoint(str(path))


def _tamper_number(path):  # a re-pickled file whose epoch changed but whose stored checksum did not
    ckpt = torch.load(path, weights_only=True)
    ckpt["epoch"] += 1
    torch.save(ckpt, path)


def _tamper_key(path):
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"] = {k.replace("weight", "weigth"): v for k, v in ckpt["model"].items()}
    torch.save(ckpt, path)


@pytest.mark.parametrize(
    "tamper", [_tamper_tensor_bytes, _tamper_number, _tamper_key], ids=["tensor-bytes", "number", "key"]
)
def test_load_checkpoint_refuses_content_that_does_not_match_its_checksum(tmp_path, tamper):
    path = tmp_path / "checkpoint.pt"
    atomic_save({"model": torch.nn.Linear(8, 8).state_dict(), "epoch": 3, "args": {"lr": 0.1}}, str(path))
    assert load_checkpoint(str(path), required=("model",))["epoch"] == 3  # intact: verified and loaded
    tamper(path)
    with pytest.raises(CheckpointError, match="is damaged") as e:
        load_checkpoint(str(path), required=("model",), option="--checkpoint")
    assert str(path) in str(e.value) and "--checkpoint" in str(e.value)


def test_content_sha256_sees_every_entry_and_legacy_files_load():
    base = {"w": torch.arange(6.0).reshape(2, 3), "n": 1, "s": "a", "l": [1.5, None]}
    digest = trainkit.content_sha256(base)
    assert trainkit.content_sha256({**base, trainkit.CHECKSUM_KEY: "anything"}) == digest
    # a set's iteration order changes with the process's string hashing: its checksum must not
    assert trainkit.content_sha256({"s": {"a", "bb", "ccc"}}) == trainkit.content_sha256({"s": {"ccc", "a", "bb"}})
    for changed in (
        {**base, "w": torch.arange(6.0).reshape(3, 2)},
        {**base, "w": base["w"].double()},
        {**base, "n": 2},
        {**base, "s": "b"},
        {**base, "l": [1.5, 0]},
        {**base, "x": 0},
    ):
        assert trainkit.content_sha256(changed) != digest


def test_checkpoint_without_checksum_loads_unverified(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"model": {"w": torch.ones(2)}}, path)  # as written before checksums existed
    assert torch.equal(load_checkpoint(str(path), required=("model",))["model"]["w"], torch.ones(2))


def test_next_free_out_dir_never_picks_a_folder_holding_a_run(tmp_path):
    """The demo's default run folder: the base while it holds no run, then base-2, base-3, ... (a folder with
    other files but no run product is free)."""
    base = str(tmp_path / "demo")
    assert trainkit.next_free_out_dir(base, _RUN) == base
    os.makedirs(base)
    (tmp_path / "demo" / "notes.txt").write_text("mine")
    assert trainkit.next_free_out_dir(base, _RUN) == base
    (tmp_path / "demo" / "log.csv").write_text("x")
    assert trainkit.next_free_out_dir(base, _RUN) == base + "-2"
    os.makedirs(base + "-2")
    (tmp_path / "demo-2" / "final.json").write_text("{}")
    assert trainkit.next_free_out_dir(base, _RUN) == base + "-3"
