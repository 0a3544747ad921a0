#!/usr/bin/env bash
# Builds the package against the CUDA build of torch with the machine's nvcc (no GPU needed), for
# sm_80 and sm_90, then imports it on this GPU-less machine and checks that every custom op has a CUDA
# kernel registered. CI verifies build, link and registration -- NOT execution (no GPU here). The same
# environment runs the conversion tests that need torchvision and timm.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
command -v nvcc >/dev/null || { echo "CI: nvcc not found, cannot build the CUDA extension"; exit 1; }

python -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet "torch==2.14.1" numpy ninja pytest "setuptools>=77"
"$work/venv/bin/python" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

git -C "$root" ls-files -z | (cd "$root" && xargs -0 tar -cf -) | tar -xf - -C "$work" --one-top-level=tree
cd "$work/tree"
FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="8.0;9.0" MAX_JOBS=2 INPLACE_ABN_REQUIRE_EXTENSION=1 \
    "$work/venv/bin/pip" install --no-build-isolation --no-deps -v . > "$work/build.log" 2>&1 || {
    tail -80 "$work/build.log"
    echo "CI: the CUDA build failed"
    exit 1
}
sed -n '/inplace_abn build configuration/,/nvcc flags/p' "$work/build.log" | tail -12
grep -o "gencode=arch=compute_[0-9]*,code=sm_[0-9]*" "$work/build.log" | sort -u
if grep -E "warning" "$work/build.log" | grep -E "src/(cuda|cpu)/|src/[a-z_]+\.(h|cpp)"; then
    echo "CI: our sources compile with warnings in the CUDA build (see above)"
    exit 1
fi

cd "$work"
"$work/venv/bin/python" - <<'PY'
import torch

import inplace_abn

assert inplace_abn.get_backend() == "cpp", inplace_abn.get_backend()
ops = ["statistics", "absmax", "forward_", "backward_reduce", "backward", "invert", "forward_train_", "backward_train"]
for key in ("CPU", "CUDA"):
    missing = [op for op in ops if not getattr(torch.ops.inplace_abn, op).default.has_kernel_for_dispatch_key(key)]
    assert not missing, f"no {key} kernel registered for {missing}"
print(f"CUDA build OK: {len(ops)} ops with CPU and CUDA kernels; GPU visible: {torch.cuda.is_available()}")
PY
# The CPU kernels of this build (CUDA torch) pass the op contract and the self-check too.
"$work/venv/bin/python" -m inplace_abn.selftest --quick
# torchvision pairs with this torch (not with the CPU 2.13 build): the model-conversion tests on
# torchvision's resnet50 / deeplabv3_resnet50 and a timm model run here.
"$work/venv/bin/pip" install --quiet "torchvision==0.29.1" timm
# Run from $work (not the source tree) so that `import inplace_abn` is the installed, compiled package.
# README "Supported versions": the op contract, equivalence (gradcheck included), residual, compile and
# module tests on this torch too, on the CPU kernels of this build.
INPLACE_ABN_BACKEND=cpp "$work/venv/bin/python" -m pytest -q -p no:cacheprovider -rs \
    tree/tests/test_ops.py tree/tests/test_cuda.py tree/tests/test_convert.py tree/tests/test_convert_residual.py \
    tree/tests/test_memory_report_torchvision.py \
    tree/tests/test_equivalence.py tree/tests/test_residual.py tree/tests/test_compile.py tree/tests/test_modules.py \
    tree/tests/test_residual_torchvision.py tree/tests/test_max_pool.py
# The residual-fusion comparison on torchvision's resnet50 at reduced size (64x64, eager variants and
# checkpointing; the compiled variants take minutes per model on CI's CPUs): memory per sample, time,
# gradients against float64.
"$work/venv/bin/python" tree/benchmarks/bench_residual.py models --quick --models resnet50 \
    --variants "bn eager" "bn checkpoint" "iabn eager" --out "$work/bench_residual_models.csv"
