# pyllama: `make run` sets up and serves the default model on :8080, `make test` runs the tests.
# Needs Python 3.10+, a C/C++ compiler, cmake and pip; everything else is installed into .venv.
#
# Two builds:
#   native (default)  an editable install tuned for this CPU (GGML_NATIVE, one CPU module),
#                     incremental over build/: what developers iterate on.
#   wheel             the portable wheel users get (one CPU module per CPU level, picked at load),
#                     built by wheels/build.sh exactly as the release workflow builds it, then
#                     installed into .venv and tested. CI (CI=true) tests this one.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
ifeq ($(CI),true)
BUILD ?= wheel
else
BUILD ?= native
endif
# Extra CMake options, e.g. CMAKE_ARGS="-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90".
export CMAKE_ARGS
# ggml refuses GGML_NATIVE with GGML_BACKEND_DL: the native build links its one CPU backend in.
NATIVE_DEFINES := -C cmake.define.GGML_NATIVE=ON -C cmake.define.GGML_CPU_ALL_VARIANTS=OFF \
  -C cmake.define.GGML_BACKEND_DL=OFF

.PHONY: all setup vendor build build-native build-wheel run test test-levels wheel clean

all: build

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.deps: pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "scikit-build-core>=0.10" "cython>=3.1" "cython-cmake>=0.2" ninja build
	# CPU build of torch for the embedding-model converter (this machine kind has it on disk)
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	touch $@

setup: $(VENV)/.deps

# llama.cpp's sources, then llama-server's web UI (npm; skipped with a note where npm is missing:
# the server then serves the API only). The portable wheel (wheels/build.sh) requires the UI.
vendor: | $(PY)
	nice $(PY) vendor/fetch.py --ui

build: build-$(BUILD)

# Editable install over a persistent build folder (build/): rebuilds are incremental.
build-native: setup vendor
	$(PY) -m pip install -q --no-build-isolation $(NATIVE_DEFINES) -e ".[test]"

# The portable wheel (sdist, wheel from it, auditwheel repair, check), installed into .venv.
build-wheel: setup vendor
	PYTHON=$(PY) bash wheels/build.sh cpu
	$(PY) -m pip uninstall -q -y pyllama-serve || true
	$(PY) -m pip install -q "$$(ls wheelhouse/pyllama_serve-*.whl | head -1)[test]"

# llama-server's flags; e.g. make run ARGS="-np 8 --metrics"
ARGS ?=
run: build
	$(VENV)/bin/pyllama-server --host 127.0.0.1 --port 8080 $(ARGS)

# -P: the tests import the installed pyllama (native: the editable one), never ./pyllama as is.
test: build
	$(if $(filter wheel,$(BUILD)),PYLLAMA_WHEEL="$$(ls wheelhouse/pyllama_serve-*.whl | head -1)") \
	  $(PY) -P -m pytest -q tests

# The portable wheel's lower CPU levels, forced with PYLLAMA_CPU_VARIANT: the engine tests on
# each (after `make test BUILD=wheel`; CI runs it). haswell is an AVX2 machine without AVX-512;
# LEVELS="haswell x64" adds the baseline without AVX (slow: scalar kernels).
ifeq ($(shell uname -m),aarch64)
LEVELS ?= armv8.2_1
else
LEVELS ?= haswell
endif
test-levels:
	for level in $(LEVELS); do \
	  echo "== CPU level $$level"; \
	  PYLLAMA_CPU_VARIANT=$$level $(PY) -P -m pytest -q tests/engine tests/test_backends.py || exit 1; \
	done

wheel: setup vendor
	PYTHON=$(PY) bash wheels/build.sh cpu

clean:
	rm -rf build dist wheelhouse
