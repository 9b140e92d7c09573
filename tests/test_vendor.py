"""vendor/fetch.py: hash check, atomic extraction, the ninja-safe mtimes, the .git drop."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FETCH = ROOT / "vendor" / "fetch.py"


def _load_fetch(patches: Path | None = None):
    """fetch.py as a module; its build-tree patches from `patches` (a folder; None: none, for
    the made-up archives below; fetch.PATCHES for the real ones)."""
    spec = importlib.util.spec_from_file_location("pyllama_vendor_fetch", FETCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.PATCHES = patches if patches is not None else ROOT / "no-such-folder"
    return module


def _make_sdist(path: Path, prefix: str) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in {
            f"{prefix}/CMakeLists.txt": b"project(x)\n",
            f"{prefix}/src/llama.cpp": b"// source\n",
            f"{prefix}/docs/big.md": b"not needed\n",
            f"{prefix}/.git": b"gitdir: ../../.git/modules/vendor/llama.cpp\n",
            "other/file.txt": b"outside the prefix\n",
        }.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 4102444800  # 2100: a future mtime, as ninja hates
            tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pin(sha: str) -> dict:
    return {"package": "llama-cpp-python", "version": "0.0.0", "filename": "x.tar.gz",
            "sha256": sha, "commit": "abc", "prefix": "pkg/vendor/llama.cpp",
            "build": ["CMakeLists.txt", "src"]}


def test_wrong_hash_is_rejected_with_one_line(tmp_path):
    archive = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    archive.write_bytes(b"not the pinned archive")
    dest = tmp_path / "llama.cpp"
    proc = subprocess.run([sys.executable, str(FETCH), "--archive", str(archive), "--dest", str(dest)],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "llama-cpp-python==0.3.36" in lines[0] and "sha256" in lines[0]
    assert "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e" in lines[0]
    assert not dest.exists()


def test_extracts_only_the_build_folders(tmp_path):
    fetch = _load_fetch()
    archive = tmp_path / "x.tar.gz"
    pin = _pin(_make_sdist(archive, "pkg/vendor/llama.cpp"))
    dest = tmp_path / "out" / "llama.cpp"
    fetch.check_hash(archive, pin)
    fetch.extract(archive, pin, dest, pin["build"])
    assert (dest / "CMakeLists.txt").read_bytes() == b"project(x)\n"
    assert (dest / "src" / "llama.cpp").exists()
    assert not (dest / "docs").exists() and not (dest / ".git").exists()
    assert fetch.up_to_date(dest, pin, pin["build"])
    mtime = (dest / "src" / "llama.cpp").stat().st_mtime
    assert mtime < 4102444800  # normalised to now
    assert [p.name for p in dest.parent.iterdir()] == ["llama.cpp"]  # no temp dir left


def test_corrupt_archive_leaves_nothing_behind(tmp_path):
    fetch = _load_fetch()
    good = tmp_path / "good.tar.gz"
    _make_sdist(good, "pkg/vendor/llama.cpp")
    corrupt = tmp_path / "x.tar.gz"
    corrupt.write_bytes(good.read_bytes()[:-40])
    pin = _pin(hashlib.sha256(corrupt.read_bytes()).hexdigest())
    dest = tmp_path / "out" / "llama.cpp"
    with pytest.raises(fetch.FetchError, match="not a readable"):
        fetch.extract(corrupt, pin, dest, pin["build"])
    assert not dest.exists()
    assert list((tmp_path / "out").iterdir()) == []


def test_wrong_prefix_is_an_error(tmp_path):
    fetch = _load_fetch()
    archive = tmp_path / "x.tar.gz"
    pin = _pin(_make_sdist(archive, "elsewhere"))
    with pytest.raises(fetch.FetchError, match="holds nothing"):
        fetch.extract(archive, pin, tmp_path / "llama.cpp", pin["build"])


def test_patches_apply_exactly_or_not_at_all(tmp_path):
    patches = tmp_path / "patches"
    patches.mkdir()
    (patches / "1-fix.patch").write_text(
        "--- a/src/llama.cpp\n+++ b/src/llama.cpp\n@@ -1 +1,2 @@\n // source\n+// patched\n")
    fetch = _load_fetch(patches)
    archive = tmp_path / "x.tar.gz"
    pin = _pin(_make_sdist(archive, "pkg/vendor/llama.cpp"))
    dest = tmp_path / "out" / "llama.cpp"
    fetch.extract(archive, pin, dest, pin["build"], patched=True)
    assert (dest / "src" / "llama.cpp").read_text() == "// source\n// patched\n"
    assert fetch.up_to_date(dest, pin, pin["build"], patched=True)
    assert not fetch.up_to_date(dest, pin, pin["build"])  # an unpatched tree is another tree
    (patches / "1-fix.patch").write_text(
        "--- a/src/llama.cpp\n+++ b/src/llama.cpp\n@@ -1 +1,2 @@\n // source\n+// patched again\n")
    assert not fetch.up_to_date(dest, pin, pin["build"], patched=True)  # a changed patch re-extracts
    (patches / "2-stale.patch").write_text(
        "--- a/src/llama.cpp\n+++ b/src/llama.cpp\n@@ -1 +1 @@\n-// not in the sources\n+// x\n")
    with pytest.raises(fetch.FetchError, match="2-stale.patch does not apply"):
        fetch.extract(archive, pin, dest, pin["build"], patched=True)
    assert (dest / "src" / "llama.cpp").read_text() == "// source\n// patched\n"  # the old tree stays
    # the whole upstream tree (--all: reading, yardstick builds) and the web UI's are never patched
    fetch.extract(archive, pin, tmp_path / "all", None)
    assert (tmp_path / "all" / "src" / "llama.cpp").read_text() == "// source\n"
    fetch.extract(archive, pin, tmp_path / "ui", ["CMakeLists.txt"])  # build_ui: no src/ at all
    assert fetch.up_to_date(tmp_path / "ui", pin, ["CMakeLists.txt"])


def test_the_real_pin_is_extracted_here():
    fetch = _load_fetch(ROOT / "patches")
    pin = fetch.load_pin()
    dest = ROOT / "vendor" / "llama.cpp"
    assert fetch.up_to_date(dest, pin, list(pin["build"]), patched=True)
    assert (dest / "include" / "llama.h").exists()
    assert (dest / "tools" / "server" / "README.md").exists()
    assert not (dest / ".git").exists()
    assert "common_chat_template_analysis" in (dest / "common" / "chat.cpp").read_text()  # patched


def test_no_upstream_source_is_tracked():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    files = tracked.stdout.splitlines()
    assert not [f for f in files if f.startswith("vendor/llama.cpp/")]
    assert not [f for f in files if f.endswith((".gguf", ".safetensors"))]


def test_pin_is_read_without_tomllib():
    # Python 3.10 (supported) has no tomllib: the fallback reader must give the same table.
    fetch = _load_fetch()
    text = (ROOT / "vendor" / "pin.toml").read_text()
    assert fetch._parse_pin(text) == fetch.load_pin()
    assert fetch._parse_pin('[t]\nname = "a" # note\nlist = [\n  "x",  # one\n  "y",\n]\n') == \
        {"name": "a", "list": ["x", "y"]}


def test_inside_an_isolated_build_the_sdist_comes_from_the_index(tmp_path):
    """`pip install <clone>` runs fetch.py inside pip's build isolation: pip itself may be
    unreachable there, so the pinned file is taken from the index's simple page with urllib."""
    import http.server
    import threading

    archive_bytes = (tmp_path / "src.tar.gz")
    sha = _make_sdist(archive_bytes, "pkg/vendor/llama.cpp")
    root = tmp_path / "index"
    (root / "simple" / "llama-cpp-python").mkdir(parents=True)
    (root / "files").mkdir()
    (root / "files" / "x.tar.gz").write_bytes(archive_bytes.read_bytes())
    (root / "simple" / "llama-cpp-python" / "index.html").write_text(
        '<html><body><a href="../../files/x.tar.gz#sha256=%s">x.tar.gz</a></body></html>' % sha)

    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(root))  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        dest = tmp_path / "llama.cpp"
        code = (f"import sys, json; sys.argv[0] = {str(FETCH)!r}; "
                f"import importlib.util as u; s = u.spec_from_file_location('f', {str(FETCH)!r}); "
                "m = u.module_from_spec(s); s.loader.exec_module(m); m.PATCHES = m.HERE / 'no-such-folder'; "
                f"pin = {_pin(sha)!r}; p = m.download(pin); m.check_hash(p, pin); "
                f"m.extract(p, pin, __import__('pathlib').Path({str(dest)!r}), pin['build']); print(p)")
        env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache"),
               "PIP_INDEX_URL": f"http://127.0.0.1:{httpd.server_port}/simple",
               # as pip's build isolation: no site-packages (so no pip) and no config
               "PYTHONNOUSERSITE": "1", "PIP_CONFIG_FILE": "/dev/null", "PIP_NO_INDEX": "0"}
        out = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True,
                             env=env, timeout=300)
        assert out.returncode == 0, out.stderr
        assert (dest / "src" / "llama.cpp").read_bytes() == b"// source\n"
        assert out.stdout.strip().startswith(str(tmp_path / "cache"))
    finally:
        httpd.shutdown()
