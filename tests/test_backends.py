"""ggml backends as loadable modules: discovery, CPU levels, devices, --list-devices, -dev."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import pyllama
from pyllama import engine
from pyllama.engine._model import BACKEND_DL, LIB_DIR
from pyllama.errors import InvalidRequestError

BIN = Path(sys.executable).parent
LIB = Path(LIB_DIR)
CPU_LEVELS = sorted(p.name[len("libggml-cpu-"):-3] for p in LIB.glob("libggml-cpu-*.so"))
# GGML_BACKEND_DL builds (the wheel) load backend modules from pyllama/lib; make's native build
# links its one CPU backend into libggml.
MODULES = sorted(LIB.glob("libggml-cpu*.so")) if BACKEND_DL else []
needs_modules = pytest.mark.skipif(not MODULES, reason="a native build links its CPU backend in")


def _python(code: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-P", "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=300, **kwargs)


def test_the_cpu_backend_comes_from_pyllamas_lib_folder_or_is_built_in(tmp_path):
    devices = engine.list_devices()
    cpu = [d for d in devices if d["type"] == "cpu"]
    assert cpu and cpu[0]["name"] == "CPU" and cpu[0]["backend"] == "CPU"
    forced = os.environ.get("PYLLAMA_CPU_VARIANT")  # a run of the suite on a lower CPU level
    expected = (("pyllama", str(LIB / f"libggml-cpu-{forced}.so")) if forced else
                ("pyllama" if MODULES else "built-in", "CPU"))
    assert expected in engine.list_backends()
    # upstream's ggml_backend_load_all() also searches the current directory: pyllama must
    # load only its own folder's modules, whatever lies where the process runs
    if MODULES:
        shutil.copy(MODULES[0], tmp_path / "libggml-blas.so")
    out = _python("from pyllama import engine; print(engine.list_backends())", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == repr(engine.list_backends())


def test_list_devices_prints_upstreams_text_and_needs_no_model(tmp_path):
    out = subprocess.run([str(BIN / "pyllama-server"), "--list-devices"], capture_output=True,
                         text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    gpus = [d for d in engine.list_devices() if d["type"] != "cpu"]
    expected = "Available devices:\n" + ("".join(
        f"  {d['name']}: {d['description']} ({d['memory_total'] // 2**20} MiB, "
        f"{d['memory_free'] // 2**20} MiB free)\n" for d in gpus) if gpus else "  (none)\n")
    assert out.stdout == expected == engine.format_device_list()


def test_device_list_is_checked_as_upstream(synthetic_path):
    with pytest.raises(InvalidRequestError, match="invalid device: NOPE"):
        engine.Model(synthetic_path, devices=["NOPE"])
    with pytest.raises(InvalidRequestError, match="invalid device: CPU"):  # upstream refuses it too
        engine.Model(synthetic_path, devices=["CPU"])
    model = engine.Model(synthetic_path, devices=["none"])  # no offload at all
    assert model.tokenize("Hello")
    model.close()


def test_server_refuses_an_unknown_device_and_serves_with_none(synthetic_path):
    from server.conftest import ServerProcess

    bad = ServerProcess(["-m", str(synthetic_path), "-c", "256", "-dev", "NOPE"])
    assert bad.proc.wait(120) != 0
    assert "invalid device: NOPE" in bad.proc.stdout.read().decode(errors="replace")
    good = ServerProcess(["-m", str(synthetic_path), "-c", "256", "-np", "1", "-dev", "none"])
    try:
        good.wait_ready()
    finally:
        good.stop()


def test_llama_server_console_script_is_the_same_entry_point():
    out = subprocess.run([str(BIN / "llama-server"), "--version"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0
    assert out.stdout == subprocess.run([str(BIN / "pyllama-server"), "--version"],
                                        capture_output=True, text=True, timeout=120).stdout


def test_an_unknown_cpu_level_is_refused_by_name():
    out = _python("import pyllama.engine", env={"PYLLAMA_CPU_VARIANT": "nosuchcpu"})
    assert out.returncode != 0
    assert "PYLLAMA_CPU_VARIANT=nosuchcpu" in out.stderr
    assert (", ".join(CPU_LEVELS) if CPU_LEVELS else "a native build") in out.stderr


@pytest.mark.skipif(not CPU_LEVELS, reason="a native build has one CPU module, no levels")
def test_a_lower_cpu_level_can_be_forced_and_still_generates(synthetic_path):
    baseline = "x64" if sys.platform.startswith("linux") and "x64" in CPU_LEVELS else CPU_LEVELS[0]
    code = f"""
        from pyllama import engine
        print(engine.list_backends())
        print(engine.system_info())
        m = engine.Model({str(synthetic_path)!r})
        c = engine.Context(m, n_ctx=64)
        print(list(c.generate(m.tokenize("Hello"), engine.SamplerChain.greedy(m), max_tokens=6,
                              stop_at_eog=False)))
    """
    forced = _python(code, env={"PYLLAMA_CPU_VARIANT": baseline})
    assert forced.returncode == 0, forced.stderr
    backends, info, tokens = forced.stdout.splitlines()[:3]
    assert f"libggml-cpu-{baseline}.so" in backends
    if baseline == "x64":  # the lowest x86-64 level has no AVX at all
        assert "AVX2 = 1" not in info and "AVX = 1" not in info
    best = _python(code)
    assert best.returncode == 0, best.stderr
    assert best.stdout.splitlines()[2] == tokens  # F32 model: the same greedy tokens on every level


def _fake_backend_package(root: Path, name: str, version: str) -> Path:
    """A backend package as pyllama-serve-cuda13 is built, carrying a copy of a real module."""
    package = root / f"pyllama_{name}"
    (package / "lib").mkdir(parents=True)
    (package / "__init__.py").write_text(f'__version__ = "{version}"\n')
    # the baseline level loads on any CPU of its architecture (a higher one may be refused)
    module = next((m for m in MODULES if m.name in ("libggml-cpu-x64.so", "libggml-cpu-armv8.0_1.so")),
                  MODULES[0])
    shutil.copy(module, package / "lib" / module.name)
    dist = root / f"pyllama_serve_{name}-{version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: pyllama-serve-{name}\nVersion: {version}\n")
    (dist / "entry_points.txt").write_text(f"[pyllama.backends]\n{name} = pyllama_{name}\n")
    return package / "lib" / module.name


@needs_modules
def test_backend_packages_are_found_through_entry_points(tmp_path):
    module = _fake_backend_package(tmp_path, "testbackend", pyllama.__version__)
    out = _python("from pyllama import engine; print(engine.list_backends())",
                  env={"PYTHONPATH": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert repr(("testbackend", str(module))) in out.stdout


@needs_modules
def test_a_backend_package_of_another_version_is_not_loaded(tmp_path):
    _fake_backend_package(tmp_path, "stale", "0.0.1")
    out = _python("import logging; logging.basicConfig()\n"
                  "from pyllama import engine; print(engine.list_backends())",
                  env={"PYTHONPATH": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert "stale" not in out.stdout
    assert f"backend package stale is version 0.0.1 but pyllama is {pyllama.__version__}" in out.stderr


def test_the_core_and_its_backend_packages_carry_one_version():
    import tomllib

    root = Path(__file__).resolve().parents[1]
    core = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert core["version"] == pyllama.__version__
    extras = core["optional-dependencies"]
    for folder in sorted((root / "wheels").glob("cuda*")):
        package = tomllib.loads((folder / "pyproject.toml").read_text())["project"]
        assert package["version"] == pyllama.__version__, folder
        assert f"pyllama-serve=={pyllama.__version__}" in package["dependencies"], folder
        init = (folder / f"pyllama_{folder.name}" / "__init__.py").read_text()
        assert f'__version__ = "{pyllama.__version__}"' in init, folder
        assert package["entry-points"]["pyllama.backends"] == {folder.name: f"pyllama_{folder.name}"}
        assert any(d.startswith(f"{package['name']}=={pyllama.__version__}") for d in extras[folder.name])
