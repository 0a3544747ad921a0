"""trainkit: RNG state round trip, atomic checkpoint writes, checkpoint errors, CSV log, progress bar fallback."""

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
    Progress,
    atomic_save,
    check_same_args,
    load_checkpoint,
    read_csv,
    rng_state,
    run_cli,
    seed_everything,
    set_rng_state,
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

    def run(args):
        if args.fail == "user":
            raise ValueError("bad --fail value")
        if args.fail == "cuda":
            raise RuntimeError("CUDA is not available")
        if args.fail == "bug":
            raise KeyError("bug")

    assert run_cli(parser, run, [], (ValueError,)) == 0
    assert run_cli(parser, run, ["--fail", "user"], (ValueError,)) == 2
    assert capsys.readouterr().err == "error: bad --fail value\n"
    is_cuda = lambda e: "CUDA" in str(e)  # noqa: E731
    assert run_cli(parser, run, ["--fail", "cuda"], (ValueError,), is_user_error=is_cuda) == 2
    with pytest.raises(RuntimeError, match="CUDA"):
        run_cli(parser, run, ["--fail", "cuda"], (ValueError,))
    with pytest.raises(KeyError):
        run_cli(parser, run, ["--fail", "bug"], (ValueError,), is_user_error=is_cuda)
