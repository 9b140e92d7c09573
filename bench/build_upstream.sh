#!/usr/bin/env bash
# Build upstream llama.cpp's yardstick tools (llama-server, llama-batched-bench, llama-bench,
# llama-quantize, ggml-rpc-server) from the vendored pin, for the benchmarks in bench/. Nothing of it is committed.
#
#   bench/build_upstream.sh [--cuda | --dl] [SRC_DIR] [BUILD_DIR]
#
# SRC_DIR (default ../upstream-llama.cpp) and BUILD_DIR (default ../upstream-build) are relative
# to the repository root; the tools land in BUILD_DIR/bin. A SRC_DIR without CMakeLists.txt is
# filled first with `vendor/fetch.py --all` (the whole upstream tree of the pin: tools/ too).
#
#   (none)  a native build for this machine (GGML_NATIVE), CPU backend linked in
#   --cuda  the same with the CUDA backend linked in, for sm_90 (H100/H200) only
#   --dl    a portable build that shares pyllama's ggml backend modules (bench/gpu_bench.sh):
#           GGML_BACKEND_DL=ON, GGML_NATIVE=OFF, GGML_CUDA=OFF, unversioned SONAMEs
#           (CMAKE_PLATFORM_NO_VERSIONED_SONAME: libggml-base.so is the name pyllama's modules,
#           libggml-cuda.so of pyllama-serve-cuda13 included, NEED) and $ORIGIN RUNPATHs, so that
#           BUILD_DIR/bin moves as one folder. The tools call ggml_backend_load_all(), which
#           loads libggml-<backend>[-<variant>].so from the executable's folder (then the
#           current one): drop pyllama's modules into bin/ and both use the same binaries.
#           UPSTREAM_CPU picks the CPU backend: none (default: no CPU module of its own, copy
#           pyllama's libggml-cpu-*.so into bin/), all (GGML_CPU_ALL_VARIANTS, one module per CPU
#           level, as pyllama's wheel; AMX's sapphirerapids left out as there) or one (a single
#           portable libggml-cpu.so).
# Environment: JOBS (default: all cores), CCACHE=0 to build without ccache (used by default where
# installed); compiles run under `nice -n ${NICE:-10}`.
set -euo pipefail

cd "$(dirname "$0")/.."
mode=native
case "${1:-}" in
    --cuda) mode=cuda; shift ;;
    --dl) mode=dl; shift ;;
esac
src=${1:-../upstream-llama.cpp}
build=${2:-../upstream-build}
jobs=${JOBS:-$(nproc)}
cpu=${UPSTREAM_CPU:-none}
targets=(llama-server llama-batched-bench llama-bench llama-quantize ggml-rpc-server)

stamp_sha() {  # the pinned sdist's sha256 recorded by vendor/fetch.py in $1
    python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["sha256"])' "$1"
}

if [[ ! -f "$src/CMakeLists.txt" ]]; then
    python3 vendor/fetch.py --all --dest "$src"
fi
if [[ -f vendor/llama.cpp/.pyllama-pin.json && -f "$src/.pyllama-pin.json" &&
      "$(stamp_sha vendor/llama.cpp/.pyllama-pin.json)" != "$(stamp_sha "$src/.pyllama-pin.json")" ]]; then
    # NOTE: the yardstick must be the pin pyllama is built from, or the comparison is off.
    echo "build_upstream: $src and vendor/llama.cpp come from different pins;" \
         "extract it again: rm -rf $src && python3 vendor/fetch.py --all --dest $src" >&2
    exit 1
fi

args=(-G Ninja -DCMAKE_BUILD_TYPE=Release
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF
      # no Web UI assets: they would be downloaded at build time
      -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF
      # rpc-server and --rpc, as pyllama's builds (bench/rpc_bench.py)
      -DGGML_RPC=ON)
if grep -q 'option(LLAMA_CURL' "$src/CMakeLists.txt"; then
    args+=(-DLLAMA_CURL=OFF)
fi
if [[ "$(uname -m)" == x86_64 ]]; then
    # NOTE: ggml's AMX kernels segfault on our build machine; our CMakeLists.txt turns them off too.
    amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    args+=("-DCMAKE_C_FLAGS=$amx" "-DCMAKE_CXX_FLAGS=$amx")
fi
# ggml puts ccache (when installed) in front of every compiler, nvcc too (GGML_CCACHE).
if [[ "${CCACHE:-1}" == 0 ]]; then
    args+=(-DGGML_CCACHE=OFF)
else
    args+=(-DGGML_CCACHE=ON)
fi
case $mode in
    cuda)
        if ! command -v nvcc >/dev/null && [[ -x /usr/local/cuda/bin/nvcc ]]; then
            export PATH=/usr/local/cuda/bin:$PATH
        fi
        args+=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90) ;;
    native)
        args+=(-DGGML_CUDA=OFF) ;;
    dl)
        args+=(-DGGML_CUDA=OFF -DGGML_BACKEND_DL=ON -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=ON
               -DCMAKE_PLATFORM_NO_VERSIONED_SONAME=ON -DCMAKE_BUILD_RPATH_USE_ORIGIN=ON)
        case $cpu in
            none) args+=(-DGGML_CPU=OFF -DGGML_CPU_ALL_VARIANTS=OFF) ;;
            all) args+=(-DGGML_CPU=ON -DGGML_CPU_ALL_VARIANTS=ON) ;;
            one) args+=(-DGGML_CPU=ON -DGGML_CPU_ALL_VARIANTS=OFF) ;;
            *) echo "build_upstream: UPSTREAM_CPU=$cpu: none, all or one" >&2; exit 2 ;;
        esac ;;
esac

cmake -S "$src" -B "$build" "${args[@]}"
nice -n "${NICE:-10}" cmake --build "$build" --target "${targets[@]}" -j "$jobs"
bin=$(cd "$build/bin" && pwd)
if [[ $mode == dl ]]; then
    # pyllama's wheel ships no AMX module either (see CMakeLists.txt)
    rm -f "$bin/libggml-cpu-sapphirerapids.so"
    # The claims above, checked on what was built: unversioned SONAME, RUNPATH $ORIGIN, no
    # backend linked in.
    soname=$(readelf -d "$bin/libggml-base.so" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')
    [[ "$soname" == libggml-base.so ]] || { echo "build_upstream: libggml-base.so has SONAME $soname" >&2; exit 1; }
    # (this pin's tools are thin executables over libllama-<tool>-impl.so: check every file)
    for f in "$bin"/lib*.so "${targets[@]/#/$bin/}"; do
        if readelf -d "$f" | grep -q 'NEEDED.*libggml-\(cpu\|cuda\)'; then
            echo "build_upstream: $f links a backend: not a GGML_BACKEND_DL build" >&2
            exit 1
        fi
    done
    echo "build_upstream: llama-server RUNPATH $(readelf -d "$bin/llama-server" |
        sed -n 's/.*(\(RUNPATH\|RPATH\)).*\[\(.*\)\]/\2/p'); its libraries:" \
        "$(cd "$bin" && find . -maxdepth 1 -name 'lib*.so' ! -name 'libggml-cpu*' ! -name 'libggml-cuda*' -printf '%f ')"
    echo "build_upstream: backend modules in bin/: $(cd "$bin" && ls libggml-cpu*.so libggml-cuda.so 2>/dev/null | tr '\n' ' ')" \
         "(UPSTREAM_CPU=$cpu)"
fi
echo "build_upstream: $bin: ${targets[*]}"
