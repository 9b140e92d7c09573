"""The release pipeline's configuration, checked without building anything.

[tool.cibuildwheel] in pyproject.toml and .github/workflows/wheels.yml can only really run on
GitHub's runners (the Linux builds need a container engine), so this checks what can be checked
here: the exact wheels cibuildwheel would build per platform, the CUDA job's single wheel, that
the workflow passes the GitHub Actions schema (and actionlint, where one is on PATH), and that the
jobs are wired as the release needs: sdist first, every core wheel from that sdist, one upload of
everything on a v* tag.

Needs cibuildwheel (the version the workflow pins) and check-jsonschema (which brings jsonschema
and ruamel.yaml).
"""

from __future__ import annotations

import fnmatch
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import cibuildwheel
import jsonschema
import pytest
from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
WORKFLOW = ROOT / ".github" / "workflows" / "wheels.yml"
PYTHONS = ["cp310", "cp311", "cp312", "cp313", "cp314"]
# Reached through RPATH (NVIDIA's runtime wheels, the core wheel's ggml) or from the driver.
CUDA_EXCLUDES = [
    "libcuda.so.1", "libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13", "libggml-base.so",
]


def _identifiers(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> list[str]:
    """Return what `cibuildwheel --print-build-identifiers ARGS` prints, one id a line."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CIBW_")}
    proc = subprocess.run(
        [sys.executable, "-m", "cibuildwheel", "--print-build-identifiers", *args],
        cwd=cwd,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.split()


def _workflow() -> dict:
    # YAML 1.2 (ruamel), so the `on:` key stays a string rather than becoming True.
    return YAML(typ="safe").load(WORKFLOW.read_text())


def _steps(job: dict, uses: str) -> list[dict]:
    return [s for s in job["steps"] if s.get("uses", "").split("@")[0] == uses]


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_linux_wheels(arch):
    got = _identifiers("--platform", "linux", "--archs", arch)
    assert got == [f"{py}-manylinux_{arch}" for py in PYTHONS]


def test_linux_builds_only_the_runners_own_architecture():
    arch = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}.get(
        platform.machine().lower()
    )
    if arch is None:
        pytest.skip(f"no Linux wheels are built on {platform.machine()}")
    assert _identifiers("--platform", "linux") == [f"{py}-manylinux_{arch}" for py in PYTHONS]


def test_macos_wheels():
    want = [f"{py}-macosx_arm64" for py in PYTHONS]
    assert _identifiers("--platform", "macos", "--archs", "arm64") == want
    assert _identifiers("--platform", "macos") == want  # the config's archs: arm64 only


def test_the_sdist_carries_the_same_selection(tmp_path):
    # The workflow hands cibuildwheel the sdist, which reads the pyproject.toml inside it.
    sdist = tmp_path / "pyllama_serve-0.1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(PYPROJECT, arcname="pyllama_serve-0.1.0/pyproject.toml")
    got = _identifiers("--platform", "linux", "--archs", "x86_64", str(sdist), cwd=tmp_path)
    assert got == [f"{py}-manylinux_x86_64" for py in PYTHONS]


def test_cibuildwheel_table_matches_its_schema():
    config = tomllib.loads(PYPROJECT.read_text())["tool"]["cibuildwheel"]
    schema_file = Path(cibuildwheel.__file__).parent / "resources" / "cibuildwheel.schema.json"
    jsonschema.validate(config, json.loads(schema_file.read_text()))


def test_macos_builds_metal_for_the_baseline_cpu():
    macos = tomllib.loads(PYPROJECT.read_text())["tool"]["cibuildwheel"]["macos"]
    defines = {
        k.removeprefix("cmake.define."): v
        for k, v in macos["config-settings"].items()
        if k.startswith("cmake.define.")
    }
    assert defines == {
        "GGML_NATIVE": "OFF",
        "GGML_BACKEND_DL": "ON",
        "GGML_CPU_ALL_VARIANTS": "OFF",
        "GGML_METAL": "ON",
        "GGML_METAL_EMBED_LIBRARY": "ON",
    }
    assert macos["environment"]["MACOSX_DEPLOYMENT_TARGET"] == "14.0"


def test_workflow_matches_the_github_actions_schema(tmp_path):
    def check(path: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "check_jsonschema", "--builtin-schema",
             "vendor.github-workflows", str(path)],
            capture_output=True, text=True, timeout=120,
        )

    proc = check(WORKFLOW)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The check can fail: a job without runs-on is rejected.
    broken = tmp_path / "broken.yml"
    broken.write_text(WORKFLOW.read_text().replace("    runs-on: ubuntu-24.04\n", "", 1))
    assert check(broken).returncode != 0


def test_workflow_passes_actionlint():
    actionlint = shutil.which("actionlint")
    if actionlint is None:
        pytest.skip("actionlint is not on PATH")
    proc = subprocess.run(
        [actionlint, str(WORKFLOW)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_workflow_triggers():
    on = _workflow()["on"]
    assert on["push"] == {"tags": ["v*"]}
    assert "workflow_dispatch" in on
    assert {"wheels/**", "pyproject.toml", "CMakeLists.txt", "vendor/**", "patches/**"} <= set(
        on["pull_request"]["paths"]
    )


def test_workflow_pins_the_tested_cibuildwheel():
    pins = {
        s["uses"]
        for job in _workflow()["jobs"].values()
        for s in _steps(job, "pypa/cibuildwheel")
    }
    assert pins == {f"pypa/cibuildwheel@v{cibuildwheel.__version__}"}


def test_core_wheels_are_built_from_the_sdist():
    jobs = _workflow()["jobs"]
    runs = [s["run"] for s in jobs["sdist"]["steps"] if "run" in s]
    assert runs == ["bash wheels/build.sh sdist"]
    (upload,) = _steps(jobs["sdist"], "actions/upload-artifact")
    sdist_artifact = upload["with"]["name"]
    assert upload["with"]["path"] == "dist/*.tar.gz"

    wheels = jobs["wheels"]
    assert wheels["needs"] == "sdist"
    assert not _steps(wheels, "actions/checkout"), "the sdist must be the only input"
    (download,) = _steps(wheels, "actions/download-artifact")
    assert download["with"]["name"] == sdist_artifact
    (build,) = _steps(wheels, "pypa/cibuildwheel")
    assert build["with"]["package-dir"] == "${{ steps.sdist.outputs.path }}"
    include = wheels["strategy"]["matrix"]["include"]
    matrix = {(m["platform"], m["arch"], m["runner"]) for m in include}
    assert matrix == {
        ("linux", "x86_64", "ubuntu-24.04"),
        ("linux", "aarch64", "ubuntu-24.04-arm"),
        ("macos", "arm64", "macos-14"),
    }


def test_cuda_job_builds_one_wheel(tmp_path):
    job = _workflow()["jobs"]["cuda13"]
    (build,) = _steps(job, "pypa/cibuildwheel")
    assert build["with"]["package-dir"] == "wheels/cuda13"
    env = {k: str(v) for k, v in build["env"].items()}
    assert env["CIBW_BUILD"] == "cp312-manylinux_x86_64"
    assert env["CIBW_MANYLINUX_X86_64_IMAGE"] == "manylinux_2_28"
    assert "cuda-rhel8.repo" in env["CIBW_BEFORE_ALL"]
    for package in ("cuda-nvcc-13-0", "cuda-cudart-devel-13-0", "libcublas-devel-13-0"):
        assert package in env["CIBW_BEFORE_ALL"].split()
    assert '"-DCMAKE_CUDA_ARCHITECTURES=80-real;86-real;89-real;90-real"' in env["CIBW_ENVIRONMENT"]
    repair, check = env["CIBW_REPAIR_WHEEL_COMMAND"].split(" && ")
    repair = repair.split()
    assert repair[:2] == ["auditwheel", "repair"]
    assert [repair[i + 1] for i, a in enumerate(repair) if a == "--exclude"] == CUDA_EXCLUDES
    assert check == "bash {project}/wheels/build.sh check {dest_dir}/*.whl"

    # With the job's environment cibuildwheel picks exactly one build, whatever the package's
    # own [tool.cibuildwheel] table says (a stand-in package until wheels/cuda13 exists).
    package = ROOT / "wheels" / "cuda13"
    cwd = ROOT
    if not (package / "pyproject.toml").is_file():
        cwd, package = tmp_path, tmp_path / "cuda13"
        package.mkdir()
        (package / "pyproject.toml").write_text('[project]\nname = "stand-in"\nversion = "0"\n')
    build_env = {k: v for k, v in env.items() if k in ("CIBW_PLATFORM", "CIBW_ARCHS", "CIBW_BUILD")}
    assert _identifiers(str(package.relative_to(cwd)), cwd=cwd, env=build_env) == [
        "cp312-manylinux_x86_64"
    ]


def test_publish_uploads_everything_on_tags_only():
    jobs = _workflow()["jobs"]
    publish = jobs["publish"]
    assert set(publish["needs"]) == {"sdist", "wheels", "cuda13"}
    assert publish["if"] == "github.event_name == 'push' && startsWith(github.ref, 'refs/tags/v')"
    assert publish["permissions"] == {"id-token": "write"}
    assert _steps(publish, "pypa/gh-action-pypi-publish")
    (download,) = _steps(publish, "actions/download-artifact")
    assert download["with"]["merge-multiple"] is True
    pattern = download["with"]["pattern"]
    uploads = {
        job_name: s["with"]
        for job_name, job in jobs.items()
        for s in _steps(job, "actions/upload-artifact")
    }
    assert set(uploads) == {"sdist", "wheels", "cuda13"}
    for job_name, upload in uploads.items():
        assert fnmatch.fnmatch(upload["name"], pattern), (job_name, upload["name"], pattern)
    # Wheels only from the wheel jobs: the one sdist is pyllama-serve's, none for the CUDA package.
    assert uploads["sdist"]["path"] == "dist/*.tar.gz"
    assert uploads["wheels"]["path"] == uploads["cuda13"]["path"] == "wheelhouse/*.whl"
