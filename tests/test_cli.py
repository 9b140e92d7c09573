"""The `pyllama` console script, run as a real process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def _pyllama(*args: str) -> subprocess.CompletedProcess:
    # -P: the installed pyllama (a wheel, in CI), not the source folder the tests run from
    return subprocess.run([sys.executable, "-P", "-m", "pyllama", *args], capture_output=True,
                          text=True, timeout=300)


def test_generate_default_model_greedy():
    proc = _pyllama("generate", "-p", "The three primary colors are", "-n", "16", "--temp", "0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("The three primary colors are")
    continuation = proc.stdout[len("The three primary colors are"):]
    assert continuation.strip()  # the text itself depends on the CPU's kernels: not asserted
    again = _pyllama("generate", "-p", "The three primary colors are", "-n", "16", "--temp", "0", "--no-echo")
    assert again.returncode == 0, again.stderr
    assert again.stdout == continuation  # greedy: the same run, without the prompt


def test_generate_with_a_model_file_and_seed(synthetic_path):
    args = ("generate", "-m", str(synthetic_path), "-p", "Hello", "-n", "8", "-s", "3", "--no-echo")
    first, second = _pyllama(*args), _pyllama(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.strip()


def test_missing_model_is_a_clean_error(tmp_path):
    proc = _pyllama("generate", "-m", str(tmp_path / "missing.gguf"), "-p", "x")
    assert proc.returncode == 1
    assert "model file not found" in proc.stderr and "Traceback" not in proc.stderr


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "pyllama"  # installed next to this interpreter
    proc = subprocess.run([str(script), "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("pyllama ")
