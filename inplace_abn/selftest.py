"""Self-test of the compiled kernels: fused ("cpp") vs pure-PyTorch ("python") on the same inputs.

Run ``python -m inplace_abn.selftest [--quick] [--device {auto,cuda,cpu}]``. For every shape x dtype x
activation of a grid it runs one training forward + backward of :func:`inplace_abn.functions.inplace_abn`
with each backend, compares the output, dx, dweight, dbias and the updated running statistics with the
per-dtype tolerances of :mod:`inplace_abn.testing` (the table the test suite uses), times both (CUDA
events on a GPU, wall clock on the CPU; median of interleaved repetitions after warm-up) and prints one
table row per case. The exit status is 1 if any case fails, if the extension is not loaded, or if a GPU
is visible but the extension has no CUDA kernels (it was built without CUDA).

Half-precision inputs (float16, bfloat16) use float32 parameters and running statistics (the
autocast-style mix); float32 and float64 inputs use parameters of their own dtype.
"""

from __future__ import annotations

import argparse
import platform
import statistics as _stats
import sys
import time
from collections.abc import Callable, Sequence

import torch

from . import _backend
from .functions import inplace_abn
from .testing import ELU_HALF_TOL, scaled_error
from .testing import TOLERANCES as TOL

__all__ = ["main", "run_checks"]

DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
ACTIVATIONS: tuple[tuple[str, float], ...] = (("leaky_relu", 0.01), ("elu", 1.0), ("identity", 0.0))
EPS = 1e-5
MOMENTUM = 0.1

# (shape, channels_last, big): "big" cases are skipped by the quick CPU run.
_SHAPES: tuple[tuple[tuple[int, ...], bool, bool], ...] = (
    ((16, 64, 56, 56), False, True),
    ((8, 32, 28, 28), False, False),
    ((8, 32, 28, 28), True, False),
    ((2, 3, 5, 7), False, False),
    ((4, 1, 1000), False, False),
    ((32, 256), False, False),
    ((1, 8, 256, 256), False, True),
)

_DTYPE_NAMES = {
    torch.float64: "float64",
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}
_COMPARED = ("output", "dx", "dweight", "dbias", "running_mean", "running_var")


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'auto', 'cuda' or 'cpu', got {device!r}")
    return device


def _check_kernels(device: str) -> None:
    """Raises RuntimeError with a clear message when the fused kernels for ``device`` cannot be tested."""
    if not _backend.extension_loaded():
        raise RuntimeError(
            f"the compiled extension inplace_abn._C is not loaded ({_backend.extension_error()}); only the "
            "pure-PyTorch path is available, so there are no fused kernels to check. Rebuild with "
            "`pip install --no-build-isolation .`"
        )
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                "--device cuda was requested but no CUDA GPU is visible (torch.cuda.is_available() is False)"
            )
        if not _backend.has_kernel("cuda"):
            raise RuntimeError(
                "a CUDA GPU is visible but inplace_abn._C has no CUDA kernels registered: the extension was built "
                "without CUDA (CPU only), so CUDA tensors would silently run the pure-PyTorch path. Rebuild with "
                "CUDA (FORCE_CUDA=1, CUDA_HOME set) and `pip install --no-build-isolation .`"
            )
    elif not _backend.has_kernel("cpu"):
        raise RuntimeError("inplace_abn._C is loaded but registered no CPU kernels")


def _grid(device: str, quick: bool) -> list[tuple[tuple[int, ...], bool]]:
    skip_big = device == "cpu" and quick
    return [(shape, cl) for shape, cl, big in _SHAPES if not (skip_big and big)]


def _make_case(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """Float64 inputs on the CPU (reproducible on every device), cast later."""
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    w = torch.randn(c, dtype=torch.float64, generator=gen) * 1.5
    w = torch.where(w.abs() < 0.2, w.sign() * 0.2 + w, w)  # keep |w| + eps away from eps
    if c > 1:
        w[0] = -abs(w[0].item())  # at least one negative weight (sign(w) in dweight)
    return {
        "x": torch.randn(shape, dtype=torch.float64, generator=gen) * 2 + 0.5,
        "dy": torch.randn(shape, dtype=torch.float64, generator=gen),
        "weight": w,
        "bias": torch.randn(c, dtype=torch.float64, generator=gen) * 0.5,
        "running_mean": torch.randn(c, dtype=torch.float64, generator=gen) * 0.3,
        "running_var": torch.rand(c, dtype=torch.float64, generator=gen) + 0.5,
    }


class _Step:
    """One training forward + backward of the functional layer with fixed inputs on ``device``."""

    def __init__(
        self,
        case: dict[str, torch.Tensor],
        dtype: torch.dtype,
        device: str,
        channels_last: bool,
        activation: str,
        param: float,
    ) -> None:
        param_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.x0 = case["x"].to(device=device, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
        self.dy = case["dy"].to(device=device, dtype=dtype).contiguous(memory_format=fmt)
        self.weight = case["weight"].to(device=device, dtype=param_dtype).requires_grad_()
        self.bias = case["bias"].to(device=device, dtype=param_dtype).requires_grad_()
        self.rm0 = case["running_mean"].to(device=device, dtype=param_dtype)
        self.rv0 = case["running_var"].to(device=device, dtype=param_dtype)
        self.activation, self.param = activation, param
        self.channels_last = channels_last
        # scratch running statistics for the timed repetitions (updated every call; values irrelevant)
        self.rm_t, self.rv_t = self.rm0.clone(), self.rv0.clone()

    def run(self, check_layout: bool = False) -> dict[str, torch.Tensor]:
        """One step with fresh copies of the running statistics; returns every compared tensor."""
        rm, rv = self.rm0.clone(), self.rv0.clone()
        x = self.x0.clone(memory_format=torch.preserve_format)  # a non-leaf, as a conv output would be
        ptr, strides = x.data_ptr(), x.stride()
        y = inplace_abn(x, self.weight, self.bias, rm, rv, True, MOMENTUM, EPS, self.activation, self.param)
        if check_layout:
            if y is not x or y.data_ptr() != ptr or y.stride() != strides:
                raise AssertionError(f"output is not the input written in place (strides {strides} -> {y.stride()})")
            if self.channels_last and not y.is_contiguous(memory_format=torch.channels_last):
                raise AssertionError("channels_last input did not stay channels_last")
        out = y.detach().clone()
        dx, dw, db = torch.autograd.grad(y, (self.x0, self.weight, self.bias), self.dy)
        return {"output": out, "dx": dx, "dweight": dw, "dbias": db, "running_mean": rm, "running_var": rv}

    def fresh_input(self) -> torch.Tensor:
        """A new non-leaf copy of the input for one timed step (made outside the timed region)."""
        return self.x0.clone(memory_format=torch.preserve_format)

    def layer(self, x: torch.Tensor) -> None:
        """The timed work: the layer's forward (overwriting ``x``) and its backward."""
        y = inplace_abn(
            x, self.weight, self.bias, self.rm_t, self.rv_t, True, MOMENTUM, EPS, self.activation, self.param
        )
        torch.autograd.grad(y, (self.x0, self.weight, self.bias), self.dy)


def _with_backend(name: str, fn: Callable[[], object]) -> object:
    with _backend.use_backend(name):
        return fn()


def _compare(
    actual: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    tol: tuple[float, float],
    count: int,
    skip_dx: torch.Tensor | None = None,
) -> tuple[float, str, bool]:
    """Compares every tensor of one step with ``isclose(rtol, atol * scale)``.

    ``scale`` is max(1, max|finite expected|) (:func:`inplace_abn.testing.scaled_error`, tolerances of
    :data:`inplace_abn.testing.TOLERANCES`); for the per-channel sums (dweight, dbias) it is at least
    sqrt(count), the magnitude of a sum of ``count`` O(1) terms, so a sum that cancels to nearly 0 is
    judged against the size of its terms (float32 rounding of the partial sums, not a wrong result).
    ``skip_dx`` masks dx elements whose x_hat is unrecoverable (ELU outputs saturated at exactly -alpha,
    README "ELU saturation").

    Returns:
        (max |actual - expected| / scale over all tensors, the name of the worst tensor, all close).
    """
    worst, worst_name, ok = 0.0, "-", True
    for name in _COMPARED:
        a, e = actual[name], expected[name]
        if a.shape != e.shape:
            return float("inf"), name, False
        mask = ~skip_dx if (name == "dx" and skip_dx is not None) else None
        if (e.numel() if mask is None else int(mask.sum())) == 0:
            continue
        min_scale = count**0.5 if name in ("dweight", "dbias") else 1.0
        err, close = scaled_error(a, e, tol, min_scale=min_scale, mask=mask)
        ok = ok and close
        if err > worst or worst_name == "-":
            worst, worst_name = err, name
    return worst, worst_name, ok


def _timer(device: str) -> Callable[[Callable[[], None]], float]:
    if device == "cuda":

        def cuda_time(fn: Callable[[], None]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)

        return cuda_time

    def cpu_time(fn: Callable[[], None]) -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return cpu_time


def _time_both(step: _Step, device: str, warmup: int, reps: int) -> tuple[float, float]:
    """Median milliseconds of the fused and the pure step, interleaved round by round."""
    timer = _timer(device)
    samples: dict[str, list[float]] = {"cpp": [], "python": []}
    for i in range(warmup + reps):
        for name in ("cpp", "python"):
            _backend.set_backend(name)
            x = step.fresh_input()
            if device == "cuda":
                torch.cuda.synchronize()
            ms = timer(lambda: step.layer(x))
            if i >= warmup:
                samples[name].append(ms)
    return _stats.median(samples["cpp"]), _stats.median(samples["python"])


def run_checks(device: str = "auto", quick: bool = False) -> list[dict[str, object]]:
    """Compares the fused kernels with the pure-PyTorch path over the shape x dtype x activation grid.

    Args:
        device: ``"cuda"``, ``"cpu"`` or ``"auto"`` (CUDA when a GPU is visible, else CPU).
        quick: Fewer timing repetitions; on the CPU also skips the two largest shapes.

    Returns:
        One dict per case with keys ``shape`` (str), ``dims`` (tuple), ``channels_last``, ``dtype`` (str),
        ``activation``, ``max_rel_err``, ``worst`` (the compared tensor with that error), ``tol`` ((atol,
        rtol)), ``passed`` (bool), ``fused_ms``, ``pure_ms``, ``speedup`` (pure / fused), ``device``,
        ``excluded`` (dx elements left out of the comparison: ELU outputs saturated at exactly -alpha,
        whose x_hat cannot be recovered) and ``error`` (the exception text when a case raised, else None).

    Raises:
        RuntimeError: the extension is not loaded, or it has no kernels for the device (a GPU machine
            with a CPU-only build), or CUDA was requested without a visible GPU.
    """
    device = _resolve_device(device)
    _check_kernels(device)
    if device == "cuda":
        warmup, reps = (3, 10) if quick else (10, 50)
    else:
        warmup, reps = (1, 5) if quick else (3, 20)
    previous = _backend.get_backend()
    rows: list[dict[str, object]] = []
    seed = 0
    try:
        for shape, channels_last in _grid(device, quick):
            for dtype in DTYPES:
                case = _make_case(shape, dtype, seed)
                seed += 1
                for activation, param in ACTIVATIONS:
                    half = dtype in (torch.float16, torch.bfloat16)
                    tol = ELU_HALF_TOL if (activation == "elu" and half) else TOL[dtype]
                    row: dict[str, object] = {
                        "shape": "x".join(map(str, shape)) + (" CL" if channels_last else ""),
                        "dims": tuple(shape),
                        "channels_last": channels_last,
                        "dtype": _DTYPE_NAMES[dtype],
                        "activation": activation,
                        "tol": tol,
                        "device": device,
                        "error": None,
                        "excluded": 0,
                    }
                    try:
                        step = _Step(case, dtype, device, channels_last, activation, param)
                        fused = _with_backend("cpp", lambda: step.run(check_layout=True))
                        pure = _with_backend("python", lambda: step.run(check_layout=False))
                        skip = None
                        if activation == "elu":
                            # exactly saturated outputs (either path): x_hat, hence dx there, is a convention
                            skip = (fused["output"] == -param) | (pure["output"] == -param)
                        count = step.x0.numel() // shape[1]
                        err, worst, ok = _compare(fused, pure, tol, count, skip)
                        row["excluded"] = int(skip.sum().item()) if skip is not None else 0
                        fused_ms, pure_ms = _time_both(step, device, warmup, reps)
                        row.update(max_rel_err=err, worst=worst, passed=ok, fused_ms=fused_ms, pure_ms=pure_ms,
                                   speedup=pure_ms / fused_ms if fused_ms > 0 else float("nan"))  # fmt: skip
                    except Exception as exc:  # noqa: BLE001 - a selftest reports every failure as a row
                        row.update(max_rel_err=float("nan"), worst="-", passed=False, fused_ms=float("nan"),
                                   pure_ms=float("nan"), speedup=float("nan"),
                                   error=f"{type(exc).__name__}: {exc}")  # fmt: skip
                    finally:
                        _backend.set_backend(previous)
                    rows.append(row)
    finally:
        _backend.set_backend(previous)
    return rows


def _fmt_ms(v: object) -> str:
    return "-" if not isinstance(v, float) or v != v else f"{v:.3f}"


def format_table(rows: Sequence[dict[str, object]]) -> str:
    """The rows of :func:`run_checks` as a fixed-width text table (errors listed below it)."""
    header = ("shape", "dtype", "activation", "max rel err", "worst", "result", "fused ms", "pure ms", "speed-up",
              "sat.")  # fmt: skip
    lines = []
    for r in rows:
        err = r["max_rel_err"]
        lines.append((
            str(r["shape"]), str(r["dtype"]), str(r["activation"]),
            "-" if err != err else f"{err:.2e}", str(r["worst"]), "PASS" if r["passed"] else "FAIL",
            _fmt_ms(r["fused_ms"]), _fmt_ms(r["pure_ms"]),
            "-" if r["speedup"] != r["speedup"] else f"x{r['speedup']:.2f}",
            str(r.get("excluded", 0) or ""),
        ))  # fmt: skip
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    errors = [f"  {r['shape']} {r['dtype']} {r['activation']}: {r['error']}" for r in rows if r.get("error")]
    if errors:
        out += ["", "errors:"] + errors
    if any(r.get("excluded") for r in rows):
        out += ["", "sat.: dx elements not compared (ELU output exactly -alpha: x_hat unrecoverable, README)"]
    return "\n".join(out)


def _describe(device: str) -> list[str]:
    cuda = torch.version.cuda or "none (CPU build of torch)"
    lines = [f"inplace_abn selftest: torch {torch.__version__}, CUDA {cuda}, Python {platform.python_version()}"]
    lines.append(f"extension loaded: {_backend.extension_loaded()}"
                 + ("" if _backend.extension_loaded() else f" ({_backend.extension_error()})"))  # fmt: skip
    if torch.cuda.is_available():
        idx = torch.cuda.current_device()
        lines.append(f"GPU: {torch.cuda.get_device_name(idx)} (cuda:{idx}, capability "
                     f"{'.'.join(map(str, torch.cuda.get_device_capability(idx)))})")  # fmt: skip
        lines.append(f"CUDA kernels registered: {_backend.has_kernel('cuda')}")
    if device == "cpu":
        lines.append(f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
                     f"CPU kernels registered: {_backend.has_kernel('cpu')}")  # fmt: skip
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point.

    Args:
        argv: Arguments (default ``sys.argv[1:]``): ``--quick``, ``--device {auto,cuda,cpu}``.

    Returns:
        0 when every case passed; 1 when a case failed or nothing could be checked.
    """
    parser = argparse.ArgumentParser(prog="python -m inplace_abn.selftest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (and on CPU, skip the largest shapes)")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                        help="auto: CUDA when a GPU is visible, else CPU")  # fmt: skip
    args = parser.parse_args(argv)

    device = _resolve_device(args.device)
    for line in _describe(device):
        print(line)
    if device == "cpu":
        if not torch.cuda.is_available():
            print("No CUDA GPU is visible: checking the compiled CPU kernels against the pure-PyTorch path instead.")
        else:
            print("--device cpu: checking the compiled CPU kernels against the pure-PyTorch path (GPU not used).")
    try:
        _check_kernels(device)
    except RuntimeError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        print("selftest: FAILED (nothing compared)")
        return 1
    clock = "CUDA events" if device == "cuda" else "time.perf_counter"
    print(f"device: {device}; fused = backend 'cpp', pure = backend 'python'; timing: median fwd+bwd ms ({clock}), "
          f"{'quick' if args.quick else 'full'} run")  # fmt: skip
    sys.stdout.flush()
    t0 = time.perf_counter()
    rows = run_checks(device, args.quick)
    print(format_table(rows))
    failed = [r for r in rows if not r["passed"]]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} cases passed in {time.perf_counter() - t0:.1f} s"
          + (f"; {len(failed)} FAILED" if failed else ""))  # fmt: skip
    print("selftest: " + ("FAILED" if failed else "OK"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
