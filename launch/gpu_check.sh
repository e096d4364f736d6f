#!/usr/bin/env bash
# Every GPU check in one command, set-up included (python -m train.bench gpu does the checks):
#
#   launch/gpu_check.sh [--wheelhouse DIR] [--build-cuda-kernels SECONDS] [--out DIR]   # 1 GPU
#   launch/gpu_check.sh --cpu --quick [--out DIR]        # the parts that run on a CPU (CI)
#
# It writes OUT/gpu_report.json and OUT/gpu_report.md (default OUT: runs/gpu_check) and exits
# 0 only if no check failed. Meant for a fresh, air-gapped GPU machine that has torch:
#   --wheelhouse DIR  install what this project needs and the machine lacks from DIR with no
#                     network (`make wheelhouse WHEEL_PYTHON=3.12` makes DIR; it holds the
#                     pytorch-fast-transformers sdist, built here)
#   --build-cuda-kernels SECONDS  also try to build fast-transformers' CUDA kernels for this
#                     GPU within SECONDS (docker/build_fast_transformers.sh); without it, or if
#                     it runs out of time, the library's causal-linear CUDA kernel is reported
#                     as skipped
# Environment: PYTHON (default .venv/bin/python if there, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."

wheelhouse="" cuda_seconds=0 args=()
while (( $# )); do
  case $1 in
    --wheelhouse) wheelhouse=$2; shift 2 ;;
    --build-cuda-kernels) cuda_seconds=$2; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if [[ -n $wheelhouse ]]; then
  # The modules this project imports, by the distribution that provides them.
  missing=()
  for pair in pydantic:pydantic yaml:pyyaml tqdm:tqdm safetensors:safetensors \
              tokenizers:tokenizers accelerate:accelerate numpy:numpy; do
    "$PYTHON" -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair##*:}")
  done
  if (( ${#missing[@]} )); then
    echo "gpu_check: installing ${missing[*]} from $wheelhouse"
    "$PYTHON" -m pip install -q --no-index --find-links "$wheelhouse" "${missing[@]}"
  fi
  if ! "$PYTHON" -c "import fast_transformers.causal_product.causal_product_cpu" 2>/dev/null; then
    sdist=$(ls "$wheelhouse"/pytorch[-_]fast[-_]transformers-*.tar.gz | head -n 1)
    built=0
    if (( cuda_seconds > 0 )) && command -v nvcc >/dev/null; then
      arch=$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
      echo "gpu_check: building fast-transformers with CUDA kernels for $arch (<= ${cuda_seconds}s)"
      FAST_TRANSFORMERS_SDIST="$sdist" TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$(nproc)" \
        timeout "$cuda_seconds" bash docker/build_fast_transformers.sh "$PYTHON" && built=1 || true
    fi
    if (( ! built )); then
      # Its setup.py compiles CUDA code whenever nvcc is callable (with an arch CUDA 13
      # rejects), so the CPU-only build runs with every nvcc hidden from PATH.
      echo "gpu_check: building fast-transformers (CPU extensions) from $sdist"
      no_nvcc=$(printf '%s' "$PATH" | tr ':' '\n' | while read -r d; do
                  [[ -n $d && ! -x $d/nvcc ]] && printf '%s\n' "$d"; done | paste -sd: -)
      PATH="$no_nvcc" MAX_JOBS="$(nproc)" "$PYTHON" -m pip install -q --no-index --no-deps \
        --no-build-isolation "$sdist"
    fi
  fi
fi

exec "$PYTHON" -m train.bench gpu "${args[@]}"
