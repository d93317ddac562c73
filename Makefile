# make test / make bench work on a fresh machine: they create .venv, install what is needed, build the
# extension (CPU always; CUDA too when nvcc and a CUDA torch are present) and run.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
export CUDA_HOME ?= /usr/local/cuda

.PHONY: test bench install clean

$(VENV)/.deps: requirements-dev.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q -r requirements-dev.txt
	touch $@

$(VENV)/.built: $(VENV)/.deps setup.py $(shell find csrc -type f 2>/dev/null)
	$(VPY) -m pip install -q --no-build-isolation -e .
	touch $@

install: $(VENV)/.built

test: install
	TRITON_INTERPRET=1 $(VPY) -m pytest python_tests -q -rs

# Results go to $(BENCH_OUT), not the committed benchmarks/results/ (copy them there to commit a run).
BENCH_OUT ?= mgpo-bench-results
bench: install
	$(VPY) -m mgpo_kernels.bench table3 --out $(BENCH_OUT)
	$(VPY) -m mgpo_kernels.bench step --ranks 8 --out $(BENCH_OUT)

clean:
	rm -rf build *.egg-info mgpo_kernels/*.so $(VENV)/.built
