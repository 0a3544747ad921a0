"""The missing-extension message: a source tree without ``_C`` that shadows a built copy is named as such."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Imports the package from the current directory. An editable install's import hook would resolve
# inplace_abn._C to the developer's build whatever the package's folder, so it is taken out first. A real
# built copy on sys.path (an install in site-packages) is hidden too: its folder is replaced by a mirror
# of its other entries (torch among them), so that the only copies left are the ones the test lays out.
_IMPORT = """
import glob, os, sys, tempfile, warnings
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in str(getattr(f, "__module__", ""))]
for i, entry in enumerate(sys.path):
    if entry not in ("", os.getcwd(), os.environ.get("PYTHONPATH")) and glob.glob(os.path.join(entry, "inplace_abn", "_C*")):
        sys.path[i] = tempfile.mkdtemp(dir=os.path.dirname(os.getcwd()))
        for name in os.listdir(entry):
            if name != "inplace_abn":
                os.symlink(os.path.join(entry, name), os.path.join(sys.path[i], name))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import inplace_abn
print(inplace_abn.get_backend())
print(inplace_abn._backend.shadowed_build())
for w in caught:
    if "inplace_abn" in str(w.message):
        print("WARNING", w.message)
"""


def _source_tree_without_extension(root: Path) -> Path:
    """A copy of the package's Python files (no _C) in ``root``/src, as a fresh checkout has."""
    package = root / "src" / "inplace_abn"
    package.mkdir(parents=True)
    for path in (REPO / "inplace_abn").rglob("*.py"):  # subpackages too (inplace_abn.memory_report)
        target = package / path.relative_to(REPO / "inplace_abn")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    return package.parent


def _run(cwd: Path, site: Path | None, backend: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("INPLACE_ABN_BACKEND", "PYTHONPATH")}
    if site is not None:
        env["PYTHONPATH"] = str(site)
    if backend is not None:
        env["INPLACE_ABN_BACKEND"] = backend
    return subprocess.run(
        [sys.executable, "-c", _IMPORT], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def _built_copy(root: Path) -> Path:
    """A stand-in for an installed build: only the name of its _C file is looked at."""
    package = root / "site" / "inplace_abn"
    package.mkdir(parents=True)
    (package / "_C.abi3.so").write_bytes(b"")
    return package.parent


def test_source_tree_shadowing_a_built_copy_is_named(tmp_path):
    src, site = _source_tree_without_extension(tmp_path), _built_copy(tmp_path)
    out = _run(src, site)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "python"
    assert lines[1] == str(site / "inplace_abn")
    warning = [line for line in lines if line.startswith("WARNING")]
    assert len(warning) == 1, lines
    assert (
        f"source tree {src / 'inplace_abn'}" in warning[0]
        and f"shadows the built copy in {site / 'inplace_abn'}" in warning[0]
    ), warning[0]
    assert "pip install --no-build-isolation -e ." in warning[0]


def test_backend_cpp_names_the_shadowed_copy_in_its_import_error(tmp_path):
    src, site = _source_tree_without_extension(tmp_path), _built_copy(tmp_path)
    out = _run(src, site, backend="cpp")
    assert out.returncode != 0
    assert "INPLACE_ABN_BACKEND=cpp" in out.stderr and f"shadows the built copy in {site / 'inplace_abn'}" in out.stderr


def test_without_a_built_copy_the_advice_is_to_rebuild(tmp_path):
    src = _source_tree_without_extension(tmp_path)
    out = _run(src, None)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:2] == ["python", "None"]
    warning = [line for line in lines if line.startswith("WARNING")]
    assert len(warning) == 1 and "Rebuild with `pip install --no-build-isolation .`" in warning[0], lines
    assert "shadows" not in warning[0]


def test_no_shadowing_reported_when_the_extension_loaded():
    import inplace_abn

    if not inplace_abn.extension_loaded():
        pytest.skip("the compiled extension is not loaded here")
    assert inplace_abn._backend.shadowed_build() is None
