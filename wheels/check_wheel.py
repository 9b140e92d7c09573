#!/usr/bin/env python3
"""Gate every built wheel: what it links, where it looks, what it carries, how big it is.

    python wheels/check_wheel.py WHEEL [WHEEL...]

Checks, for the core wheel (pyllama_serve-*) and backend packages (pyllama_serve_<backend>-*):
  - every ELF file needs only libraries that are inside the wheel or on the allowed list
    (the manylinux system libraries; for GPU backend packages also the NVIDIA runtime that
    NVIDIA's PyPI wheels and the driver provide);
  - every RPATH/RUNPATH entry is relative to $ORIGIN (no build-machine paths);
  - every backend module the build is meant to ship is present (the CPU module of each CPU
    level on x86_64 and aarch64 Linux), and the AMX level is absent;
  - llama.cpp's license and ours are inside;
  - the core wheel carries llama-server's web UI, as vendor/fetch.py --ui built it into the
    sdist: pyllama/server/webui/assets.json, every file it lists (gzipped, index.html among
    them) and the bundle's THIRD_PARTY_LICENSES.txt;
  - sizes: compressed and installed, against PyPI's default 100 MB file limit.
Exits 1 with one line per problem. Needs pyelftools for ELF wheels (auditwheel brings it).
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import zipfile
from pathlib import PurePosixPath

PYPI_LIMIT = 100 * 1024 * 1024

# manylinux policy libraries (PEP 600 / auditwheel's policy.json): always on the system.
SYSTEM_LIBS = {
    "libc.so.6", "libm.so.6", "libpthread.so.0", "libdl.so.2", "librt.so.1", "libutil.so.1",
    "libstdc++.so.6", "libgcc_s.so.1", "ld-linux-x86-64.so.2", "ld-linux-aarch64.so.1",
}
# A GPU backend package reaches these through RPATH into NVIDIA's runtime wheels, or the driver.
GPU_LIBS = {
    "cuda": {"libcuda.so.1", "libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13",
             "libcudart.so.12", "libcublas.so.12", "libcublasLt.so.12"},
}
# The CPU levels of a portable build (GGML_CPU_ALL_VARIANTS in ggml/src/CMakeLists.txt at our
# pin), minus sapphirerapids: its AMX kernels crashed on gemma-3 Q4_K_M (see CMakeLists.txt).
CPU_LEVELS = {
    "x86_64": ["x64", "sse42", "sandybridge", "ivybridge", "piledriver", "haswell", "skylakex",
               "cannonlake", "cascadelake", "icelake", "cooperlake", "zen4", "alderlake"],
    "aarch64": ["armv8.0_1", "armv8.2_1", "armv8.2_2", "armv8.2_3", "armv8.6_1", "armv8.6_2",
                "armv9.2_1", "armv9.2_2"],
}
CORE_LIBS = ["libllama.so", "libllama-common.so", "libmtmd.so", "libggml.so", "libggml-base.so"]


def _arch(wheel_name: str) -> str | None:
    for arch in CPU_LEVELS:
        if wheel_name.endswith(f"_{arch}.whl"):
            return arch
    return None


def _elf_info(data: bytes):
    """Return (needed, rpaths) of an ELF image, or None if it is not ELF."""
    if not data.startswith(b"\x7fELF"):
        return None
    from elftools.elf.dynamic import DynamicSection
    from elftools.elf.elffile import ELFFile

    elf = ELFFile(io.BytesIO(data))
    needed, rpaths = [], []
    for section in elf.iter_sections():
        if isinstance(section, DynamicSection):
            for tag in section.iter_tags():
                if tag.entry.d_tag == "DT_NEEDED":
                    needed.append(tag.needed)
                elif tag.entry.d_tag in ("DT_RPATH", "DT_RUNPATH"):
                    rpaths += (tag.rpath if tag.entry.d_tag == "DT_RPATH" else tag.runpath).split(":")
    return needed, rpaths


UI_DIR = "pyllama/server/webui/"


def _check_ui(path: str, names: list[str]) -> list[str]:
    """The web UI in the core wheel: its manifest, every file it lists, its licence file."""
    if UI_DIR + "assets.json" not in names:
        return [f"the web UI ({UI_DIR}assets.json) is missing: build the sdist with "
                "`wheels/build.sh sdist` (vendor/fetch.py --ui-required)"]
    with zipfile.ZipFile(path) as zf:
        manifest = json.loads(zf.read(UI_DIR + "assets.json"))
    listed = [a["name"] for a in manifest.get("assets", [])]
    problems = [f"web UI file {UI_DIR}{n}.gz is missing" for n in listed if f"{UI_DIR}{n}.gz" not in names]
    if "index.html" not in listed:
        problems.append("the web UI has no index.html")
    if UI_DIR + "THIRD_PARTY_LICENSES.txt" not in names:
        problems.append(f"the web UI's licence file ({UI_DIR}THIRD_PARTY_LICENSES.txt) is missing")
    if not problems:
        print(f"{PurePosixPath(path).name}: web UI {len(listed)} files, "
              f"{manifest.get('gzip_bytes', 0) / 1e6:.1f} MB gzipped")
    return problems


def check(path: str) -> list[str]:
    problems: list[str] = []
    name = PurePosixPath(path).name
    dist = name.split("-", 1)[0]
    backend = dist[len("pyllama_serve_"):] if dist.startswith("pyllama_serve_") else None
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        installed = sum(i.file_size for i in infos)
        elves = {}
        for info in infos:
            if info.is_dir():
                continue
            with zf.open(info) as f:
                head = f.read(4)
            if head == b"\x7fELF":
                elves[info.filename] = _elf_info(zf.read(info))
    compressed = os.path.getsize(path)
    basenames = {PurePosixPath(n).name for n in names}
    allowed = set(SYSTEM_LIBS)
    if backend:
        for prefix, libs in GPU_LIBS.items():
            if backend.startswith(prefix):
                allowed |= libs
        # a backend module resolves the core's ggml through RPATH into pyllama/lib
        allowed |= set(CORE_LIBS)
    for member, (needed, rpaths) in sorted(elves.items()):
        for lib in needed:
            if lib not in basenames and lib not in allowed:
                problems.append(f"{member}: needs {lib}, which is neither in the wheel nor allowed")
        for entry in rpaths:
            if entry and not entry.startswith("$ORIGIN"):
                problems.append(f"{member}: RPATH entry {entry!r} is not relative to $ORIGIN")
        if member.endswith(".so") and "/lib/" in member and not rpaths and needed:
            if any(n.startswith("libggml") or n.startswith("libllama") for n in needed):
                problems.append(f"{member}: no RPATH, but needs {', '.join(needed)}")

    def has_license(pattern: str) -> bool:
        return any(re.search(pattern, n) for n in names)

    if not has_license(r"LICENSE\.llama\.cpp$"):
        problems.append("llama.cpp's license (LICENSE.llama.cpp) is missing")
    if not has_license(r"\.dist-info/(licenses/)?LICENSE$"):
        problems.append("pyllama's LICENSE is missing from .dist-info")

    if backend is None:
        for lib in CORE_LIBS:
            if f"pyllama/lib/{lib}" not in names:
                problems.append(f"pyllama/lib/{lib} is missing")
        if not any(re.match(r"pyllama/engine/_core\..*(\.so|\.pyd)$", n) for n in names):
            problems.append("the compiled engine (pyllama/engine/_core.*.so) is missing")
        arch = _arch(name)
        if arch and "linux" in name:
            for level in CPU_LEVELS[arch]:
                if f"pyllama/lib/libggml-cpu-{level}.so" not in names:
                    problems.append(f"CPU module pyllama/lib/libggml-cpu-{level}.so is missing")
            if "pyllama/lib/libggml-cpu-sapphirerapids.so" in names:
                problems.append("the AMX CPU module (sapphirerapids) must not ship")
        elif not any(re.match(r"pyllama/lib/libggml-cpu.*\.so$", n) for n in names):
            problems.append("no CPU backend module (pyllama/lib/libggml-cpu*.so)")
        if any(n.endswith((".pyx", ".cxx")) for n in names):
            problems.append("sources (.pyx/.cxx) are in the wheel")
        problems += _check_ui(path, names)
    else:
        modules = [n for n in names if re.search(r"/lib/libggml-[a-z0-9]+\.so$", n)]
        if not modules:
            problems.append(f"backend package {dist} carries no ggml backend module (lib/libggml-*.so)")
        if "-py3-none-" not in name:
            problems.append(f"backend package {dist} should be tagged py3-none (it has no Python ABI)")
    symlinks = [i.filename for i in infos if (i.external_attr >> 16) & 0o170000 == 0o120000]
    if symlinks:
        problems.append(f"symlinks in the wheel: {', '.join(symlinks)}")

    mib = 1024 * 1024
    cpu = sorted(n.rsplit("libggml-cpu-", 1)[1][:-3] for n in names if "/libggml-cpu-" in n)
    print(f"{name}: {compressed / mib:.1f} MiB compressed, {installed / mib:.1f} MiB installed, "
          f"{len(elves)} ELF files" + (f", CPU levels: {' '.join(cpu)}" if cpu else ""))
    if compressed > PYPI_LIMIT:
        problems.append(f"{compressed / mib:.1f} MiB is over PyPI's default 100 MiB file limit")
    return problems


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    failed = False
    for path in argv:
        for problem in check(path):
            print(f"  FAIL {problem}")
            failed = True
    print("check_wheel: " + ("FAILED" if failed else "ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
