#!/usr/bin/env bash
# Installs the package into a fresh venv with a compiler that always fails, then checks that it imports,
# warns exactly once that it runs on the pure-PyTorch path, and computes a correct layer.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet "torch==2.13.0" numpy "setuptools>=77"
git -C "$root" ls-files -z | (cd "$root" && xargs -0 tar -cf -) | tar -xf - -C "$work" --one-top-level=tree
(cd "$work/tree" && CC=/bin/false CXX=/bin/false "$work/venv/bin/pip" install -v --no-build-isolation --no-deps . \
    > "$work/install.log" 2>&1)
# The fallback must come from the compiler failing (not from, say, a source tree without sources).
grep -q "building the C++ extension failed (Command '\['/bin/false'" "$work/install.log" || {
    tail -40 "$work/install.log"
    echo "CI: the no-compiler install did not fail where expected"
    exit 1
}
cd "$work"
"$work/venv/bin/python" - <<'PY'
import warnings

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import inplace_abn
ours = [w for w in caught if "inplace_abn" in str(w.message)]
assert len(ours) == 1, [str(w.message) for w in ours]
assert "pure-PyTorch" in str(ours[0].message), ours[0].message
assert inplace_abn.get_backend() == "python"
import torch

x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
ref = inplace_abn.reference.batch_norm_act(x, torch.ones(3), torch.zeros(3), None, None)
out = inplace_abn.InPlaceABN(3).double()(x.clone())
torch.testing.assert_close(out, ref)
print("fallback install OK:", ours[0].message)
PY
