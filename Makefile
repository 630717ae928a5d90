# The whole set-up on a fresh machine: `make test` and `make bench` create .venv when missing,
# install the pinned requirements and this package (building its extension), then run.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SOURCES := $(shell find csrc -type f 2>/dev/null) setup.py requirements-dev.txt
# The usual CUDA toolkit location; setup.py compiles the CUDA kernels when it finds nvcc.
export CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
# sm_90 (H100/H200) only, which halves the CUDA compile and keeps `make test` within its time;
# `make test TORCH_CUDA_ARCH_LIST="8.0;9.0"` also builds and checks A100's (pip install builds both).
export TORCH_CUDA_ARCH_LIST ?= 9.0
export MAX_JOBS ?= 2

.PHONY: test bench install clean

test: $(STAMP)
	$(PY) -m pytest tests $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks $(BENCH_ARGS)

install: $(STAMP)

$(PY):
	python3 -m venv $(VENV)

# pip byte-compiles what it installs on one core (~30 s here); compileall does it on all of them.
# (Compile errors in some packages' stray files are not ours: pip ignores them too.)
$(STAMP): $(PY) $(SOURCES)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile -r requirements-dev.txt
	$(PY) -m compileall -q -j 0 \
	    "$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" > /dev/null || true
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $(STAMP)

clean:
	rm -rf build *.egg-info icl_msr_kernels/*.so benchmarks/results
