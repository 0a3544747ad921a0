"""Every numeric option of the trainers, the evaluator, the synthetic generator and the benchmarks is range
checked by argparse: a nonsense value is refused with an error naming the option, before any work or file."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from trainkit import float_range, int_list, int_range  # noqa: E402


def _main(name: str) -> Callable[[list[str]], int]:
    """``main`` of a package module (``segmentation.train``) or of a benchmark script (``benchmarks/x.py``)."""
    if name.endswith(".py"):
        bench = str(ROOT / "benchmarks")
        if bench not in sys.path:
            sys.path.insert(0, bench)
        spec = importlib.util.spec_from_file_location(f"_bench_{Path(name).stem}", ROOT / name)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module.main
    return importlib.import_module(name).main


def _exit_status(main: Callable[[list[str]], int], argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse in scripts that do not catch it
        return e.code


_SEG = ["--data", "{tmp}/data"]
_DN = ["--no-progress"]

# (command, extra arguments, bad option and value)
CASES = [
    ("segmentation.train", _SEG, ["--crop", "8"]),
    ("segmentation.train", _SEG, ["--scale-min", "0"]),
    ("segmentation.train", _SEG, ["--scale-max", "inf"]),
    ("segmentation.train", _SEG, ["--flip-p", "1.5"]),
    ("segmentation.train", _SEG, ["--workers", "-1"]),
    ("segmentation.train", _SEG, ["--width", "0"]),
    ("segmentation.train", _SEG, ["--epochs", "0"]),
    ("segmentation.train", _SEG, ["--iters", "-5"]),
    ("segmentation.train", _SEG, ["--batch-size", "0"]),
    ("segmentation.train", _SEG, ["--lr", "nan"]),
    ("segmentation.train", _SEG, ["--momentum", "-0.1"]),
    ("segmentation.train", _SEG, ["--weight-decay", "-1e-4"]),
    ("segmentation.train", _SEG, ["--poly-power", "-1"]),
    ("segmentation.train", _SEG, ["--seed", "-1"]),
    ("segmentation.train", _SEG, ["--threads", "0"]),
    ("segmentation.train", _SEG, ["--eval-every", "-1"]),
    ("segmentation.train", _SEG, ["--save-predictions", "-2"]),
    ("segmentation.train", _SEG, ["--stop-after", "0"]),
    ("segmentation.evaluate", ["--checkpoint", "{tmp}/c.pt"], ["--save-predictions", "-1"]),
    ("segmentation.evaluate", ["--checkpoint", "{tmp}/c.pt"], ["--workers", "-1"]),
    ("segmentation.evaluate", ["--checkpoint", "{tmp}/c.pt"], ["--threads", "0"]),
    ("segmentation.synthetic", ["--out", "{tmp}/out"], ["--num-train", "0"]),
    ("segmentation.synthetic", ["--out", "{tmp}/out"], ["--num-val", "-1"]),
    ("segmentation.synthetic", ["--out", "{tmp}/out"], ["--height", "8"]),
    ("segmentation.synthetic", ["--out", "{tmp}/out"], ["--width", "x"]),
    ("segmentation.synthetic", ["--out", "{tmp}/out"], ["--seed", "-3"]),
    ("densenet.train", _DN, ["--image-size", "1"]),
    ("densenet.train", _DN, ["--limit-train", "-64"]),
    ("densenet.train", _DN, ["--limit-test", "0"]),
    ("densenet.train", _DN, ["--depth", "4"]),
    ("densenet.train", _DN, ["--growth-rate", "0"]),
    ("densenet.train", _DN, ["--drop-rate", "1"]),
    ("densenet.train", _DN, ["--epochs", "0"]),
    ("densenet.train", _DN, ["--batch-size", "1"]),
    ("densenet.train", _DN, ["--lr", "nan"]),
    ("densenet.train", _DN, ["--lr", "-0.1"]),
    ("densenet.train", _DN, ["--weight-decay", "inf"]),
    ("densenet.train", _DN, ["--seed", "-1"]),
    ("densenet.train", _DN, ["--threads", "0"]),
    ("densenet.train", _DN, ["--stop-after", "-1"]),
    ("benchmarks/ab_pure_path.py", ["HEAD"], ["--threads", "0"]),
    ("benchmarks/ab_pure_path.py", ["HEAD"], ["--rounds", "0"]),
    ("benchmarks/ab_pure_path.py", ["HEAD"], ["--seed", "-1"]),
    ("benchmarks/bench_densenet.py", [], ["--time-depth", "3"]),
    ("benchmarks/bench_densenet.py", [], ["--rounds", "0"]),
    ("benchmarks/bench_inplace_abn.py", ["--no-csv"], ["--shapes", "2x0x4x4"]),
    ("benchmarks/bench_inplace_abn.py", ["--no-csv"], ["--threads", "1,0"]),
    ("benchmarks/bench_inplace_abn.py", ["--no-csv"], ["--rounds", "-3"]),
    ("benchmarks/bench_inplace_abn.py", ["--no-csv"], ["--warmup", "-1"]),
    ("benchmarks/bench_segmentation.py", [], ["--budget-gib", "0"]),
    ("benchmarks/bench_segmentation.py", [], ["--budget-size", "0"]),
    ("benchmarks/bench_segmentation.py", [], ["--time-width", "-1"]),
    ("benchmarks/bench_segmentation.py", [], ["--time-size", "2"]),
    ("benchmarks/bench_segmentation.py", [], ["--rounds", "0"]),
    ("benchmarks/bench_segmentation.py", [], ["--threads", "0"]),
    ("benchmarks/convert_models.py", [], ["--size", "0"]),
    ("benchmarks/convert_models.py", [], ["--batch", "1"]),
    ("benchmarks/zero_init_residual.py", [], ["--steps", "0"]),
    ("benchmarks/zero_init_residual.py", [], ["--report-at", "-1"]),
    ("benchmarks/zero_init_residual.py", [], ["--batch", "0"]),
    ("benchmarks/zero_init_residual.py", [], ["--lr", "nan"]),
    ("benchmarks/zero_init_residual.py", [], ["--threads", "0"]),
    ("benchmarks/bench_residual.py", ["layer"], ["--threads", "0"]),
    ("benchmarks/bench_residual.py", ["layer"], ["--rounds", "0"]),
    ("benchmarks/bench_residual.py", ["layer"], ["--shapes", "8x0x4"]),
    ("benchmarks/bench_residual.py", ["models"], ["--size", "0"]),
    ("benchmarks/bench_residual.py", ["models"], ["--budgets", "1.5"]),
]


@pytest.mark.parametrize("command, extra, bad", CASES, ids=[f"{c}{b[0]}={b[1]}" for c, _, b in CASES])
def test_bad_numeric_option_is_refused_naming_it_before_any_work(tmp_path, capsys, monkeypatch, command, extra, bad):
    monkeypatch.chdir(tmp_path)  # nothing may be written, here either
    argv = [a.replace("{tmp}", str(tmp_path)) for a in extra] + [f"{bad[0]}={bad[1]}"]  # "=": -1e-4 is a value
    if command in ("densenet.train", "segmentation.train"):
        argv += ["--out", str(tmp_path / "out")]
    assert _exit_status(_main(command), argv) == 2
    err = capsys.readouterr().err
    assert f"argument {bad[0]}: " in err and repr(bad[1].split(",")[-1] if "threads" in bad[0] else bad[1]) in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "make, text, value",
    [
        (lambda: int_range(1), "3", 3),
        (lambda: int_range(0, 5), "0", 0),
        (lambda: float_range(0, 1, low_open=True), "1", 1.0),
        (lambda: float_range(0), "0", 0.0),
        (lambda: int_list(1), "1, 2,4", [1, 2, 4]),
    ],
)
def test_range_types_accept_values_in_range(make, text, value):
    assert make()(text) == value


@pytest.mark.parametrize(
    "make, text, fragment",
    [
        (lambda: int_range(1), "0", "integer >= 1"),
        (lambda: int_range(0, 5), "6", "integer in [0, 5]"),
        (lambda: int_range(1), "1.5", "integer >= 1"),
        (lambda: float_range(0, 1, low_open=True), "0", "in (0, 1]"),
        (lambda: float_range(0, 1, high_open=True), "1", "in [0, 1)"),
        (lambda: float_range(0), "-inf", "finite number >= 0"),
        (lambda: float_range(), "nan", "finite number"),
        (lambda: int_list(1), ",", "comma-separated integers"),
    ],
)
def test_range_types_refuse_values_out_of_range(make, text, fragment):
    with pytest.raises(argparse.ArgumentTypeError, match=r"^must be .* got ") as e:
        make()(text)
    assert fragment in str(e.value) and repr(text) in str(e.value)
