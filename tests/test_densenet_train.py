"""densenet.train / densenet.data: CLI smoke run, exact resume, stop-after, the train_one_epoch/evaluate walk,
the Dataset and its augmentation, the saved-memory figure, local CIFAR-10 loader and its error messages."""

from __future__ import annotations

import csv
import json
import math
import os
import pickle
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from densenet import data as dn_data  # noqa: E402
from densenet import train as dn_train  # noqa: E402
from densenet.data import DataError, load_cifar10_tensors  # noqa: E402

_N_PER_BATCH = 20


def _write_cifar(root: Path, n: int = _N_PER_BATCH, seed: int = 0) -> Path:
    """A tiny synthetic CIFAR-10 copy in the official layout: root/cifar-10-batches-py/{data_batch_1..5,test_batch}."""
    rng = np.random.RandomState(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {
            b"data": rng.randint(0, 256, size=(n, 3072), dtype=np.uint8),
            b"labels": rng.randint(0, 10, size=n).tolist(),
            b"batch_label": name.encode(),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(d, f, protocol=2)
    return folder


def _tiny_args(out: Path, *extra: str) -> list:
    return [
        "--depth",
        "10",
        "--growth-rate",
        "4",
        "--batch-size",
        "16",
        "--threads",
        "1",
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]


# ------------------------------------------------------------------------------------------- CIFAR loader


def test_cifar_loader_synthetic(tmp_path):
    folder = _write_cifar(tmp_path)
    xtr, ytr, xte, yte = load_cifar10_tensors(str(tmp_path))
    assert xtr.shape == (5 * _N_PER_BATCH, 3, 32, 32) and xtr.dtype == torch.float32
    assert xte.shape == (_N_PER_BATCH, 3, 32, 32)
    assert ytr.shape == (5 * _N_PER_BATCH,) and ytr.dtype == torch.int64 and int(ytr.max()) <= 9
    # Layout: row-major 3x32x32 (channel planes), normalised with the CIFAR mean/std.
    with open(folder / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    pix = raw[b"data"][0].reshape(3, 32, 32)[1, 5, 7] / 255.0
    expect = (pix - dn_data.CIFAR10_MEAN[1]) / dn_data.CIFAR10_STD[1]
    assert xtr[0, 1, 5, 7].item() == pytest.approx(expect, abs=1e-5)
    assert ytr[0].item() == raw[b"labels"][0]
    # The cifar-10-batches-py folder itself is accepted too.
    assert load_cifar10_tensors(str(folder))[0].shape == xtr.shape


def test_cifar_missing_dir(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="not found") as e:
        load_cifar10_tensors(str(missing))
    assert str(missing) in str(e.value) and "--data-dir" in str(e.value)


def test_cifar_missing_file(tmp_path):
    folder = _write_cifar(tmp_path)
    os.remove(folder / "data_batch_3")
    with pytest.raises(DataError, match="missing") as e:
        load_cifar10_tensors(str(tmp_path))
    assert "data_batch_3" in str(e.value)


@pytest.mark.parametrize("kind", ["truncated", "garbage", "wrong_shape", "wrong_keys"])
def test_cifar_corrupt_file(tmp_path, kind):
    folder = _write_cifar(tmp_path)
    bad = folder / "test_batch"
    if kind == "truncated":
        bad.write_bytes(bad.read_bytes()[:100])
    elif kind == "garbage":
        bad.write_bytes(b"this is not a pickle")
    elif kind == "wrong_shape":
        with open(bad, "wb") as f:
            pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, f)
    else:
        with open(bad, "wb") as f:
            pickle.dump({b"pixels": np.zeros((4, 3072), np.uint8)}, f)
    with pytest.raises(DataError, match="corrupt") as e:
        load_cifar10_tensors(str(tmp_path))
    assert "test_batch" in str(e.value)


def test_cli_cifar_bad_path_exit_code(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    rc = dn_train.main(_tiny_args(tmp_path / "out", "--data", "cifar10", "--data-dir", str(missing)))
    assert rc == 2
    assert str(missing) in capsys.readouterr().err


def test_cli_cifar_one_epoch(tmp_path):
    _write_cifar(tmp_path / "data")
    out = tmp_path / "out"
    rc = dn_train.main(_tiny_args(out, "--data", "cifar10", "--data-dir", str(tmp_path / "data"), "--epochs", "1"))
    assert rc == 0
    assert json.loads((out / "final.json").read_text())["epochs"] == 1


# ------------------------------------------------------------------------------------------- digits CLI


def test_cli_digits_one_epoch(tmp_path, capsys):
    pytest.importorskip("sklearn")
    out = tmp_path / "run"
    rc = dn_train.main(_tiny_args(out, "--epochs", "1", "--limit-train", "64", "--limit-test", "32"))
    assert rc == 0
    with open(out / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and tuple(rows[0]) == dn_train.CSV_FIELDS
    assert rows[0]["epoch"] == "1" and float(rows[0]["saved_mib"]) > 0
    final = json.loads((out / "final.json").read_text())
    assert 0.0 <= final["test_acc"] <= 1.0
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1 and {"model", "optimizer", "scheduler", "rng"} <= set(ckpt)
    assert not [p for p in os.listdir(out) if p.startswith(".tmp-")]  # atomic write left no temp file
    assert "final test accuracy" in capsys.readouterr().out


def test_digits_split_deterministic_and_stratified():
    pytest.importorskip("sklearn")
    a = dn_data.load_digits_tensors(size=8, seed=3)
    b = dn_data.load_digits_tensors(size=8, seed=3)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    xtr, ytr, xte, yte = a
    assert len(xtr) + len(xte) == 1797 and xtr.shape[1:] == (3, 8, 8)
    assert abs(len(xte) / 1797 - 0.2) < 0.01
    counts = torch.bincount(yte, minlength=10)
    assert int(counts.min()) >= 34 and int(counts.max()) <= 38  # ~20% of each class (174..183 per class)


# ------------------------------------------------------------------------------------------- exact resume


def _params(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


@pytest.mark.parametrize("schedule", ["cosine", "step"])
def test_resume_is_exact(tmp_path, schedule):
    # Synthetic CIFAR (no sklearn needed); float64, one thread, dropout on (uses the RNG), augmentation on.
    _write_cifar(tmp_path / "data", n=12)
    common = [
        "--data",
        "cifar10",
        "--data-dir",
        str(tmp_path / "data"),
        "--epochs",
        "2",
        "--dtype",
        "float64",
        "--drop-rate",
        "0.1",
        "--schedule",
        schedule,
        "--limit-train",
        "40",
        "--limit-test",
        "8",
    ]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert dn_train.main(_tiny_args(straight, *common)) == 0
    assert dn_train.main(_tiny_args(split, *common, "--stop-after", "1")) == 0
    assert not (split / "final.json").exists()
    assert torch.load(split / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert dn_train.main(_tiny_args(split, *common, "--resume", str(split / "checkpoint.pt"))) == 0
    a, b = _params(straight / "checkpoint.pt"), _params(split / "checkpoint.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa = json.loads((straight / "final.json").read_text())
    sb = json.loads((split / "final.json").read_text())
    assert sa["test_acc"] == sb["test_acc"] and sa["test_loss"] == sb["test_loss"]
    with open(split / "log.csv", newline="") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2"]


def test_resume_errors(tmp_path, capsys):
    _write_cifar(tmp_path / "data", n=8)
    common = ["--data", "cifar10", "--data-dir", str(tmp_path / "data"), "--epochs", "1", "--limit-train", "16"]
    missing = tmp_path / "missing.pt"
    assert dn_train.main(_tiny_args(tmp_path / "o1", *common, "--resume", str(missing))) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "not found" in err

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage" * 10)
    assert dn_train.main(_tiny_args(tmp_path / "o2", *common, "--resume", str(corrupt))) == 2
    err = capsys.readouterr().err
    assert str(corrupt) in err and "corrupt" in err

    not_ours = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, not_ours)
    assert dn_train.main(_tiny_args(tmp_path / "o3", *common, "--resume", str(not_ours))) == 2
    assert str(not_ours) in capsys.readouterr().err

    # A real checkpoint resumed with a different architecture is refused with the differing option named.
    assert dn_train.main(_tiny_args(tmp_path / "o4", *common)) == 0
    assert (
        dn_train.main(
            _tiny_args(
                tmp_path / "o4", *common, "--growth-rate", "6", "--resume", str(tmp_path / "o4" / "checkpoint.pt")
            )
        )
        == 2
    )
    assert "--growth-rate" in capsys.readouterr().err


def test_bad_model_option_is_reported(tmp_path, capsys):
    _write_cifar(tmp_path / "data", n=4)
    rc = dn_train.main(
        _tiny_args(tmp_path / "o", "--data", "cifar10", "--data-dir", str(tmp_path / "data"), "--memory", "bogus")
    )
    assert rc == 2
    assert "memory" in capsys.readouterr().err


def test_digits_without_sklearn_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes `from sklearn.datasets import ...` fail
    with pytest.raises(DataError, match="pip install scikit-learn"):
        dn_data.load_digits_tensors()


# ------------------------------------------------------------------------------------------- structure


def test_norm_and_memory_are_argparse_choices(tmp_path, capsys):
    from densenet.model import MEMORY_MODES, NORMS

    actions = {a.dest: a for a in dn_train.build_parser()._actions}
    assert tuple(actions["norm"].choices) == NORMS and tuple(actions["memory"].choices) == MEMORY_MODES
    assert dn_train.main(_tiny_args(tmp_path / "o", "--norm", "gn")) == 2
    assert "invalid choice: 'gn'" in capsys.readouterr().err


def test_stop_after_counts_epochs_of_this_process(tmp_path):
    _write_cifar(tmp_path / "data", n=12)
    common = [
        "--data",
        "cifar10",
        "--data-dir",
        str(tmp_path / "data"),
        "--epochs",
        "3",
        "--limit-train",
        "40",
        "--limit-test",
        "8",
        "--dtype",
        "float64",
    ]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert dn_train.main(_tiny_args(straight, *common)) == 0
    ckpt = str(split / "checkpoint.pt")
    assert dn_train.main(_tiny_args(split, *common, "--stop-after", "1")) == 0
    assert dn_train.main(_tiny_args(split, *common, "--stop-after", "1", "--resume", ckpt)) == 0
    assert torch.load(ckpt, weights_only=True)["epoch"] == 2 and not (split / "final.json").exists()
    assert dn_train.main(_tiny_args(split, *common, "--stop-after", "1", "--resume", ckpt)) == 0  # last epoch
    assert json.loads((split / "final.json").read_text())["epochs"] == 3
    a, b = _params(straight / "checkpoint.pt"), _params(split / "checkpoint.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert dn_train.main(_tiny_args(tmp_path / "o", *common, "--stop-after", "0")) == 2


def test_train_one_epoch_and_evaluate_directly():
    torch.manual_seed(0)
    x, y = torch.randn(20, 3, 8, 8), torch.randint(0, 10, (20,))
    ds = dn_data.ImageTensorDataset(x, y)
    model = dn_train.densenet_bc(10, growth_rate=4, num_classes=10)
    crit = torch.nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    args = dn_train.build_parser().parse_args(["--epochs", "1", "--no-progress"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    loss, acc = dn_train.train_one_epoch(model, crit, opt, loader, torch.device("cpu"), 1, args)
    assert math.isfinite(loss) and 0.0 <= acc <= 1.0
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    test_loss, test_acc = dn_train.evaluate(
        model, crit, torch.utils.data.DataLoader(ds, batch_size=7), torch.device("cpu")
    )
    assert not model.training
    with torch.no_grad():
        logits = model(x)
    assert test_loss == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-5)
    assert test_acc == (logits.argmax(1) == y).sum().item() / len(y)


def test_dataset_augmentation_and_seeded_loader():
    x, y = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6), torch.tensor([3, 5])
    assert torch.equal(dn_data.ImageTensorDataset(x, y, dn_data.RandomCropFlip(0, 0.0))[1][0], x[1])
    flip = dn_data.ImageTensorDataset(x, y, dn_data.RandomCropFlip(0, 1.0))[0]
    assert torch.equal(flip[0], x[0].flip(-1)) and flip[1].item() == 3
    aug = dn_data.RandomCropFlip(padding=4)
    torch.manual_seed(1)
    a = aug(x[0])
    torch.manual_seed(1)
    assert torch.equal(aug(x[0]), a) and a.shape == x[0].shape
    # Every output pixel is an input pixel or zero padding.
    assert set(a.unique().tolist()) <= set(x[0].unique().tolist()) | {0.0}
    with pytest.raises(ValueError, match="labels"):
        dn_data.ImageTensorDataset(x, y[:1])


def test_saved_mib_is_the_meters_exact_count(tmp_path):
    from inplace_abn.memory import parameters_of, saved_tensor_bytes

    args = dn_train.build_parser().parse_args(["--depth", "10", "--growth-rate", "4", "--memory", "efficient"])
    mem = dn_train.saved_memory(args, 16, (3, 16, 16))
    model = dn_train.densenet_bc(10, growth_rate=4, norm="iabn", memory="efficient", num_classes=10).train()
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    real, _loss, _ = saved_tensor_bytes(
        lambda: torch.nn.functional.cross_entropy(model(x.clone()), y), exclude=parameters_of(model)
    )
    assert mem.norm_bytes == real
    assert mem.norm_bytes < mem.bn_bytes and "memory=checkpoint" in mem.baseline


# ------------------------------------------------------------------------------------------- divergence


def test_divergence_is_a_clear_error_without_a_checkpoint(tmp_path, capsys):
    _write_cifar(tmp_path / "data", n=8)
    out = tmp_path / "out"
    rc = dn_train.main(
        _tiny_args(
            out,
            "--data",
            "cifar10",
            "--data-dir",
            str(tmp_path / "data"),
            "--epochs",
            "1",
            "--limit-train",
            "32",
            "--lr",
            "1e30",
        )
    )
    err = capsys.readouterr().err
    assert rc == 2 and re.search(r"diverged at iteration \d+ \(epoch 1\)", err) and "Traceback" not in err
    assert not (out / "checkpoint.pt").exists()


def test_divergence_in_a_later_epoch_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    _write_cifar(tmp_path / "data", n=8)
    real_step = torch.optim.SGD.step
    calls = {"n": 0}

    def step(self, *a, **k):  # step 3 = the first of epoch 2 (2 batches of 16 per epoch)
        out = real_step(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][-1].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    out = tmp_path / "out"
    rc = dn_train.main(
        _tiny_args(
            out, "--data", "cifar10", "--data-dir", str(tmp_path / "data"), "--epochs", "2", "--limit-train", "32"
        )
    )
    err = capsys.readouterr().err
    assert rc == 2 and "diverged at iteration 3 (epoch 2)" in err
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (out / "final.json").exists()


# ------------------------------------------------------------------------------------------- --out protection


def test_out_with_an_earlier_run_is_refused_unless_resume_or_overwrite(tmp_path, capsys):
    _write_cifar(tmp_path / "data", n=8)
    common = ["--data", "cifar10", "--data-dir", str(tmp_path / "data"), "--epochs", "1", "--limit-train", "16"]
    out = tmp_path / "out"
    assert dn_train.main(_tiny_args(out, *common)) == 0
    first = (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert dn_train.main(_tiny_args(out, *common, "--seed", "3")) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite" in err and str(out) in err
    assert (out / "checkpoint.pt").read_bytes() == first
    assert dn_train.main(_tiny_args(out, *common, "--seed", "3", "--overwrite")) == 0
    assert (out / "checkpoint.pt").read_bytes() != first


@pytest.mark.parametrize("kind", ["file", "under-a-file"])
def test_unusable_out_fails_before_training(tmp_path, capsys, kind):
    (tmp_path / "f").write_bytes(b"")
    out = tmp_path / "f" if kind == "file" else tmp_path / "f" / "sub"
    rc = dn_train.main(_tiny_args(out, "--data", "cifar10", "--data-dir", str(tmp_path / "missing")))
    err = capsys.readouterr().err
    # refused before the (missing) data is even looked at
    assert rc == 2 and "--out" in err and str(out) in err and "cifar" not in err.lower()


def test_damaged_checkpoint_is_refused_on_resume(tmp_path, capsys):
    from helpers import damage_checkpoint

    _write_cifar(tmp_path / "data", n=8)
    common = ["--data", "cifar10", "--data-dir", str(tmp_path / "data"), "--epochs", "2", "--limit-train", "16"]
    out = tmp_path / "out"
    assert dn_train.main(_tiny_args(out, *common, "--stop-after", "1")) == 0
    damage_checkpoint(out / "checkpoint.pt")
    capsys.readouterr()
    assert dn_train.main(_tiny_args(out, *common, "--resume", str(out / "checkpoint.pt"))) == 2
    err = capsys.readouterr().err
    assert "is damaged" in err and str(out / "checkpoint.pt") in err
