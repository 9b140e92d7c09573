#!/usr/bin/env bash
# The GPU leg of the serving benchmark: pyllama-server against upstream llama-server on one
# H100, with synthetic Llama-3.2-1B- and Llama-3.1-8B-shaped Q4_K_M models.
#
#   bench/gpu_bench.sh STAGE [ARGS]
#
# The GPU machine (device tool) has no network, runs each command for at most 10 minutes and is
# given back after 30 s idle, so the work is split into stages that each fit one call, and what
# it lacks travels with the call: the pinned llama.cpp sources (vendor/llama.cpp, 40 MB), the
# files of upstream's tree that our build subset leaves out (upstream-overlay/, 3 MB) and the
# Python wheels missing there (.whl/, 5 MB). All three are git-ignored, so each call names them
# in `carry` (64 MiB at most, the tracked files included: 46 MB in all).
#
# Stages run HERE, once, with the network:
#   prepare        = vendor/fetch.py, then `wheels` and `overlay`; prints what each call carries
#   wheels         download into .whl/ the wheels the GPU machine lacks (pinned below)
#   overlay        fill upstream-overlay/ from the full upstream tree (FULL_TREE, default
#                  ../upstream-llama.cpp, extracted by vendor/fetch.py --all if missing)
# Stages run THERE (each also runs here on CPU with CUDA=0, for testing):
#   deps           install .whl/ into $SITE (default /tmp/site), print the versions, GPU, nvcc and
#                  cuBLAS found; every stage puts $SITE on PYTHONPATH and $SITE/bin on PATH itself
#   build-pyllama  pip install -e . into python3's environment, CUDA on (sm_90); resumes if run
#                  again after a timeout
#   build-upstream bench/build_upstream.sh --cuda $UPSTREAM_SRC $UPSTREAM_BUILD (the tree is
#                  assembled from vendor/llama.cpp + upstream-overlay/); resumes likewise
#   build          both builds, one after the other (only where one call has time for both)
#   models [SHAPE...]  synthesise SHAPE (1b 8b tiny; default: 1b 8b) into $MODELS_DIR as
#                  synth-llama-SHAPE-$QUANT.gguf with bench/synth_llama.py and llama-quantize
#   raw MODEL      upstream llama-bench (single stream) and llama-batched-bench at each of $NPL
#   serve MODEL    bench/serve_bench.py: pyllama-server, llama-server and llama-server
#                  --backend-sampling at each of $NPL, with --limit and --raw
# MODEL is a GGUF path or a shape name (1b, 8b, tiny) for $MODELS_DIR/synth-llama-SHAPE-$QUANT.gguf.
# Results (raw outputs, tables, plots, build logs) go to $OUT when set (the device tool's folder
# that comes back), else /tmp/gpu-bench.
#
# The device calls, in order, each with timeout_s 600 and
#   carry ["vendor/llama.cpp", "upstream-overlay", ".whl"]
# (every call: a machine given back between calls comes back bare). Make each call within 30 s
# of the last one's reply: an idle machine is given back and takes the builds and models with it.
#   1. bash bench/gpu_bench.sh deps && bash bench/gpu_bench.sh build-pyllama
#   2. bash bench/gpu_bench.sh build-upstream && bash bench/gpu_bench.sh models 1b
#   3. bash bench/gpu_bench.sh models 8b && bash bench/gpu_bench.sh raw 1b && bash bench/gpu_bench.sh raw 8b
#   4. bash bench/gpu_bench.sh serve 8b
#   5. bash bench/gpu_bench.sh serve 1b
# Guesses, not yet measured there: calls 1 and 2 take 5-9 min each (ggml-cuda, built twice: once
# in pyllama, once in upstream), 3 about 4, 4 and 5 about 5 each: the session's 30 device
# minutes are about used up, so nothing may sit idle in between. A build stage cut short by
# BUILD_TIMEOUT (540 s) says so; repeat that call and it carries on where it stopped. A stage
# that finds its inputs missing (a fresh machine) names the stage to run first. Before the
# session: `bash bench/gpu_bench.sh prepare` here.
#
# Environment: SITE, UPSTREAM_SRC (/tmp/upstream-llama.cpp), UPSTREAM_BUILD (/tmp/upstream-build),
# MODELS_DIR (/tmp/models), OUT, QUANT (Q4_K_M), CUDA (1), NGL (99), THREADS (all cores),
# NPL (1,8,32,64), NPP (100: batched-bench prompt tokens), NTG (128: generated tokens),
# NP (64), CTX (65536), PROMPT_WORDS (60), BUILD_TIMEOUT (540).
set -euo pipefail

cd "$(dirname "$0")/.."
SITE=${SITE:-/tmp/site}
UPSTREAM_SRC=${UPSTREAM_SRC:-/tmp/upstream-llama.cpp}
UPSTREAM_BUILD=${UPSTREAM_BUILD:-/tmp/upstream-build}
MODELS_DIR=${MODELS_DIR:-/tmp/models}
RESULTS=${OUT:-/tmp/gpu-bench}
QUANT=${QUANT:-Q4_K_M}
CUDA=${CUDA:-1}
NGL=${NGL:-99}
THREADS=${THREADS:-$(nproc)}
NPL=${NPL:-1,8,32,64}
NPP=${NPP:-100}
NTG=${NTG:-128}
NP=${NP:-64}
CTX=${CTX:-65536}
PROMPT_WORDS=${PROMPT_WORDS:-60}
BUILD_TIMEOUT=${BUILD_TIMEOUT:-540}
OVERLAY=upstream-overlay
# What pyllama needs at run time and the benchmark besides, that the GPU image lacks (its own
# numpy, pyyaml, requests, tqdm, packaging, pathspec and matplotlib serve), and pyproject.toml's
# build requirements (the image's cython and scikit-build-core are of unknown versions: 4 MB
# buys not finding out on the GPU's time). The versions this checkout is tested with.
WHEELS=(falcon==4.4.0 gunicorn==27.0.1 orjson==3.13.0 gguf==0.19.0
        cython-cmake==0.3.0 Cython==3.3.1 scikit-build-core==1.1.2)

export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
export PATH=$SITE/bin:$PATH
export PYTHONUNBUFFERED=1
mkdir -p "$RESULTS"

die() {
    echo "gpu_bench: $*" >&2
    exit 1
}

# --- here --------------------------------------------------------------------------------------

stage_wheels() {
    rm -rf .whl
    mkdir -p .whl
    local platforms=() n
    for n in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
             manylinux1_x86_64; do
        platforms+=(--platform "$n")
    done
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${platforms[@]}" -d .whl "${WHEELS[@]}"
    ls -l .whl
    du -sh .whl
}

stage_overlay() {
    local full=${FULL_TREE:-../upstream-llama.cpp}
    [[ -f vendor/llama.cpp/CMakeLists.txt ]] || python3 vendor/fetch.py
    [[ -f "$full/CMakeLists.txt" ]] || python3 vendor/fetch.py --all --dest "$full"
    rm -rf "$OVERLAY"
    python3 - "$full" vendor/llama.cpp "$OVERLAY" <<'EOF'
"""Copy the files of upstream's full tree that the build of its tools needs and vendor/llama.cpp lacks."""
import fnmatch, json, shutil, sys
from pathlib import Path

full, vendor, overlay = map(Path, sys.argv[1:])
if json.loads((full / ".pyllama-pin.json").read_text())["sha256"] != \
        json.loads((vendor / ".pyllama-pin.json").read_text())["sha256"]:
    sys.exit(f"gpu_bench: {full} and {vendor} come from different pins; extract both again")
# tools/ and app/ are configured whole by upstream's CMake; of the Web UI only the embedding
# templates are read with LLAMA_BUILD_UI=OFF, and nothing reads the tools' tests and sample media.
include = ["tools/*", "app/*", "scripts/ui-assets.cmake"]
exclude = ["tools/ui/*", "tools/server/tests/*", "tools/server/bench/*", "tools/mtmd/tests/*",
           "tools/mtmd/test-*"]
keep = ["tools/ui/CMakeLists.txt", "tools/ui/sources.cmake", "tools/ui/ui.cpp.in", "tools/ui/ui.h.in"]

def matches(rel, patterns):
    return any(fnmatch.fnmatch(rel, p) for p in patterns)

n = size = 0
for path in sorted(full.rglob("*")):
    rel = path.relative_to(full).as_posix()
    if not path.is_file() or (vendor / rel).exists():
        continue
    if not matches(rel, include) or (matches(rel, exclude) and rel not in keep):
        continue
    (overlay / rel).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, overlay / rel)
    n += 1
    size += path.stat().st_size
shutil.copyfile(full / ".pyllama-pin.json", overlay / ".pyllama-pin.json")
print(f"gpu_bench: {overlay}: {n} files, {size / 1e6:.1f} MB")
EOF
}

stage_prepare() {
    python3 vendor/fetch.py
    stage_wheels
    stage_overlay
    du -sh vendor/llama.cpp "$OVERLAY" .whl
    du -sch vendor/llama.cpp "$OVERLAY" .whl | tail -1
}

# --- there -------------------------------------------------------------------------------------

stage_deps() {
    compgen -G ".whl/*.whl" >/dev/null ||
        die "no wheels in .whl/: run 'bench/gpu_bench.sh wheels' here and carry .whl"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .whl/*.whl
    echo "export PYTHONPATH=$SITE\${PYTHONPATH:+:\$PYTHONPATH} PATH=$SITE/bin:\$PATH"
    python3 --version
    local names='numpy|cython|cython-cmake|scikit[-_]build[-_]core|cmake|ninja|matplotlib|pyyaml|'
    names+='falcon|gunicorn|orjson|gguf'
    python3 -m pip list 2>/dev/null | grep -i -E "^($names) " || true
    if command -v nvidia-smi >/dev/null; then nvidia-smi -L; fi
    if command -v nvcc >/dev/null; then nvcc --version | tail -1; fi
    # ggml-cuda links cuBLAS from the toolkit: without it both builds stop at configure.
    echo "cublas: $(ls /usr/local/cuda*/lib64/libcublas.so /usr/local/cuda*/targets/*/lib/libcublas.so \
        2>/dev/null | head -1 || true)"
    echo "ccache: $(command -v ccache || echo none)"
}

need_site() {  # the wheels, installed again if the machine came back bare
    python3 -c 'import falcon, gunicorn, orjson, gguf' 2>/dev/null || stage_deps
}

need_pyllama() {  # as serve_bench.py imports it: the checkout first on sys.path
    python3 -c 'import sys; sys.path.insert(0, "."); import pyllama.engine' 2>/dev/null ||
        die "pyllama is not installed (a fresh machine?): run build-pyllama first"
}

need_upstream() {
    local tool
    for tool in llama-server llama-batched-bench llama-bench llama-quantize; do
        [[ -x "$UPSTREAM_BUILD/bin/$tool" ]] ||
            die "$UPSTREAM_BUILD/bin/$tool is missing (a fresh machine?): run build-upstream first"
    done
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

stage_build_pyllama() {
    need_site
    [[ -f vendor/llama.cpp/CMakeLists.txt ]] || die "vendor/llama.cpp is missing: carry it"
    if ((CUDA)); then
        if ! command -v nvcc >/dev/null && [[ -x /usr/local/cuda/bin/nvcc ]]; then
            export PATH=/usr/local/cuda/bin:$PATH
        fi
        export CMAKE_ARGS="-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 ${CMAKE_ARGS:-}"
    fi
    # NOTE: editable, into python3's own environment (the image's venv; root may write there),
    # not a wheel into $SITE: serve_bench.py puts the checkout first on sys.path, and its
    # pyllama/ (no compiled modules) would shadow a plain install; scikit-build-core's editable
    # finder wins over sys.path. pyproject's build-dir (build/<wheel tag>) keeps the objects, so
    # a rerun after a timeout resumes.
    run_logged build-pyllama python3 -m pip install -v --no-build-isolation --no-deps --no-index \
        --no-compile -e .
    need_pyllama
    python3 -c 'import sys; sys.path.insert(0, "."); import pyllama.engine as e; print("gpu_bench: pyllama from", e.__file__)'
    command -v pyllama-server || ls "$(python3 -c 'import sys; print(sys.prefix)')/bin/pyllama-server"
}

stage_build_upstream() {
    local flags=()
    if ((CUDA)); then flags+=(--cuda); fi
    run_logged build-upstream bench/build_upstream.sh "${flags[@]}" "$UPSTREAM_SRC" "$UPSTREAM_BUILD"
    need_upstream
}

model_path() {  # a shape name or a path -> the GGUF's path
    case $1 in
        tiny | 1b | 8b) echo "$MODELS_DIR/synth-llama-$1-$QUANT.gguf" ;;
        *) echo "$1" ;;
    esac
}

stage_models() {
    need_site
    need_upstream
    local shapes=("$@") shape out
    ((${#shapes[@]})) || shapes=(1b 8b)
    mkdir -p "$MODELS_DIR"
    for shape in "${shapes[@]}"; do
        out=$(model_path "$shape")
        if [[ -f "$out" ]]; then
            echo "gpu_bench: $out is there"
            continue
        fi
        python3 bench/synth_llama.py --shape "$shape" --out "$out" --quantize "$QUANT" \
            --quantize-bin "$UPSTREAM_BUILD/bin/llama-quantize"
    done
    ls -l "$MODELS_DIR"
}

stage_raw() {
    need_upstream
    local model name max_npl ctx
    model=$(model_path "${1:?raw needs a MODEL}")
    [[ -f "$model" ]] || die "$model is missing: run models first"
    name=$(basename "$model" .gguf)
    max_npl=$(tr , '\n' <<<"$NPL" | sort -n | tail -1)
    ctx=$((max_npl * (NPP + NTG) + 256))  # one sequence of NPP + NTG tokens per parallel prompt
    "$UPSTREAM_BUILD/bin/llama-bench" -m "$model" -ngl "$NGL" -t "$THREADS" -p 0 -n "$NTG" -o json \
        >"$RESULTS/raw-$name-llama-bench.json" || die "llama-bench failed"
    "$UPSTREAM_BUILD/bin/llama-batched-bench" -m "$model" -ngl "$NGL" -t "$THREADS" -c "$ctx" \
        -npp "$NPP" -ntg "$NTG" -npl "$NPL" --output-format jsonl 2>"$RESULTS/raw-$name-batched.log" |
        grep '^{' >"$RESULTS/raw-$name-batched.jsonl" ||
        die "llama-batched-bench failed: see $RESULTS/raw-$name-batched.log"
    python3 - "$name" "$RESULTS/raw-$name-llama-bench.json" "$RESULTS/raw-$name-batched.jsonl" <<'EOF'
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
    need_site
    need_pyllama
    need_upstream
    local model name
    model=$(model_path "${1:?serve needs a MODEL}")
    [[ -f "$model" ]] || die "$model is missing: run models first"
    name=$(basename "$model" .gguf)
    python3 bench/serve_bench.py -m "$model" --upstream "$UPSTREAM_BUILD/bin" \
        --concurrency "$NPL" --np "$NP" --ctx "$CTX" --n-predict "$NTG" --prompt-words "$PROMPT_WORDS" \
        --threads "$THREADS" --server-args "-ngl $NGL" --upstream-backend-sampling --limit --raw \
        --md "$RESULTS/serve-$name.md" --png "$RESULTS/serve-$name.png" 2>&1 | tee "$RESULTS/serve-$name.log"
}

stage=${1:-}
shift || true
case $stage in
    prepare) stage_prepare ;;
    wheels) stage_wheels ;;
    overlay) stage_overlay ;;
    deps) stage_deps ;;
    build-pyllama) stage_build_pyllama ;;
    build-upstream) stage_build_upstream ;;
    build) stage_build_pyllama && stage_build_upstream ;;
    models) stage_models "$@" ;;
    raw) stage_raw "$@" ;;
    serve) stage_serve "$@" ;;
    *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2 ;;
esac
