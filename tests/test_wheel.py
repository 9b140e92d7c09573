"""`pip wheel .` gives a wheel that installs into a clean venv and runs with no env vars."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import pyllama.engine as engine
from pyllama.engine import Context, Model, SamplerChain
model = Model({path!r})
ctx = Context(model, n_ctx=64)
out = list(ctx.generate(model.tokenize("Hello"), SamplerChain.greedy(model), max_tokens=4,
                        stop_at_eog=False))
assert len(out) == 4, out
print("ok", engine.__file__)
"""


def test_wheel_installs_and_runs_in_a_clean_venv(tmp_path, synthetic_path):
    dist = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
         "-w", str(dist), "-C", f"build-dir={tmp_path / 'build'}", str(ROOT)],
        capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = dist.glob("pyllama-*.whl")

    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        symlinks = [i.filename for i in zf.infolist() if (i.external_attr >> 16) & 0o170000 == 0o120000]
    assert "pyllama/lib/libllama.so" in names and "pyllama/lib/LICENSE.llama.cpp" in names
    assert "pyllama/lib/libllama-common.so" in names
    assert any(n.startswith("pyllama/engine/_context.") and n.endswith(".so") for n in names)
    assert not [n for n in names if n.endswith((".pyx", ".cxx"))]
    assert not [n for n in names if n.startswith(("include/", "lib/", "bin/"))]  # no upstream installs
    assert not symlinks

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    install = subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps",
                              str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr
    clean_env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    run = subprocess.run([venv / "bin" / "python", "-c", CHECK.format(path=str(synthetic_path))],
                         capture_output=True, text=True, env=clean_env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("ok ") and str(venv) in run.stdout
