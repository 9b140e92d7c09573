#!/usr/bin/env bash
# The GPU leg of the serving benchmark: pyllama-server against upstream llama-server on one
# H100/H200, with synthetic Llama-3.2-1B- and Llama-3.1-8B-shaped Q4_K_M models.
#
#   bench/gpu_bench.sh STAGE [ARGS]
#
# Everything is built HERE; the GPU machine (device tool: no network, 10 min a call, 15 device
# minutes a session, its start included; given back after 30 s idle) only installs what it is
# given, synthesises the models and runs the benchmarks. What it needs travels in one git-ignored
# folder, $CARRY (default gpu-carry/), named in each call's `carry`:
#   wheels/    pyllama-serve (the portable core: every ggml backend a module in pyllama/lib, one
#              libggml-cpu-<level>.so per CPU level) for the device's Python ($DEVICE_PYTHON, 3.12),
#              pyllama-serve-cuda13 (lib/libggml-cuda.so alone, built for $CUDA_ARCHS: 90-real),
#              and the wheels the device lacks: falcon, gunicorn, orjson, gguf
#   upstream.tar.xz  upstream's llama-server, llama-bench, llama-batched-bench, llama-quantize (thin
#              executables over libllama-<tool>-impl.so) with libllama*.so, libmtmd.so, libggml.so,
#              libggml-base.so, libgomp.so.1: bench/build_upstream.sh --dl, stripped, RUNPATH $ORIGIN.
#              No backend of its own: there, pyllama's CPU modules and libggml-cuda.so are copied
#              beside the tools, where upstream's ggml_backend_load_all() looks (the executable's
#              folder), so both servers run the very same ggml-cuda and CPU binaries
#   ggml-src.tar.gz  ggml's sources without the other backends, for the fallback `build-cuda`
#   MANIFEST.txt     what is in it, the pin, the versions
#
# Stages run HERE (network, compilers; builds under `nice -n 10`):
#   prepare        all of the below, then `size`
#   core-wheel     a pyllama-serve wheel the device's Python installs: $CORE_WHEEL, else one in
#                  wheelhouse/ or $PREP/wheelhouse/ tagged cp312 (or abi3 <= 3.12), else built with
#                  python$DEVICE_PYTHON from the sdist (dist/, `wheels/build.sh sdist` if missing;
#                  SDIST_SRC=build/sdist-src builds the tree `wheels/build.sh cpu` unpacked, so ccache
#                  serves its objects) and repaired with `wheels/build.sh repair`
#   cuda-wheel     $CUDA_WHEEL, else pyllama_serve_cuda13-*.whl in $PREP/cuda-dist, dist/ or
#                  wheelhouse/, else CUDA_ARCHS=$CUDA_ARCHS wheels/cuda13/build.sh $PREP/cuda-dist
#   upstream       bench/build_upstream.sh --dl $PREP/upstream-src $PREP/upstream-build, copied
#   wheels         pip download of the dependency wheels (pinned below)
#   ggml-src       the fallback's sources
#   size           what travels (tracked files + untracked ones + $CARRY) against 64 MiB
# Stages run THERE (each also runs here on CPU with CUDA=0, for testing):
#   install        the wheels into $SITE (/tmp/site), upstream.tar.xz into $UPSTREAM (/tmp/upstream)
#                  with pyllama's backend modules copied beside the tools; checks the CUDA libraries
#                  the module NEEDs (CUDA 13: libcudart.so.13, libcublas.so.13: LD_LIBRARY_PATH's,
#                  else the toolkit's, found through nvcc, else NVIDIA's wheels in python3's
#                  site-packages; put on LD_LIBRARY_PATH, for both servers) and that both servers list
#                  the GPU (CUDA0). Every other stage runs it first on a machine that lacks it
#   build-cuda     FALLBACK, where install says the carried module does not fit the device's CUDA:
#                  builds libggml-cuda.so there from ggml-src.tar.gz with its nvcc for $CUDA_ARCHS
#                  (CUDA 13: wheels/cuda13/CMakeLists.txt; other majors: ggml's own CMake) and puts
#                  it in place of the carried one; resumes if run again after a timeout
#   models [SHAPE...]  synthesise SHAPE (1b 8b tiny; default: 1b 8b) into $MODELS_DIR as
#                  synth-llama-SHAPE-$QUANT.gguf with bench/synth_llama.py and llama-quantize
#   raw MODEL      upstream llama-bench (single stream) and llama-batched-bench at each of $NPL
#   serve MODEL    bench/serve_bench.py: pyllama-server, llama-server and llama-server
#                  --backend-sampling at each of $NPL, both modes, with --limit (llama-batched-bench
#                  at the same shapes) and --raw (llama-bench): the raw limits come with it
#   call1          install, models 1b, serve 1b            (the first device call)
#   call2          install, models 8b, serve 8b            (the second; each call stands alone)
# MODEL is a GGUF path or a shape name (1b, 8b, tiny) for $MODELS_DIR/synth-llama-SHAPE-$QUANT.gguf.
# Results go to $RESULTS (/tmp/gpu-bench). With $OUT set (the device tool's folder that comes
# back, 8 files at most) each stage leaves there gpu-bench-STAGE.log (its whole output),
# summary.md (every table so far) and gpu-bench.tar.gz ($RESULTS: raw outputs, plots, server
# and build logs, timings.txt), refreshed after every step so a call cut short still returns.
#
# Before the session, here: `bash bench/gpu_bench.sh prepare` (and the .gitignore line /gpu-carry/).
# The device calls, each with carry ["gpu-carry"] (37 MiB with the tracked files; nothing else:
# no vendor/llama.cpp, no build folder, nothing compiled there):
#   1. timeout_s 600:  bash bench/gpu_bench.sh call1
#   2. right after 1's reply, timeout_s = status's budget_left_s - 30 (600 at most):
#                      bash bench/gpu_bench.sh call2
#   then give_back. Each call stands alone (a machine given back between them only costs its start
# again); results come back in $OUT either way.
# Guesses, not yet measured there (timings.txt in the results will say): machine start 1-3 min;
# call 1 about 5 min (install 20-30 s, 1b synthesis + quantization 1 min, serve 1b 3-4 min); call 2
# about 6-7 min (8b synthesis + quantization 2-3 min, serve 8b 4 min): 13-15 of the 15 minutes.
# With under 9 min left after call 1, run call 2 lighter (one mode, two contenders, no probe):
#   MODES=completion BACKEND_SAMPLING=0 CACHE_PROBE=0 bash bench/gpu_bench.sh call2   (~4 min)
# If install stops on the CUDA check (the device's CUDA is not 13), the fallback is one call of
#   BUILD_TIMEOUT=560 bash bench/gpu_bench.sh build-cuda    (ggml-cuda for 90-real, ~5-8 min on 16
# cores; again if cut short, it resumes), then call1 at once (a given-back machine loses the build):
# 1b only in that session.
#
# Environment: CARRY (gpu-carry), PREP (build/gpu-prep: here, the builds), DEVICE_PYTHON (3.12),
# CUDA_ARCHS (90-real), UPSTREAM_CPU (none: see build_upstream.sh), SITE, UPSTREAM, MODELS_DIR,
# RESULTS, OUT, QUANT (Q4_K_M), CUDA (1), NGL (99; 0 with CUDA=0), THREADS (all cores),
# NPL (1,8,32,64), NPP (100: raw's prompt tokens), NTG (128: generated tokens), NP (64),
# CTX (65536), PROMPT_WORDS (60), MODES (completion,chat), BACKEND_SAMPLING (1), REQUESTS (2 per
# client), CACHE_PROBE (2000 tokens; 0: none), BUILD_TIMEOUT (540), CALL1_SHAPE (1b), CALL2_SHAPE (8b:
# tiny for a test of the calls here on CPU).
set -euo pipefail

cd "$(dirname "$0")/.."
CARRY=${CARRY:-gpu-carry}
PREP=${PREP:-build/gpu-prep}
DEVICE_PYTHON=${DEVICE_PYTHON:-3.12}
CUDA_ARCHS=${CUDA_ARCHS:-90-real}
SITE=${SITE:-/tmp/site}
UPSTREAM=${UPSTREAM:-/tmp/upstream}
MODELS_DIR=${MODELS_DIR:-/tmp/models}
RESULTS=${RESULTS:-/tmp/gpu-bench}
QUANT=${QUANT:-Q4_K_M}
CUDA=${CUDA:-1}
if ((CUDA)); then NGL=${NGL:-99}; else NGL=${NGL:-0}; fi
THREADS=${THREADS:-$(nproc)}
NPL=${NPL:-1,8,32,64}
NPP=${NPP:-100}
NTG=${NTG:-128}
NP=${NP:-64}
CTX=${CTX:-65536}
PROMPT_WORDS=${PROMPT_WORDS:-60}
MODES=${MODES:-completion,chat}
BACKEND_SAMPLING=${BACKEND_SAMPLING:-1}
REQUESTS=${REQUESTS:-2}
CACHE_PROBE=${CACHE_PROBE:-2000}
BUILD_TIMEOUT=${BUILD_TIMEOUT:-540}
CALL1_SHAPE=${CALL1_SHAPE:-1b}
CALL2_SHAPE=${CALL2_SHAPE:-8b}
LIMIT=$((64 * 1024 * 1024))  # the device tool's working-tree limit
TOOLS=(llama-server llama-batched-bench llama-bench llama-quantize)
# What pyllama needs at run time and the benchmark besides, that the GPU image lacks (its own
# numpy, pyyaml, requests, tqdm, packaging, httpx and matplotlib serve). The versions this
# checkout is tested with.
WHEELS=(falcon==4.4.0 gunicorn==27.0.1 orjson==3.13.0 gguf==0.19.0)

export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
export PATH=$SITE/bin:$PATH
export PYTHONUNBUFFERED=1 PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
mkdir -p "$RESULTS"

die() {
    echo "gpu_bench: $*" >&2
    exit 1
}
say() { echo "gpu_bench: $*"; }

# publish: what $RESULTS holds so far, into $OUT (the device tool brings it back), 2 files
publish() {
    [[ -n "${OUT:-}" && -d "${OUT:-}" ]] || return 0
    if compgen -G "$RESULTS/*.md" >/dev/null; then
        cat "$RESULTS"/*.md >"$OUT/summary.md"
    fi
    tar -czf "$OUT/gpu-bench.tar.gz" -C "$RESULTS" . 2>/dev/null || true
}

# timed NAME CMD...: CMD (errexit holds inside: a failing step ends the script, and the EXIT
# trap publishes), its wall time appended to $RESULTS/timings.txt, then publish
timed() {
    local name=$1 start=$SECONDS
    shift
    "$@"
    echo "$name $((SECONDS - start)) s" >>"$RESULTS/timings.txt"
    say "$name: $((SECONDS - start)) s"
    publish
}

# run_logged NAME CMD...: CMD under BUILD_TIMEOUT, its output also in $RESULTS/NAME.log
run_logged() {
    local name=$1 rc=0
    shift
    timeout "$BUILD_TIMEOUT" "$@" 2>&1 | tee "$RESULTS/$name.log" || rc=${PIPESTATUS[0]}
    if ((rc == 124)); then
        die "$name stopped after ${BUILD_TIMEOUT}s: run the same stage again, it carries on"
    elif ((rc != 0)); then
        die "$name failed ($rc): see $RESULTS/$name.log"
    fi
}

# --- here --------------------------------------------------------------------------------------

version() { sed -n 's/^version *= *"\([^"]*\)".*/\1/p' pyproject.toml | head -1; }

device_python() {  # an interpreter of $DEVICE_PYTHON here, to build the core wheel with
    local py
    for py in "python$DEVICE_PYTHON" ~/.pyenv/versions/"$DEVICE_PYTHON".*/bin/"python$DEVICE_PYTHON"; do
        if "$py" -c 'import sys' 2>/dev/null; then
            command -v "$py"
            return
        fi
    done
    die "no python$DEVICE_PYTHON here to build the core wheel with; pass CORE_WHEEL=... instead"
}

core_wheel_ok() {  # does the wheel $1 install on CPython $DEVICE_PYTHON, x86-64 Linux?
    local name minor=${DEVICE_PYTHON#3.} m
    name=$(basename "$1")
    [[ $name == pyllama_serve-"$(version)"-*x86_64.whl ]] || return 1
    [[ $name == *-cp3${minor}-cp3${minor}-* ]] && return 0
    for ((m = 10; m <= minor; m++)); do
        [[ $name == *-cp3${m}-abi3-* ]] && return 0
    done
    return 1
}

stage_core_wheel() {
    local w found="" src py
    mkdir -p "$CARRY/wheels"
    rm -f "$CARRY"/wheels/pyllama_serve-*.whl
    # repaired wheels only (manylinux: libgomp grafted), unless named by CORE_WHEEL
    for w in ${CORE_WHEEL:-} wheelhouse/pyllama_serve-*manylinux*.whl "$PREP"/wheelhouse/pyllama_serve-*manylinux*.whl; do
        if [[ -f "$w" ]] && core_wheel_ok "$w"; then
            found=$w
            break
        fi
    done
    if [[ -z "$found" ]]; then
        [[ -z "${CORE_WHEEL:-}" ]] || die "CORE_WHEEL=$CORE_WHEEL is not a pyllama-serve $(version) wheel for CPython $DEVICE_PYTHON"
        say "no pyllama-serve wheel for CPython $DEVICE_PYTHON (wheelhouse/ has: $(ls wheelhouse 2>/dev/null | tr '\n' ' ')): building one"
        py=$(device_python)
        src=${SDIST_SRC:-}
        if [[ -z "$src" ]]; then
            [[ -f dist/pyllama_serve-$(version).tar.gz ]] || bash wheels/build.sh sdist
            src=$PREP/sdist-src
            rm -rf "$src" && mkdir -p "$src"
            tar -xzf "dist/pyllama_serve-$(version).tar.gz" -C "$src" --strip-components=1
        fi
        [[ -f "$src/PKG-INFO" ]] || die "$src is not an unpacked sdist"
        rm -rf "$PREP/dist" && mkdir -p "$PREP/dist"
        nice -n 10 "$py" -m pip wheel --no-deps -w "$PREP/dist" "$(cd "$src" && pwd)" \
            -C build-dir="$(mkdir -p "$PREP/build-py$DEVICE_PYTHON" && cd "$PREP/build-py$DEVICE_PYTHON" && pwd)" \
            2>&1 | tee "$PREP/core-wheel.log" | grep -v '^  *\[' || true
        compgen -G "$PREP/dist/pyllama_serve-*.whl" >/dev/null || die "the wheel build failed: see $PREP/core-wheel.log"
        rm -rf "$PREP/wheelhouse" "$PREP/wheelhouse.tmp"
        # auditwheel (grafts libgomp) and wheels/check_wheel.py: the interpreter does not matter
        PYTHON=${REPAIR_PYTHON:-$([[ -x .venv/bin/python ]] && echo "$(pwd)/.venv/bin/python" || command -v python3)} \
            bash wheels/build.sh repair "$(ls "$PREP"/dist/pyllama_serve-*.whl)" "$PREP/wheelhouse.tmp"
        mv "$PREP/wheelhouse.tmp" "$PREP/wheelhouse"
        found=$(ls "$PREP"/wheelhouse/pyllama_serve-*manylinux*.whl)
        core_wheel_ok "$found" || die "$found does not fit CPython $DEVICE_PYTHON"
    fi
    cp "$found" "$CARRY/wheels/"
    say "core: $found"
    warn_stale "$found" pyllama csrc CMakeLists.txt pyproject.toml vendor/pin.toml
}

warn_stale() {  # warn_stale WHEEL PATH...: a source newer than the wheel means a stale carry
    local wheel=$1 newer
    shift
    newer=$(find "$@" -type f -newer "$wheel" ! -name '*.pyc' 2>/dev/null | head -3 | tr '\n' ' ')
    if [[ -n "$newer" ]]; then
        say "WARNING: $(basename "$wheel") is older than $newer: rebuild it (remove it, or pass CORE_WHEEL/CUDA_WHEEL) unless those changes don't matter"
    fi
}

stage_cuda_wheel() {
    local w found=""
    mkdir -p "$CARRY/wheels"
    rm -f "$CARRY"/wheels/pyllama_serve_cuda13-*.whl
    for w in ${CUDA_WHEEL:-} "$PREP"/cuda-dist/pyllama_serve_cuda13-*.whl dist/pyllama_serve_cuda13-*.whl \
             wheelhouse/pyllama_serve_cuda13-*.whl; do
        if [[ -f "$w" && $(basename "$w") == pyllama_serve_cuda13-"$(version)"-* ]]; then
            found=$w
            break
        fi
    done
    if [[ -z "$found" ]]; then
        [[ -z "${CUDA_WHEEL:-}" ]] || die "CUDA_WHEEL=$CUDA_WHEEL is not a pyllama-serve-cuda13 $(version) wheel"
        # NOTE: one CUDA build at a time on this machine: wheels/cuda13/build.sh shares build folders.
        if pgrep -f 'wheels/cuda13' >/dev/null; then
            die "a wheels/cuda13 build is running: wait for it and pass CUDA_WHEEL=its wheel"
        fi
        say "no pyllama-serve-cuda13 wheel: building one for $CUDA_ARCHS (long: ggml-cuda)"
        CUDA_ARCHS=$CUDA_ARCHS bash wheels/cuda13/build.sh "$PREP/cuda-dist"
        found=$(ls -t "$PREP"/cuda-dist/pyllama_serve_cuda13-*.whl | head -1)
    fi
    cp "$found" "$CARRY/wheels/"
    warn_stale "$found" wheels/cuda13 vendor/pin.toml
    # The architectures inside: every one beyond the device's is dead weight in the carry.
    local tmp archs
    tmp=$(mktemp -d)
    python3 -m zipfile -e "$found" "$tmp"
    if command -v cuobjdump >/dev/null || [[ -x /usr/local/cuda/bin/cuobjdump ]]; then
        archs=$(PATH=$PATH:/usr/local/cuda/bin cuobjdump --list-elf "$tmp/pyllama_cuda13/lib/libggml-cuda.so" 2>/dev/null |
            sed -n 's/.*\.\(sm_[0-9a-z]*\)\..*/\1/p' | sort -u | tr '\n' ' ')
        say "cuda: $found: kernels for ${archs:-?}"
    else
        say "cuda: $found"
    fi
    rm -rf "$tmp"
}

stage_upstream() {
    local src=$PREP/upstream-src build=$PREP/upstream-build f gomp dir=$PREP/upstream-carry
    UPSTREAM_CPU=${UPSTREAM_CPU:-none} bash bench/build_upstream.sh --dl "$src" "$build"
    rm -rf "$dir" && mkdir -p "$dir/upstream"
    # the tools are thin executables over libllama-<tool>-impl.so; lib*.so takes those too
    for f in "${TOOLS[@]}"; do cp "$build/bin/$f" "$dir/upstream/"; done
    cp "$build"/bin/lib*.so "$dir/upstream/"
    # libggml-base.so NEEDs libgomp.so.1 (OpenMP in its quantization tables): this compiler's,
    # beside it, rather than whatever the device's image has
    gomp=$(readlink -f "$(gcc -print-file-name=libgomp.so.1)")
    if [[ -f "$gomp" ]]; then cp "$gomp" "$dir/upstream/libgomp.so.1"; fi
    # no debug info or local symbols: a third of the size, nothing the benchmark needs; one
    # RUNPATH, $ORIGIN (CMake leaves an empty entry, which means the current folder)
    strip --strip-unneeded "$dir"/upstream/*
    for f in "$dir"/upstream/*; do
        if readelf -d "$f" | grep -q '(RUNPATH)'; then patchelf --set-rpath '$ORIGIN' "$f"; fi
    done
    # xz: 15 MB of libraries travel as 4
    rm -rf "$CARRY/upstream"
    tar -cJf "$CARRY/upstream.tar.xz" -C "$dir" upstream
    say "upstream: $(du -sh "$dir/upstream" | cut -f1) in $CARRY/upstream.tar.xz ($(du -h "$CARRY/upstream.tar.xz" | cut -f1))"
}

stage_wheels() {
    mkdir -p "$CARRY/wheels"
    local w
    for w in "${WHEELS[@]}"; do rm -f "$CARRY/wheels/${w%%==*}"-*.whl; done  # one version of each
    local platforms=() n
    for n in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
             manylinux1_x86_64; do
        platforms+=(--platform "$n")
    done
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$DEVICE_PYTHON" \
        --implementation cp "${platforms[@]}" -d "$CARRY/wheels" "${WHEELS[@]}"
}

stage_ggml_src() {
    [[ -f vendor/llama.cpp/ggml/CMakeLists.txt ]] || python3 vendor/fetch.py
    # ggml with the CUDA backend and none other: what the fallback build-cuda configures
    # shellcheck disable=SC2046  # file names of ggml/src/, no spaces
    (cd vendor/llama.cpp && tar -czf - LICENSE .pyllama-pin.json ggml/CMakeLists.txt ggml/cmake ggml/include \
        $(cd ggml/src && find . -maxdepth 1 -type f | sed 's|^\./|ggml/src/|') ggml/src/ggml-cuda) \
        >"$CARRY/ggml-src.tar.gz"
    du -sh "$CARRY/ggml-src.tar.gz"
}

stage_manifest() {
    {
        echo "gpu_bench carry, made $(date -u +%FT%TZ) on $(uname -n) from $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo '+changes')"
        echo "pin sha256 $(python3 -c 'import json; print(json.load(open("vendor/llama.cpp/.pyllama-pin.json"))["sha256"])')"
        echo "DEVICE_PYTHON=$DEVICE_PYTHON CUDA_ARCHS=$CUDA_ARCHS UPSTREAM_CPU=${UPSTREAM_CPU:-none}"
        (cd "$CARRY" && find . -type f ! -name "MANIFEST.txt*" | sort | while read -r f; do
            printf '%10d  %s  %s\n' "$(stat -c %s "$f")" "$(sha256sum "$f" | cut -c1-12)" "${f#./}"
        done)
    } >"$CARRY/MANIFEST.txt.tmp"
    mv "$CARRY/MANIFEST.txt.tmp" "$CARRY/MANIFEST.txt"
}

stage_size() {
    [[ -d "$CARRY" ]] || die "no $CARRY/: run prepare"
    if [[ "$(cd "$CARRY" && pwd)" != "$(pwd)"/* ]]; then
        say "WARNING: $CARRY is outside the repository: only a folder inside it travels"
    elif ! git check-ignore -q "$CARRY/MANIFEST.txt" 2>/dev/null; then
        say "WARNING: $CARRY/ is not git-ignored: add '/$CARRY/' to .gitignore (it would travel uncarried and be counted twice)"
    fi
    local tracked untracked carry total
    tracked=$(git ls-files -z | xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
    untracked=$(git ls-files -z --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null |
        awk '{s += $1} END {print s + 0}')
    carry=$(find "$CARRY" -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}')
    total=$((tracked + untracked + carry))
    (cd "$CARRY" && find . -type f -printf '%s %P\n' | sort -rn | awk '{printf "  %8.1f MiB  %s\n", $1 / 1048576, $2}')
    awk -v t="$tracked" -v u="$untracked" -v c="$carry" -v a="$total" -v l="$LIMIT" 'BEGIN {
        m = 1048576
        printf "gpu_bench: travels: tracked %.1f + untracked %.1f + %s %.1f = %.1f MiB of %.0f MiB (%.0f%%)\n",
            t / m, u / m, "'"$CARRY"'", c / m, a / m, l / m, 100 * a / l }'
    if ((total > LIMIT)); then
        say "OVER the limit by $(((total - LIMIT) / 1048576 + 1)) MiB. To drop, largest first:"
        say "  - the cuda13 wheel for more than 90-real: rebuild it with CUDA_ARCHS=90-real"
        say "  - CPU levels the device cannot use or does not pick (it picks one: x64, haswell, skylakex, icelake, zen4 ...): repack the core wheel without them"
        say "  - untracked files that are not ignored (git status)"
        return 1
    fi
}

stage_prepare() {
    python3 vendor/fetch.py
    mkdir -p "$CARRY" "$PREP"
    stage_wheels
    stage_core_wheel
    stage_cuda_wheel
    stage_upstream
    stage_ggml_src
    stage_manifest
    stage_size
}

# --- there -------------------------------------------------------------------------------------

nvcc_path() {
    command -v nvcc 2>/dev/null || { [[ -x /usr/local/cuda/bin/nvcc ]] && echo /usr/local/cuda/bin/nvcc; } || true
}

cuda_major() {  # the toolkit's CUDA major version, empty without nvcc
    local nvcc
    nvcc=$(nvcc_path)
    if [[ -n "$nvcc" ]]; then "$nvcc" --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p'; fi
}

cuda_lib_dirs() {  # where the CUDA runtime and cuBLAS may be: the toolkit's, then NVIDIA's wheels
    local nvcc root sp
    nvcc=$(nvcc_path)
    if [[ -n "$nvcc" ]]; then
        root=$(cd "$(dirname "$(readlink -f "$nvcc")")/.." && pwd)
        echo "$root/lib64" "$root/targets/x86_64-linux/lib"
    fi
    echo /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib
    for sp in $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null); do
        echo "$sp"/nvidia/cu*/lib "$sp"/nvidia/cuda_runtime/lib "$sp"/nvidia/cublas/lib
    done
}

needed_cuda_libs() {  # the libcu*.so.N that the module $1 NEEDs (readelf, else ldd's list)
    if command -v readelf >/dev/null; then
        readelf -d "$1" | sed -n 's/.*(NEEDED).*\[\(libcu[a-zA-Z]*\.so\.[0-9]*\)\].*/\1/p'
    else
        (ldd "$1" || true) | sed -n 's/^[[:space:]]*\(libcu[a-zA-Z]*\.so\.[0-9]*\) =>.*/\1/p'
    fi
}

# cuda_env: LD_LIBRARY_PATH for the CUDA libraries that the installed libggml-cuda.so NEEDs
# (NVIDIA's wheels, where its RUNPATH looks, are not installed in $SITE), or a clear stop.
cuda_env() {
    local mod=$SITE/pyllama_cuda13/lib/libggml-cuda.so lib libs dir found add="" missing=() need major driver
    [[ -f "$mod" ]] || die "no $mod: run install (is pyllama_serve_cuda13-*.whl in $CARRY/wheels?)"
    major=$(cuda_major || true)
    driver=$( (nvidia-smi 2>/dev/null || true) | sed -n 's/.*CUDA Version: *\([0-9.]*\).*/\1/p' | head -1)
    libs=$(needed_cuda_libs "$mod")
    need=$(sed -n 's/^libcudart\.so\.\([0-9]*\)$/\1/p' <<<"$libs")
    for lib in $libs; do
        [[ $lib == libcuda.so.* ]] && continue  # the driver's, from the system
        found=""
        for dir in ${LD_LIBRARY_PATH//:/ } $(cuda_lib_dirs); do
            if [[ -e "$dir/$lib" ]]; then
                found=$dir
                break
            fi
        done
        if [[ -n "$found" ]]; then
            if [[ ":$add:${LD_LIBRARY_PATH:-}:" != *":$found:"* ]]; then add=${add:+$add:}$found; fi
        else
            missing+=("$lib")
        fi
    done
    if [[ -n "$driver" ]] && ((${driver%%.*} < ${need:-0})); then
        die "the carried libggml-cuda.so needs CUDA $need; this machine's driver runs CUDA $driver at most" \
            "(nvcc ${major:-none}). Build the CUDA package here instead: bash bench/gpu_bench.sh build-cuda" \
            "(5-8 min), then this stage again"
    elif [[ "${major:-}" != "${need:-}" ]] && ((${#missing[@]})); then
        die "this machine's CUDA is ${major:-absent (no nvcc)}, not ${need:-?}: the carried libggml-cuda.so" \
            "(pyllama-serve-cuda13) NEEDs ${missing[*]}. Build the CUDA package here instead:" \
            "bash bench/gpu_bench.sh build-cuda (5-8 min), then this stage again"
    elif ((${#missing[@]})); then
        die "CUDA $need is here but not ${missing[*]}, neither in the toolkit nor in python3's NVIDIA wheels" \
            "(looked in: ${LD_LIBRARY_PATH//:/ } $(cuda_lib_dirs | tr '\n' ' ')): carry nvidia-cuda-runtime/nvidia-cublas 13 wheels or set LD_LIBRARY_PATH"
    fi
    if [[ -n "${major:-}" && "$major" != "$need" ]]; then
        say "WARNING: nvcc is CUDA $major, the module CUDA $need: its libraries came from $add"
    fi
    export LD_LIBRARY_PATH=$add${LD_LIBRARY_PATH:+${add:+:}$LD_LIBRARY_PATH}
    say "CUDA: nvcc ${major:-none}, driver for CUDA ${driver:-?}, module needs CUDA $need; LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
}

# install_files: the wheels into $SITE, upstream's tools into $UPSTREAM with pyllama's CPU modules
install_files() {
    [[ -d "$CARRY/wheels" ]] || die "no $CARRY/wheels: run 'bench/gpu_bench.sh prepare' here and carry $CARRY"
    local wheels=() w
    for w in "$CARRY"/wheels/*.whl; do
        # the CUDA module: not on a machine without CUDA (it would only fail to load), nor over
        # one build-cuda made here
        if [[ $(basename "$w") != pyllama_serve_cuda13-* ]] ||
           { ((CUDA)) && [[ ! -f "$SITE/.gpu-bench-cuda-built" ]]; }; then
            wheels+=("$w")
        fi
    done
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "${wheels[@]}" ||
        die "pip could not install $CARRY/wheels on $(python3 --version): the core wheel must be built for it (DEVICE_PYTHON)"
    [[ -f "$CARRY/upstream.tar.xz" ]] || die "no $CARRY/upstream.tar.xz: run 'bench/gpu_bench.sh upstream' here"
    rm -rf "$UPSTREAM" "$UPSTREAM.tmp"
    mkdir -p "$UPSTREAM.tmp"
    tar -xJf "$CARRY/upstream.tar.xz" -C "$UPSTREAM.tmp" 2>/dev/null ||
        python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
            "$CARRY/upstream.tar.xz" "$UPSTREAM.tmp"
    mv "$UPSTREAM.tmp/upstream" "$UPSTREAM"
    rm -rf "$UPSTREAM.tmp"
    # ggml_backend_load_all() of upstream's tools loads libggml-*.so from their own folder.
    # pyllama's CPU modules NEED the libgomp that auditwheel grafted into pyllama_serve.libs/;
    # their RPATH has $ORIGIN, so it goes beside them.
    if ! compgen -G "$UPSTREAM/libggml-cpu*.so" >/dev/null; then
        cp "$SITE"/pyllama/lib/libggml-cpu-*.so "$UPSTREAM/"
        if [[ -d "$SITE/pyllama_serve.libs" ]]; then cp "$SITE"/pyllama_serve.libs/* "$UPSTREAM/"; fi
    fi
}

# install_check: the CUDA libraries, the CUDA module beside upstream's tools, what each server sees
install_check() {
    if ((CUDA)); then
        cuda_env
        # a copy, not a link: its NEEDED libggml-base.so is then upstream's, already loaded by
        # SONAME, never pyllama's through the RUNPATH
        cp "$SITE/pyllama_cuda13/lib/libggml-cuda.so" "$UPSTREAM/"
    fi
    {
        python3 --version
        python3 -m pip list 2>/dev/null | grep -i -E '^(numpy|matplotlib|pyyaml|falcon|gunicorn|orjson|gguf|pyllama[-_]serve.*) ' || true
        if command -v nvidia-smi >/dev/null; then nvidia-smi; fi
        echo "nvcc: $(cuda_major)"
        lscpu | grep -E '^(Model name|Flags)' | cut -c1-200 || true
        echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
        echo "## llama-server --list-devices"
        "$UPSTREAM/llama-server" --list-devices 2>&1
        echo "## pyllama-server --list-devices"
        (cd /tmp && pyllama-server --list-devices 2>&1)
        echo "## pyllama backends"
        (cd /tmp && python3 -c 'from pyllama.engine import list_backends; [print(b) for b in list_backends()]' 2>&1)
    } >"$RESULTS/env.txt" 2>&1 || true
    sed -n '/## llama-server/,$p' "$RESULTS/env.txt"
    if ((CUDA)); then
        grep -A3 '## llama-server' "$RESULTS/env.txt" | grep -q CUDA0 ||
            die "upstream's llama-server sees no CUDA device: see $RESULTS/env.txt"
        sed -n '/## pyllama-server/,/## pyllama backends/p' "$RESULTS/env.txt" | grep -q CUDA0 ||
            die "pyllama-server sees no CUDA device: see $RESULTS/env.txt"
    fi
    ls "$CARRY"/wheels >"$SITE/.gpu-bench-installed"
}

stage_install() {
    install_files
    install_check
}

need_install() {  # a fresh machine (or one given back and started again): install first
    if [[ -f "$SITE/.gpu-bench-installed" ]] && [[ -x "$UPSTREAM/llama-server" ]] &&
       (cd /tmp && python3 -c 'import falcon, gunicorn, orjson, pyllama.cli' 2>/dev/null); then
        if ((CUDA)); then cuda_env >/dev/null; fi
    else
        timed install stage_install
    fi
}

stage_build_cuda() {
    local major build=${CUDA_BUILD:-/tmp/cuda-build} args so root sp
    major=$(cuda_major)
    [[ -n "$major" ]] || die "no nvcc (PATH, /usr/local/cuda/bin): no CUDA build here"
    if [[ ! -f "$SITE/pyllama/__init__.py" || ! -x "$UPSTREAM/llama-server" ]]; then install_files; fi
    PATH=$(dirname "$(nvcc_path)"):$PATH
    export PATH
    if [[ ! -f vendor/llama.cpp/ggml/CMakeLists.txt ]]; then
        [[ -f "$CARRY/ggml-src.tar.gz" ]] || die "no vendor/llama.cpp and no $CARRY/ggml-src.tar.gz: carry $CARRY"
        mkdir -p vendor/llama.cpp
        tar -xzf "$CARRY/ggml-src.tar.gz" -C vendor/llama.cpp
    fi
    args=(-G Ninja -DCMAKE_BUILD_TYPE=Release "-DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCHS")
    if ((major == 13)); then
        # the wheel's own configuration; cuBLAS from NVIDIA's wheel when the toolkit has none
        root=$(cd "$(dirname "$(readlink -f "$(nvcc_path)")")/.." && pwd)
        if ! compgen -G "$root/lib64/libcublas.so*" >/dev/null && ! compgen -G "$root/targets/*/lib/libcublas.so*" >/dev/null; then
            for sp in $(python3 -c 'import site; print(" ".join(site.getsitepackages()))'); do
                if [[ -f "$sp/nvidia/cu13/include/cublas_v2.h" && -f "$sp/nvidia/cu13/lib/libcublas.so.13" ]]; then
                    args+=("-DPYLLAMA_CUBLAS_ROOT=$sp/nvidia/cu13")
                    break
                fi
            done
        fi
        [[ -f "$build/CMakeCache.txt" ]] || cmake -S wheels/cuda13 -B "$build" "${args[@]}"
    else
        # another major: ggml's own CMake, the wheel's options; cuBLAS from the toolkit
        args+=(-DBUILD_SHARED_LIBS=ON -DGGML_BACKEND_DL=ON -DGGML_CUDA=ON -DGGML_CPU=OFF -DGGML_NATIVE=OFF
               -DGGML_CUDA_GRAPHS=ON -DGGML_BUILD_TESTS=OFF -DGGML_BUILD_EXAMPLES=OFF
               -DCMAKE_PLATFORM_NO_VERSIONED_SONAME=ON)
        [[ -f "$build/CMakeCache.txt" ]] || cmake -S vendor/llama.cpp/ggml -B "$build" "${args[@]}"
    fi
    run_logged build-cuda cmake --build "$build" --target ggml-cuda -j "$(nproc)"
    so=$(find "$build" -name libggml-cuda.so -type f | head -1)
    [[ -n "$so" ]] || die "no libggml-cuda.so in $build"
    if [[ ! -f "$SITE/pyllama_cuda13/__init__.py" ]]; then
        # no wheel carried: the package and its entry point by hand, as the wheel has them
        mkdir -p "$SITE/pyllama_cuda13/lib" "$SITE/pyllama_serve_cuda13-$(version).dist-info"
        cp wheels/cuda13/pyllama_cuda13/__init__.py "$SITE/pyllama_cuda13/"
        printf 'Metadata-Version: 2.1\nName: pyllama-serve-cuda13\nVersion: %s\n' "$(version)" \
            >"$SITE/pyllama_serve_cuda13-$(version).dist-info/METADATA"
        printf '[pyllama.backends]\ncuda13 = pyllama_cuda13\n' \
            >"$SITE/pyllama_serve_cuda13-$(version).dist-info/entry_points.txt"
    fi
    cp "$so" "$SITE/pyllama_cuda13/lib/libggml-cuda.so"
    echo "$major" >"$SITE/.gpu-bench-cuda-built"  # install keeps it from now on
    say "built for CUDA $major: NEEDs $(needed_cuda_libs "$so" | tr '\n' ' ')"
    install_check
}

model_path() {  # a shape name or a path -> the GGUF's path
    case $1 in
        tiny | 1b | 8b) echo "$MODELS_DIR/synth-llama-$1-$QUANT.gguf" ;;
        *) echo "$1" ;;
    esac
}

stage_models() {
    need_install
    local shapes=("$@") shape out
    ((${#shapes[@]})) || shapes=(1b 8b)
    mkdir -p "$MODELS_DIR"
    for shape in "${shapes[@]}"; do
        out=$(model_path "$shape")
        if [[ -f "$out" ]]; then
            say "$out is there"
            continue
        fi
        timed "models-$shape" python3 bench/synth_llama.py --shape "$shape" --out "$out" --quantize "$QUANT" \
            --quantize-bin "$UPSTREAM/llama-quantize"
    done
    ls -l "$MODELS_DIR"
}

stage_raw() {
    need_install
    local model name max_npl ctx
    model=$(model_path "${1:?raw needs a MODEL}")
    [[ -f "$model" ]] || die "$model is missing: run models first"
    name=$(basename "$model" .gguf)
    max_npl=$(tr , '\n' <<<"$NPL" | sort -n | tail -1)
    ctx=$((max_npl * (NPP + NTG) + 256))  # one sequence of NPP + NTG tokens per parallel prompt
    "$UPSTREAM/llama-bench" -m "$model" -ngl "$NGL" -t "$THREADS" -p 0 -n "$NTG" -o json \
        >"$RESULTS/raw-$name-llama-bench.json" || die "llama-bench failed"
    "$UPSTREAM/llama-batched-bench" -m "$model" -ngl "$NGL" -t "$THREADS" -c "$ctx" \
        -npp "$NPP" -ntg "$NTG" -npl "$NPL" --output-format jsonl 2>"$RESULTS/raw-$name-batched.log" |
        grep '^{' >"$RESULTS/raw-$name-batched.jsonl" ||
        die "llama-batched-bench failed: see $RESULTS/raw-$name-batched.log"
    python3 - "$name" "$RESULTS/raw-$name-llama-bench.json" "$RESULTS/raw-$name-batched.jsonl" \
        <<'EOF' | tee "$RESULTS/raw-$name.md"
import json, sys

name, bench_json, batched_jsonl = sys.argv[1:]
single = json.load(open(bench_json))[0]
print(f"\n## {name}: upstream, no HTTP, no sampling\n")
print(f"llama-bench tg{single['n_gen']}: {single['avg_ts']:.1f} ± {single['stddev_ts']:.1f} tokens/s "
      f"(single stream, ngl {single['n_gpu_layers']}, {single.get('gpu_info') or single.get('cpu_info')})\n")
print("| parallel | prompt | gen | total s | gen tok/s, prefill incl. | decode tok/s | prefill tok/s |")
print("|---:|---:|---:|---:|---:|---:|---:|")
for line in open(batched_jsonl):
    r = json.loads(line)
    print(f"| {r['pl']} | {r['pp']} | {r['tg']} | {r['t']:.2f} | {r['pl'] * r['tg'] / r['t']:.1f} "
          f"| {r['speed_tg']:.1f} | {r['speed_pp']:.1f} |")
EOF
}

stage_serve() {
    need_install
    local model name flags=() rc=0
    model=$(model_path "${1:?serve needs a MODEL}")
    [[ -f "$model" ]] || die "$model is missing: run models first"
    name=$(basename "$model" .gguf)
    if ((BACKEND_SAMPLING)); then flags+=(--upstream-backend-sampling); fi
    if python3 -c 'import matplotlib' 2>/dev/null; then flags+=(--png "$RESULTS/serve-$name.png"); fi
    touch "$RESULTS/.serve-start"
    python3 bench/serve_bench.py -m "$model" --upstream "$UPSTREAM" \
        --concurrency "$NPL" --np "$NP" --ctx "$CTX" --n-predict "$NTG" --prompt-words "$PROMPT_WORDS" \
        --threads "$THREADS" --server-args "-ngl $NGL" --modes "$MODES" --requests-per-client "$REQUESTS" \
        --cache-probe-tokens "$CACHE_PROBE" "${flags[@]}" --limit --raw --md "$RESULTS/serve-$name.md" 2>&1 |
        tee "$RESULTS/serve-$name.log" || rc=${PIPESTATUS[0]}
    # each server's own log (serve_bench.py writes /tmp/serve_bench-<name>.log)
    mkdir -p "$RESULTS/servers-$name"
    find /tmp -maxdepth 1 -name 'serve_bench-*.log' -newer "$RESULTS/.serve-start" \
        -exec cp {} "$RESULTS/servers-$name/" \;
    return "$rc"
}

stage=${1:-}
shift || true
tee_pid=""
if [[ -n "${OUT:-}" && -d "${OUT:-}" && -n "$stage" ]]; then
    exec > >(tee -a "$OUT/gpu-bench-$stage.log") 2>&1
    tee_pid=$!
fi
on_exit() {
    local rc=$?
    publish
    if [[ -n "$tee_pid" ]]; then  # let tee write the last lines before the tool collects $OUT
        exec 1>&- 2>&-
        wait "$tee_pid" 2>/dev/null || true
    fi
    exit "$rc"
}
trap on_exit EXIT
case $stage in
    prepare) stage_prepare ;;
    core-wheel) stage_core_wheel ;;
    cuda-wheel) stage_cuda_wheel ;;
    upstream) stage_upstream ;;
    wheels) stage_wheels ;;
    ggml-src) stage_ggml_src ;;
    size) stage_manifest; stage_size ;;
    install) timed install stage_install ;;
    build-cuda) timed build-cuda stage_build_cuda ;;
    models) stage_models "$@" ;;
    raw) timed "raw-${1:-}" stage_raw "$@" ;;
    serve) timed "serve-${1:-}" stage_serve "$@" ;;
    call1) need_install; stage_models "$CALL1_SHAPE"; timed "serve-$CALL1_SHAPE" stage_serve "$CALL1_SHAPE" ;;
    call2) need_install; stage_models "$CALL2_SHAPE"; timed "serve-$CALL2_SHAPE" stage_serve "$CALL2_SHAPE" ;;
    *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2 ;;
esac
