# Quick start: `make demo` and `make test` on a fresh clone. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export MAX_JOBS ?= 2

.PHONY: install demo opdemo test test-gpu bench info clean clone-demo afd-demo tax-demo dynamics-demo

$(VENV)/.installed: setup.py pyproject.toml csrc/*.cpp csrc/*.h
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	# torch only if none is importable: `torch==2.13.0` takes the local CPU build on this machine
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q numpy pybind11 ninja
	$(PIP) install -q --no-build-isolation -e ".[dev]"
	$(PY) -c "import fastalign, sys; print('fastalign', fastalign.__version__, 'backends:', fastalign.available_backends())"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m fastalign.demo

# Triton kernels run in the CPU interpreter here; GPU-only tests skip themselves without CUDA.
test: install
	TRITON_INTERPRET=1 $(PY) -m pytest -q -ra tests

test-gpu: install
	$(PY) -m pytest -q -ra tests

bench: install
	$(PY) bench/bench_linear_logprobs.py
	$(PY) bench/bench_dpo_loss.py
	$(PY) bench/bench_e2e_dpo.py

info: install
	$(VENV)/bin/fastalign info

clean:
	rm -rf build *.egg-info fastalign/_C*.so $(VENV)

opdemo: install
	$(PY) -m fastalign.opdemo

afd-demo: install
	$(PY) -m fastalign.afd_demo
# Clone-robust weights: standard vs weighted MLE before/after duplicating a cluster (prints a table, writes a PNG)
clone-demo: install
	$(PY) -m fastalign.clone_demo --out runs/clone_demo.png
# The alignment tax: pretrain, align with DPO, then the averaging / HMA trade-off curve (a few minutes on CPU)
tax-demo: install
	$(PY) -m fastalign.tax_demo
# Learning dynamics (issue 13): distinguishability next to learning speed, on persona and synthetic data
dynamics-demo: install
	$(PY) -m fastalign.dynamics_demo
