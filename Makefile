# make demo   - set up .venv, build vqfast (CPU + CUDA kernels), train a VQ-VAE on the embedded photos (+ VQ-GAN fine-tune)
# make test   - same set-up, then the static GPU report and the whole test suite
# make bench  - the benchmark tables (kernels, quantize step, residual, layers);  make gpu-check - on an NVIDIA GPU
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1
export MAX_JOBS ?= 2

.PHONY: demo demo-apps test bench build gpu-check kernels-report test-slow clean

$(VENV)/.deps: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements.txt
	# taming's model modules need only torch; its declared dependencies are heavy
	$(PY) -m pip install -q --no-deps taming-transformers
	touch $@

build: $(VENV)/.deps
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -m vqfast info

demo: build
	$(PY) -m vqfast demo

# the applications on the embedded photos: code prior + samples, compression vs JPEG/WebP, restoration
demo-apps: build
	$(PY) -m vqfast demo-apps

bench: build
	$(PY) -m vqfast bench
	$(PY) -m pytest benchmarks -q --benchmark-columns=median,ops --benchmark-sort=name

kernels-report: build
	$(PY) -m vqfast kernels-report

test: build
	$(PY) -m vqfast kernels-report --strict
	$(PY) -m pytest tests -q -ra

test-slow: build
	VQFAST_SLOW_TESTS=1 $(PY) -m pytest tests -q -ra

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf build *.egg-info vqfast/_C*.so
