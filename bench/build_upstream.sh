#!/usr/bin/env bash
# Build upstream llama.cpp's yardstick tools (llama-server, llama-batched-bench, llama-bench,
# llama-quantize) from the vendored pin, for the benchmarks in bench/. Nothing of it is committed.
#
#   bench/build_upstream.sh [--cuda] [SRC_DIR] [BUILD_DIR]
#
# SRC_DIR (default ../upstream-llama.cpp) and BUILD_DIR (default ../upstream-build) are relative
# to the repository root; the tools land in BUILD_DIR/bin. A SRC_DIR without CMakeLists.txt is
# filled first: from vendor/llama.cpp plus upstream-overlay/ when both are there (no network:
# the GPU machine's way, see bench/gpu_bench.sh), else with `vendor/fetch.py --all`.
# --cuda: CUDA backend for sm_90 (H100/H200) only. Environment: JOBS (default: all cores),
# CCACHE=0 to build without ccache (used by default where installed).
set -euo pipefail

cd "$(dirname "$0")/.."
cuda=0
if [[ "${1:-}" == "--cuda" ]]; then
    cuda=1
    shift
fi
src=${1:-../upstream-llama.cpp}
build=${2:-../upstream-build}
overlay=upstream-overlay
jobs=${JOBS:-$(nproc)}
targets=(llama-server llama-batched-bench llama-bench llama-quantize)

stamp_sha() {  # the pinned sdist's sha256 recorded by vendor/fetch.py (or the overlay) in $1
    python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["sha256"])' "$1"
}

if [[ ! -f "$src/CMakeLists.txt" ]]; then
    if [[ -f vendor/llama.cpp/CMakeLists.txt && -d "$overlay" ]]; then
        # NOTE: both halves must come from the same sdist, or the tree is a mix of two versions.
        if [[ "$(stamp_sha vendor/llama.cpp/.pyllama-pin.json)" != "$(stamp_sha "$overlay/.pyllama-pin.json")" ]]; then
            echo "build_upstream: vendor/llama.cpp and $overlay come from different pins;" \
                 "run bench/gpu_bench.sh overlay again" >&2
            exit 1
        fi
        echo "build_upstream: assembling $src from vendor/llama.cpp + $overlay"
        mkdir -p "$src"
        # Plain copies (fresh mtimes): ninja never sees sources newer than their outputs later.
        cp -r vendor/llama.cpp/. "$src/"
        cp -r "$overlay/." "$src/"
    else
        python3 vendor/fetch.py --all --dest "$src"
    fi
fi

args=(-G Ninja -DCMAKE_BUILD_TYPE=Release
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF
      # no Web UI assets: they would be downloaded at build time (no network on the GPU machine)
      -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF)
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
if ((cuda)); then
    if ! command -v nvcc >/dev/null && [[ -x /usr/local/cuda/bin/nvcc ]]; then
        export PATH=/usr/local/cuda/bin:$PATH
    fi
    args+=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90)
else
    args+=(-DGGML_CUDA=OFF)
fi

cmake -S "$src" -B "$build" "${args[@]}"
nice cmake --build "$build" --target "${targets[@]}" -j "$jobs"
echo "build_upstream: $(cd "$build/bin" && pwd): ${targets[*]}"
