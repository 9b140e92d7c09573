# pyllama: `make run` sets up and serves the default model on :8080, `make test` runs the tests.
# Needs Python 3.10+, a C/C++ compiler, cmake and pip; everything else is installed into .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# Extra CMake options, e.g. CMAKE_ARGS="-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90".
export CMAKE_ARGS

.PHONY: all setup vendor build run test wheel clean

all: build

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.deps: pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "scikit-build-core>=0.10" "cython>=3.0" "cython-cmake>=0.2" ninja
	# CPU build of torch for the embedding-model converter (this machine kind has it on disk)
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	touch $@

setup: $(VENV)/.deps

vendor: | $(PY)
	$(PY) vendor/fetch.py

# Editable install over a persistent build folder (build/): rebuilds are incremental.
build: setup vendor
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"

# llama-server's flags; e.g. make run ARGS="-np 8 --metrics"
ARGS ?=
run: build
	$(VENV)/bin/pyllama-server --host 127.0.0.1 --port 8080 $(ARGS)

test: build
	$(PY) -m pytest -q tests

wheel: setup vendor
	$(PY) -m pip wheel --no-build-isolation --no-deps -w dist .

clean:
	rm -rf build dist
