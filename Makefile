# Two entry points: `make demo` and `make test`. Both set up .venv first if needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision must be a matching pair; override for another platform or CUDA build.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
FAST_TRANSFORMERS_SPEC ?= pytorch-fast-transformers==0.4.0
# Directories on PATH that hold an `nvcc`. fast-transformers' setup.py compiles its CUDA
# extensions whenever `nvcc` is callable, with a hard-coded compute_50 that CUDA >= 12 rejects,
# so the CPU build runs with those directories removed from PATH.
PATH_WITHOUT_NVCC = $(shell printf '%s' "$$PATH" | tr ':' '\n' | while read -r d; do [ -n "$$d" ] && [ ! -x "$$d/nvcc" ] && printf '%s\n' "$$d"; done | paste -sd: -)

.PHONY: setup demo test clean

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel ninja
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	@# setup.py imports torch, hence --no-build-isolation (torch must already be installed).
	@$(PY) -c "import fast_transformers.causal_product.causal_product_cpu" 2>/dev/null || { \
	  echo "Building $(FAST_TRANSFORMERS_SPEC) (CPU extensions, ~5 min once; pip caches the wheel)"; \
	  PATH="$(PATH_WITHOUT_NVCC)" MAX_JOBS=2 $(PY) -m pip install --quiet --no-build-isolation $(FAST_TRANSFORMERS_SPEC); }
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

demo: setup
	rm -rf runs/demo-lm runs/demo-vision
	$(PY) -m train configs/lm_tiny.yaml output_dir=runs/demo-lm
	$(PY) -m train.generate runs/demo-lm --prompt "The " --max-new-tokens 300 --temperature 0.8 --top-k 40 --seed 0
	$(PY) -m train configs/vision_tiny.yaml output_dir=runs/demo-vision
	@tail -n 1 runs/demo-vision/metrics.jsonl

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf runs .pytest_cache
